"""One llama-cpp-python measurement in this (fresh) process, the peer of bench/run_one.py: load a GGUF, prefill
N tokens of pydoc text, decode M greedy tokens; prints one JSON line with the same keys.

Runs in the llama-cpp-python environment (not a dependency of this project):
    /work/peers/llama/bin/python bench/llamacpp_run_one.py cache/models/gemma-3-270m-q4_k_m.gguf --prompt-tokens 500
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def prompt_ids(llm, n: int) -> list[int]:
    """BOS and n - 1 ids of CPython's pydoc topics, as bench/run_one.py's text_prompt_ids takes them."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    ids = llm.tokenize(text[:16 * n].encode("utf-8"), add_bos=True, special=False)
    return ids[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    import llama_cpp

    llm = llama_cpp.Llama(model_path=args.gguf, n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=args.context, verbose=False)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(llm, args.prompt_tokens)
    t1 = time.perf_counter()
    llm.eval(ids)
    token = llm.sample(top_k=1, temp=0.0)
    t2 = time.perf_counter()
    for _ in range(args.new_tokens - 1):  # EOS ignored: every run decodes the same number of tokens
        llm.eval([token])
        token = llm.sample(top_k=1, temp=0.0)
    t3 = time.perf_counter()
    out = {"load_s": load_s, "prefill_tps": len(ids) / (t2 - t1), "decode_tps": (args.new_tokens - 1) / (t3 - t2),
           "peak_rss_mb": peak_rss_mb(), "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
           "backend": f"llama-cpp-python {llama_cpp.__version__}"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
