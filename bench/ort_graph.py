"""Build edge-llama-v1 bundles of the real GGUF and measure OrtBackend: decode/prefill speed, peak RSS, load time.

    .venv/bin/python bench/ort_graph.py build --out build/ort-bench            # int4 / int8 / q4_1 bundles
    .venv/bin/python bench/ort_graph.py run build/ort-bench/int4 --threads 2 [--option disable_prepacking=1]
    .venv/bin/python bench/ort_graph.py sweep build/ort-bench/int4             # every memory option, one process each
    .venv/bin/python bench/ort_graph.py profile bundles/smollm2-int4 --threads 1  # per-op time of a decode step

Each `run` is a fresh process so that VmHWM (peak RSS) belongs to that one configuration. `profile` uses ONNX
Runtime's profiler, which adds a few microseconds to every node: read its shares, not its absolute times.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GGUF = ROOT / "cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = ("int4", "int8", "q4_1")
SWEEP = [{}, {"enable_cpu_mem_arena": 0}, {"use_env_allocators": 1}, {"disable_prepacking": 1}, {"constant_folding": 1},
         {"use_device_allocator_for_initializers": 1}, {"enable_mem_pattern": 0}, {"allow_spinning": 0},
         {"parallel_prepack": 1}]


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def quantized_weights(src, variant: str, embed_bits: int, block_size: int = 32) -> dict:
    """HF name -> float array or BlockQuant: linears per variant, the (tied) embedding at embed_bits."""
    from export.quant.quantize import quantize_int4, quantize_int8, transcode_gguf

    out = {}
    for name, w in src.tensors.items():
        if w.ndim != 2:
            out[name] = w
        elif variant == "q4_1" and name in src.gguf_blocks:
            out[name] = transcode_gguf(src.gguf_blocks[name])      # exact GGUF values (offsets path)
        elif name == "model.embed_tokens.weight" and embed_bits == 8 or variant == "int8":
            out[name] = quantize_int8(w, block_size)
        else:
            out[name] = quantize_int4(w, block_size, method="rtn")
    return out


def build(args) -> None:
    from export.bundle.writer import write_bundle
    from export.graph import GraphOptions, build_decoder_graph
    from export.sources import load_source

    src = load_source(str(GGUF))
    for variant in args.variants:
        t0 = time.perf_counter()
        weights = quantized_weights(src, variant, args.embed_bits, args.block_size)
        for acc in args.accuracy_levels:
            options = GraphOptions(accuracy_level=acc, max_context=args.max_context, fuse_qkv=not args.no_fuse,
                                   fuse_gate_up=not args.no_fuse, kv_dtype=args.kv_dtype)
            graph = build_decoder_graph(src.config, weights, options)
            out = Path(args.out) / f"{variant}-e{args.embed_bits}-acc{acc}{'-unfused' if args.no_fuse else ''}"
            out = out.with_name(out.name + (f"-bs{args.block_size}" if args.block_size != 32 else "")
                                + ("-kv16" if args.kv_dtype == "float16" else ""))
            write_bundle(out, config=src.config, graph=graph, extra_files={"tokenizer.json": src.tokenizer_json},
                         manifest_fields={"max_context": args.max_context,
                                          "graph": {"contract": "edge-llama-v1", "accuracy_level": acc}})
            size = (out / "weights.bin").stat().st_size / 2**20
            print(f"{out}: weights.bin {size:.1f} MiB, built in {time.perf_counter() - t0:.1f}s", flush=True)


def run(args) -> dict:
    import numpy as np

    from edge_runtime.backends.ort.llama import OrtBackend
    from edge_runtime.format.bundle import Bundle

    options = {k: int(v) if v.isdigit() else v for k, v in (o.split("=", 1) for o in args.option)}
    bundle = Bundle.open(args.bundle, verify=False)
    t0 = time.perf_counter()
    be = OrtBackend(bundle, context=args.context, threads=args.threads, session_options=options)
    load_s = time.perf_counter() - t0
    rss_load = vm_hwm_mb()
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, size=args.prefill).astype(np.int64)
    prefill = []
    for _ in range(args.runs):
        t = time.perf_counter()
        be.forward(prompt, 0, np.array([len(prompt) - 1]))
        prefill.append(args.prefill / (time.perf_counter() - t))
    decode = []
    for _ in range(args.runs):
        logits = be.forward(prompt[:8], 0, np.array([7]))
        t = time.perf_counter()
        for pos in range(8, 8 + args.decode):
            tok = np.array([int(np.argmax(logits))], np.int64)
            logits = be.forward(tok, pos, np.zeros(1, np.int64))
        decode.append(args.decode / (time.perf_counter() - t))
    res = {"bundle": str(args.bundle), "options": options, "threads": args.threads, "load_s": round(load_s, 3),
           "rss_after_load_mb": round(rss_load, 1), "peak_rss_mb": round(vm_hwm_mb(), 1),
           "kv_mb": round(be.kv_nbytes() / 2**20, 1), "decode_tok_s": round(statistics.median(decode), 1),
           "decode_runs": [round(x, 1) for x in decode], "prefill_tok_s": round(statistics.median(prefill), 1),
           "load_avg": os.getloadavg()[0]}
    print(json.dumps(res), flush=True)
    return res


def profile(args) -> None:
    """Per-op-type kernel time of `--decode` decode steps after a `--prefill`-token prompt."""
    import collections

    import numpy as np

    from edge_runtime.backends.ort import llama as ort_backend
    from edge_runtime.format.bundle import Bundle

    make = ort_backend.make_session_options

    def profiled(*a, **k):
        so = make(*a, **k)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(args.out) / "ort-profile")
        return so

    ort_backend.make_session_options = profiled
    be = ort_backend.OrtBackend(Bundle.open(args.bundle, verify=False), context=args.context, threads=args.threads)
    ort_backend.make_session_options = make
    prompt = np.random.default_rng(0).integers(100, 40000, size=args.prefill).astype(np.int64)
    logits = be.forward(prompt, 0, np.array([len(prompt) - 1]))
    for pos in range(len(prompt), len(prompt) + args.decode):
        logits = be.forward(np.array([int(np.argmax(logits))]), pos, np.zeros(1, np.int64))
    path = Path(be.session.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    runs = [e for e in events if e.get("name") == "model_run"][-args.decode:]
    per_op, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[0]["ts"]:
            per_op[e["args"]["op_name"]] += e["dur"] / args.decode
            count[e["args"]["op_name"]] += 1
    total = sum(per_op.values())
    print(f"{args.bundle}: model_run {sum(r['dur'] for r in runs) / args.decode:.0f} us/token, kernels {total:.0f} us, "
          f"{sum(count.values()) // args.decode} nodes")
    for op, us in per_op.most_common():
        print(f"  {op:34s} {us:8.1f} us/token {100 * us / total:5.1f}%  x{count[op] // args.decode}")


def sweep(args) -> None:
    for opts in SWEEP:
        cmd = [sys.executable, __file__, "run", args.bundle, "--threads", str(args.threads), "--runs", str(args.runs)]
        for k, v in opts.items():
            cmd += ["--option", f"{k}={v}"]
        subprocess.run(cmd, check=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=str(ROOT / "build/ort-bench"))
    b.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    b.add_argument("--accuracy-levels", nargs="+", type=int, default=[4])
    b.add_argument("--embed-bits", type=int, default=8, choices=(4, 8))
    b.add_argument("--max-context", type=int, default=8192)
    b.add_argument("--block-size", type=int, default=32)
    b.add_argument("--kv-dtype", default="float32", choices=("float32", "float16"))
    b.add_argument("--no-fuse", action="store_true", help="separate q/k/v and gate/up matmuls")
    for name in ("run", "sweep", "profile"):
        r = sub.add_parser(name)
        r.add_argument("bundle")
        r.add_argument("--threads", type=int, default=2)
        r.add_argument("--runs", type=int, default=3)
        r.add_argument("--context", type=int, default=2048)
        r.add_argument("--prefill", type=int, default=500)
        r.add_argument("--decode", type=int, default=64)
        r.add_argument("--option", action="append", default=[])
        r.add_argument("--out", default="/tmp", help="profile: where ORT writes its (deleted) trace")
    args = ap.parse_args(argv)
    {"build": build, "run": run, "sweep": sweep, "profile": profile}[args.cmd](args)


if __name__ == "__main__":
    main()
