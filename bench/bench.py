"""`make bench`: this runtime's bundles beside the naive ONNX path, on SmolLM2-135M, 2 threads.

Every figure is the median of several fresh processes (peak RSS is the VmHWM of a process that only loads and
generates), taken round-robin over the systems, and ratios are taken against the naive int4 path measured in the
same run, since absolute times drift on a shared machine.
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

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MODEL = ROOT / "cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLES = ROOT / "bundles"
NAIVE = ROOT / "build/naive"

# (label, kind, target): kind "edge" runs bench/run_one.py on a bundle, "naive" runs bench/naive.py on a model.
SYSTEMS = [
    ("edge int4 (ort)", "edge", ("smollm2-int4", "ort")),
    ("edge int4-b64 gptq (ort)", "edge", ("smollm2-int4-b64", "ort")),
    ("edge int8 (ort)", "edge", ("smollm2-int8", "ort")),
    ("naive int4 (optimum + MatMulNBits RTN)", "naive", "int4"),
    ("naive int8 (optimum + quantize_dynamic)", "naive", "int8"),
    ("edge int8 (numpy)", "edge", ("smollm2-int8", "numpy")),
    ("edge int4 (numpy)", "edge", ("smollm2-int4", "numpy")),
]
SCENARIOS = {"short": (16, 128), "long": (500, 128)}  # prompt tokens, new tokens
# bundle name (after "smollm2-") -> edge-export arguments.
# int4: the default; SmolLM2's Q4_1 layers transcoded exactly (float offsets, an extra small matmul each).
# int4-b64: integer zero points only, blocks of 64, rounded by GPTQ: fewer bytes per weight and no offsets
# matmul, so it is the fast int4; the fidelity column shows what re-quantizing the Q4_1 grid costs. The tied
# lm_head is stored apart (GPTQ-rounded int4) from the embedding table (exact int8, read a row per token).
EXPORT_ARGS = {
    "int4": ["--quant", "int4"],
    "int8": ["--quant", "int8"],
    "int4-b64": ["--quant", "int4", "--no-transcode", "--block-size", "64", "--method", "gptq", "--untie-embeddings"],
}


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def ensure_bundles(names, log) -> None:
    from export.version import ensure_bundle

    for name in names:
        ensure_bundle(str(MODEL), BUNDLES / name, *EXPORT_ARGS[name.removeprefix("smollm2-")])


def heldout_kld(kind, target) -> float | None:
    """Held-out KLD against the float model on the same 1,530 tokens: a bundle's manifest figure, or the naive
    model's, measured once by bench/naive.py and kept beside it."""
    if kind == "edge":
        manifest = json.loads((BUNDLES / target[0] / "manifest.json").read_text())
        return ((manifest.get("fidelity") or {}).get("heldout") or {}).get("kl")
    cached = NAIVE / target / "fidelity.json"
    if not cached.is_file():
        log(f"held-out fidelity of the naive {target} model ...")
        p = subprocess.run([PY, str(ROOT / "bench/naive.py"), "fidelity", str(NAIVE / target), str(MODEL)],
                           capture_output=True, text=True, cwd=ROOT, check=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(p.stdout.strip().splitlines()[-1])
        tmp.replace(cached)
    return json.loads(cached.read_text())["kl"]


def ensure_naive(log) -> None:
    if (NAIVE / "int4").is_dir() and (NAIVE / "int8").is_dir():
        return
    hf = ROOT / "build/smollm2-hf"
    if not (hf / "config.json").is_file():
        log("writing the float model as a Hugging Face folder ...")
        code = (
            "from export.sources import load_source; from export.sources.hf import save_hf_folder;"
            f"save_hf_folder(load_source({str(MODEL)!r}), {str(hf)!r})"
        )
        subprocess.run([PY, "-c", code], check=True, cwd=ROOT)
    log("preparing the naive path (optimum export + onnxruntime.quantization) ...")
    subprocess.run([PY, str(ROOT / "bench/naive.py"), "prepare", str(hf), str(NAIVE)], check=True, cwd=ROOT)


def command(kind, target, prompt_tokens, new_tokens, threads, context):
    common = ["--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--threads", str(threads),
              "--json"]
    if kind == "edge":
        bundle, backend = target
        return [PY, str(ROOT / "bench/run_one.py"), str(BUNDLES / bundle), "--backend", backend,
                "--context", str(context)] + common
    return [PY, str(ROOT / "bench/naive.py"), "run", str(NAIVE / target)] + common


def measure(cmd, runs, timeout) -> list[dict]:
    out = []
    env = dict(os.environ, OMP_NUM_THREADS="2")
    for _ in range(runs):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
        out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return out


def median(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--only", nargs="*", help="substrings of system labels to run")
    ap.add_argument("--numpy-new-tokens", type=int, default=24, help="fewer tokens for the slow NumPy rows")
    ap.add_argument("--json-out", default=str(ROOT / "reports/bench.json"))
    args = ap.parse_args(argv)

    systems = [s for s in SYSTEMS if not args.only or any(o in s[0] for o in args.only)]
    ensure_bundles(sorted({t[0] for _, k, t in systems if k == "edge"}), log)
    if any(k == "naive" for _, k, _ in systems):
        ensure_naive(log)
    kld = {label: heldout_kld(kind, target) for label, kind, target in systems}

    # Round-robin: run i of every system and scenario before run i+1 of any, so that a slow spell of a shared
    # machine lands on all of them alike and the ratios against the naive path stay fair.
    runs: dict = {}
    for i in range(args.runs):
        for label, kind, target in systems:
            for scen, (pt, nt) in SCENARIOS.items():
                if kind == "edge" and target[1] == "numpy":
                    nt = args.numpy_new_tokens
                log(f"[{time.strftime('%H:%M:%S')}] run {i + 1}/{args.runs} {label}: {scen} prompt "
                    f"({pt} + {nt} tokens)")
                cmd = command(kind, target, pt, nt, args.threads, args.context)
                runs.setdefault(label, {}).setdefault(scen, []).extend(measure(cmd, 1, timeout=1800))
    results = {label: {scen: {k: median(rs, k) for k in rs[0]} for scen, rs in row.items()}
               for label, row in runs.items()}
    for label in results:
        results[label]["heldout_kld"] = kld[label]

    print_table(results, args)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


def print_table(results, args) -> None:
    base = results.get("naive int4 (optimum + MatMulNBits RTN)")
    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, context {args.context}, median of {args.runs} fresh "
          f"processes each")
    head = ("system", "decode tok/s (short)", "decode tok/s (500-tok prompt)", "prefill tok/s (500)",
            "peak RSS MB (500+128)", "peak RSS MB (short)", "load s", "bundle MB", "held-out KLD")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, row in results.items():
        s, lg = row["short"], row["long"]
        print(f"| {label} | {fmt(s['decode_tps'])} | {fmt(lg['decode_tps'])} | {fmt(lg['prefill_tps'])} | "
              f"{fmt(lg['peak_rss_mb'])} | {fmt(s['peak_rss_mb'])} | {fmt(s['load_s'], 2)} | "
              f"{fmt(s['bundle_mb'])} | {fmt(row.get('heldout_kld'), 4)} |")
    if base:
        print("\nratios against the naive int4 path (same run):")
        for label, row in results.items():
            if label.startswith("edge"):
                d = row["short"]["decode_tps"] / base["short"]["decode_tps"]
                m = row["long"]["peak_rss_mb"] / base["long"]["peak_rss_mb"]
                print(f"  {label}: decode (short) {d:.2f}x, peak RSS (500+128) {m:.2f}x, "
                      f"load {row['short']['load_s']:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
