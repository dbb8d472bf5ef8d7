"""`make bench`: this runtime's recipes beside its peers (onnxruntime-genai, llama.cpp) on SmolLM2-135M, 2 threads.

Every figure is the median of several fresh processes (peak RSS is the VmHWM of a process that only loads and
generates), taken round-robin over the systems, and ratios are taken against the peers measured in the same run,
since absolute times drift on a shared machine. The fidelity columns are every system's figures on the
exporter's evaluation domains (export.quality.eval_domains) against the same float model. Writes reports/bench.json and
the speed-vs-KLD plot reports/bench.png.
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

import peers

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MODEL = ROOT / "cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLES = ROOT / "bundles"
NAIVE = ROOT / "build/naive"

# (label, kind, target): kind "edge" runs bench/run_one.py on a bundle, "peer" bench/peer_run.py in the peer's
# env (bench/peers.py), "naive" bench/naive.py on a model.
DEFAULT_LABEL = "edge q4 (default)"
SYSTEMS = [
    (DEFAULT_LABEL, "edge", ("smollm2-q4", "ort")),
    ("edge exact", "edge", ("smollm2-exact", "ort")),
    ("edge q4 b64 gptq untied", "edge", ("smollm2-q4-b64", "ort")),
    ("edge q8", "edge", ("smollm2-q8", "ort")),
    ("onnxruntime-genai int4", "peer", "genai"),
    ("llama.cpp Q4_1", "peer", "llama"),
]
EXTRA_SYSTEMS = [  # --with-extra
    ("naive int4 (optimum + MatMulNBits RTN)", "naive", "int4"),
    ("edge q4 (numpy)", "edge", ("smollm2-q4", "numpy")),
]
SCENARIOS = {"short": (16, 128), "long": (500, 128)}  # prompt tokens, new tokens
# bundle name (after "smollm2-") -> edge-export arguments.
# q4: the default recipe; SmolLM2's Q4_1 layers transcoded exactly (float offsets, an extra small matmul each),
# the tied embedding / lm_head int8. exact: every GGUF block as it is (the Q8_0 lm_head in blocks of 32).
# q4-b64: integer zero points only, blocks of 64, rounded by GPTQ, the tied lm_head stored apart at int4: no
# offsets matmul and fewer bytes, so it is fast; the fidelity columns show what re-quantizing the Q4_1 grid costs.
EXPORT_ARGS = {
    "q4": ["--recipe", "q4"],
    "exact": ["--recipe", "exact"],
    "q8": ["--recipe", "q8"],
    "q4-b64": ["--recipe", "q4", "--no-transcode", "--block-size", "64", "--method", "gptq", "--untie-embeddings"],
}


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def ensure_bundles(names, log) -> None:
    from export.version import ensure_bundle

    for name in names:
        ensure_bundle(str(MODEL), BUNDLES / name, *EXPORT_ARGS[name.removeprefix("smollm2-")])


def fidelity_of(kind, target, peer_envs, threads) -> dict:
    """{"heldout": pooled figures, "domains": {name: figures}} on the evaluation domains: a bundle's manifest
    entry, or a peer's measured on the same windows (bench/peers.py)."""
    if kind == "edge":
        manifest = json.loads((BUNDLES / target[0] / "manifest.json").read_text())
        return manifest.get("fidelity") or {}
    if kind == "peer":
        return peers.peer_fidelity(target, MODEL, peer_envs, threads)
    return {"heldout": {"kl": heldout_kld(kind, target)}}


def heldout_kld(kind, target) -> float | None:
    """The naive model's held-out KLD on pydoc windows, measured once by bench/naive.py and kept beside it."""
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


def prompt_ids_file(prompt_tokens: int) -> Path:
    """The prompt every peer gets, as token ids: the same ids run_one.py gives a bundle."""
    from edge_runtime.format.bundle import Bundle
    from edge_runtime.memory.testing import text_prompt_ids
    from edge_runtime.tokenizer.tokenizer import Tokenizer

    path = ROOT / f"build/peers/prompt-{prompt_tokens}.json"
    if not path.is_file():
        tok = Tokenizer.from_bundle(Bundle.open(BUNDLES / "smollm2-q4"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(text_prompt_ids(tok, prompt_tokens)))
    return path


def command(kind, target, prompt_tokens, new_tokens, threads, context, peer_envs=None):
    common = ["--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--threads", str(threads),
              "--json"]
    if kind == "peer":
        python = peers.env_python(target, peer_envs or {})
        model = peers.model_of(target, MODEL, python, threads)
        return peers.speed_command(target, python, model, prompt_ids_file(prompt_tokens), new_tokens, threads,
                                   context)
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
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--only", nargs="*", help="substrings of system labels to run")
    ap.add_argument("--with-extra", action="store_true", help="also the naive path and the NumPy backend")
    ap.add_argument("--peer-env", action="append", default=[], metavar="PEER=DIR",
                    help="reuse an existing virtual env for a peer (llama, genai) instead of build/peers/env-PEER")
    ap.add_argument("--no-fidelity", action="store_true", help="speed and memory only (no peer fidelity runs)")
    ap.add_argument("--numpy-new-tokens", type=int, default=24, help="fewer tokens for the slow NumPy rows")
    ap.add_argument("--json-out", default=str(ROOT / "reports/bench.json"))
    args = ap.parse_args(argv)
    peer_envs = dict(kv.split("=", 1) for kv in args.peer_env)

    systems = [s for s in SYSTEMS + (EXTRA_SYSTEMS if args.with_extra else [])
               if not args.only or any(o in s[0] for o in args.only)]
    ensure_bundles(sorted({t[0] for _, k, t in systems if k == "edge"} | {"smollm2-q4"}), log)
    if any(k == "naive" for _, k, _ in systems):
        ensure_naive(log)
    fidelity = {label: {} if args.no_fidelity and kind != "edge" else fidelity_of(kind, target, peer_envs, args.threads)
                for label, kind, target in systems}

    # Round-robin: run i of every system and scenario before run i+1 of any, so that a slow spell of a shared
    # machine lands on all of them alike and the ratios against the peers stay fair.
    runs: dict = {}
    for i in range(args.runs):
        for label, kind, target in systems:
            for scen, (pt, nt) in SCENARIOS.items():
                if kind == "edge" and target[1] == "numpy":
                    nt = args.numpy_new_tokens
                log(f"[{time.strftime('%H:%M:%S')}] run {i + 1}/{args.runs} {label}: {scen} prompt "
                    f"({pt} + {nt} tokens)")
                cmd = command(kind, target, pt, nt, args.threads, args.context, peer_envs)
                runs.setdefault(label, {}).setdefault(scen, []).extend(measure(cmd, 1, timeout=1800))
    results = {label: {scen: {k: median(rs, k) for k in rs[0] if not isinstance(rs[0][k], str)}
                       for scen, rs in row.items()}
               for label, row in runs.items()}
    for label in results:
        results[label]["fidelity"] = fidelity[label]

    print_table(results, args)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(results, indent=2))
    png = Path(args.json_out).with_suffix(".png")
    plot(results, png)
    print(f"\nwrote {args.json_out} and {png}")
    return 0


def worst(fid: dict) -> tuple[str, dict]:
    domains = fid.get("domains") or {"pooled": fid.get("heldout") or {}}
    return max(domains.items(), key=lambda kv: kv[1].get("kl") or 0.0)


def fid_cell(d: dict) -> str:
    if d.get("kl") is None:
        return "-"
    top1 = d.get("top1")
    return f"{d['kl']:.4f}" + ("" if top1 is None else f" / {100 * top1:.1f}%")


def print_table(results, args) -> None:
    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, context {args.context}, median of {args.runs} fresh "
          f"processes each, round-robin")
    domains = sorted({n for row in results.values() for n in (row["fidelity"].get("domains") or {})})
    head = ("system", "decode tok/s (16-tok prompt)", "decode tok/s (500-tok prompt)", "prefill tok/s (500)",
            "peak RSS MB (500+128)", "load s", "KLD / top-1 pooled", "worst domain",
            *[f"{d} KLD / top-1" for d in domains])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, row in results.items():
        s, lg, fid = row["short"], row["long"], row["fidelity"]
        name, w = worst(fid)
        cells = [fid_cell((fid.get("domains") or {}).get(d) or {}) for d in domains]
        print(f"| {label} | {fmt(s['decode_tps'])} | {fmt(lg['decode_tps'])} | {fmt(lg['prefill_tps'])} | "
              f"{fmt(lg['peak_rss_mb'])} | {fmt(s['load_s'], 2)} | {fid_cell(fid.get('heldout') or {})} | "
              f"{name} {fid_cell(w)} | " + " | ".join(cells) + " |")
    ours = results.get(DEFAULT_LABEL)
    if not ours:
        return
    print("\nthe default recipe against the peers (same run):")
    for peer in ("onnxruntime-genai int4", "llama.cpp Q4_1"):
        p = results.get(peer)
        if not p:
            continue
        print(f"  vs {peer}: decode {ours['short']['decode_tps'] / p['short']['decode_tps']:.2f}x (16-tok prompt), "
              f"{ours['long']['decode_tps'] / p['long']['decode_tps']:.2f}x (500-tok prompt); peak RSS "
              f"{ours['long']['peak_rss_mb'] / p['long']['peak_rss_mb']:.2f}x; load "
              f"{ours['short']['load_s']:.2f} s vs {p['short']['load_s']:.2f} s")


def plot(results, path: Path) -> None:
    """Decode speed (16-token prompt) against the worst domain's KLD, one point per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, row in results.items():
        kl = worst(row["fidelity"])[1].get("kl")
        if kl is None:
            continue
        ax.scatter([kl], [row["short"]["decode_tps"]], s=40)
        ax.annotate(label, (kl, row["short"]["decode_tps"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("KLD from the float model, worst evaluation domain (log)")
    ax.set_ylabel("decode tok/s, 16-token prompt, 2 threads")
    ax.set_title("SmolLM2-135M-Instruct: speed vs fidelity (same run)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
