"""One benchmark measurement of a bundle in this (fresh) process: load, prefill N tokens, decode M greedy tokens.

Prints one JSON line: load_s (from the process's first line: imports included, as the peers' bench/peer_run.py
counts them), prefill_tps, decode_tps, peak_rss_mb (VmHWM of this process), bundle_mb.
The decode loop is the runtime's own (edge_runtime.generation.generate.generate_tokens: forward + sampler), with EOS
ignored so every run decodes exactly M tokens.
"""
from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def bundle_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bundle")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kv-dtype", default=None)
    ap.add_argument("--prefill-chunk", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import edge_runtime
    from edge_runtime.generation.generate import generate_tokens
    from edge_runtime.generation.sampling import make_sampler
    from edge_runtime.generation.stats import peak_rss_bytes
    from edge_runtime.memory.testing import text_prompt_ids
    from edge_runtime.sessions.state import CacheState

    model = edge_runtime.load(args.bundle, backend=args.backend, threads=args.threads, context=args.context,
                              kv_dtype=args.kv_dtype)
    load_s = time.perf_counter() - T0
    ids = text_prompt_ids(model.tokenizer, args.prompt_tokens)
    tokens = generate_tokens(model.backend, CacheState(), ids, make_sampler(0.0), max_new_tokens=args.new_tokens,
                             prefill_chunk=args.prefill_chunk or model.prefill_chunk)
    t1 = time.perf_counter()
    next(tokens)  # prefill + first token
    t2 = time.perf_counter()
    n = sum(1 for _ in tokens)
    t3 = time.perf_counter()
    out = {"load_s": load_s, "prefill_tps": len(ids) / (t2 - t1), "decode_tps": n / (t3 - t2),
           "peak_rss_mb": peak_rss_bytes() / 2**20, "bundle_mb": bundle_mb(Path(args.bundle)),
           "prompt_tokens": len(ids), "new_tokens": n + 1, "backend": model.backend.describe()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
