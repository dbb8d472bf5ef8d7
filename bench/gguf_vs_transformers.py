"""Check our GGUF reader (export.sources.gguf.read_gguf) against transformers' own GGUF loading: every tensor
bit for bit (names from the family's spec, quant blocks by export.sources.gguf_blocks, Gemma norms 1 + w
undone, Llama Q/K rows un-permuted) and the config keys.

Needs transformers, accelerate, torch and gguf (e.g. the onnxruntime-genai peer environment):
    PYTHONPATH=. /work/peers/genai/bin/python bench/gguf_vs_transformers.py cache/models/gemma-3-270m-q4_k_m.gguf
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path)
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from export.sources.gguf import read_gguf

    model = AutoModelForCausalLM.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name,
                                                 dtype=torch.float32)
    ours = read_gguf(args.gguf)
    state = model.state_dict()
    differ = 0
    for name, want in state.items():
        if name not in ours.tensors:  # a tied lm_head
            continue
        if not np.array_equal(ours.tensors[name], want.numpy()):
            differ += 1
            print(f"differs: {name}")
    missing = sorted(set(ours.tensors) - set(state))
    theirs = model.config.to_dict()
    mine = ours.config.to_dict()
    keys = [k for k in mine if k in theirs and mine[k] != theirs[k] and k not in ("model_type", "layer_types")]
    print(f"{len(state)} tensors, {differ} differ, {len(missing)} not in transformers; config keys differing: "
          + (", ".join(f"{k} ours {mine[k]!r} theirs {theirs[k]!r}" for k in keys) or "none"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
