"""Check our GGUF reading against transformers' own GGUF loading: every tensor bit for bit (names by gguf-py's
TensorNameMap, quant blocks by export.sources.gguf_blocks, Gemma norms 1 + w undone) and the config keys.

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
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from export.sources.gguf import NORM_PLUS_ONE, config_dict, read_tensor

    model = AutoModelForCausalLM.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name,
                                                 dtype=torch.float32)
    reader = gguf.GGUFReader(args.gguf)
    arch = reader.fields["general.architecture"].contents()
    by_name = {t.name: t for t in reader.tensors}
    arch_enum = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    name_map = gguf.get_tensor_name_map(arch_enum, model.config.num_hidden_layers)
    differ = 0
    state = model.state_dict()
    for name, want in state.items():
        gname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname not in by_name:  # a tied lm_head
            continue
        got, _ = read_tensor(by_name[gname])
        if arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
            got = got - np.float32(1)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            continue  # rows permuted by llama.cpp's converter; tests/test_sources.py covers the un-permuting
        if got.shape != tuple(want.shape) or not np.array_equal(got, want.numpy()):
            differ += 1
            print(f"differs: {name}")
    ours = config_dict(reader.fields, arch, len(reader.fields["tokenizer.ggml.tokens"].data),
                       tied="output.weight" not in by_name)
    theirs = model.config.to_dict()
    keys = [k for k in ours if k in theirs and ours[k] != theirs[k] and k != "model_type"]
    print(f"{len(state)} tensors, {differ} differ; config keys differing: "
          + (", ".join(f"{k} ours {ours[k]!r} theirs {theirs[k]!r}" for k in keys) or "none"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
