"""Gemma 3 270M against llama-cpp-python on the same GGUF file: decode tok/s (short and 500-token prompts) and
peak RSS at context 2048, fresh processes taken round-robin in one run, medians and ratios.

    .venv/bin/python bench/gemma_peer.py --bundle bundles/gemma3-exact [--runs 3]
llama-cpp-python runs from its own environment, the one bench/speed.py builds under build/peers on first use (or
--llama-python PATH); it is not a dependency of this project.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / "cache/models/gemma-3-270m-q4_k_m.gguf"
PROMPTS = (16, 500)
NEW_TOKENS = 128


def run(cmd: list[str]) -> dict:
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def commands(args, prompt: int) -> dict[str, list[str]]:
    common = ["--threads", str(args.threads), "--context", str(args.context), "--prompt-tokens", str(prompt),
              "--new-tokens", str(NEW_TOKENS)]
    return {
        "edge-runtime": [sys.executable, "bench/run_one.py", str(args.bundle), "--backend", args.backend, *common],
        "llama-cpp-python": [args.llama_python, "bench/llamacpp_run_one.py", str(args.gguf), *common],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--gguf", type=Path, default=GGUF)
    ap.add_argument("--llama-python", default=None, help="python of an env with llama-cpp-python "
                    "(default: build/peers/env-llama, built on first use)")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-fidelity", dest="fidelity", action="store_false",
                    help="skip the KLD / top-1 comparison with llama-cpp-python on the evaluation domains")
    args = ap.parse_args(argv)
    if args.llama_python is None:
        from peers import env_python  # bench/peers.py: this folder is on sys.path when run as a script

        args.llama_python = str(env_python("llama", {}))
    results: dict[tuple, list[dict]] = {}
    for _ in range(args.runs):  # round-robin: every system sees the same machine
        for prompt in PROMPTS:
            for system, cmd in commands(args, prompt).items():
                results.setdefault((system, prompt), []).append(run(cmd))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("decode_tps", "prefill_tps", "peak_rss_mb")}
           for k, v in results.items()}
    print(f"{'system':<18} {'prompt':>6} {'decode tok/s':>13} {'prefill tok/s':>14} {'peak RSS MB':>12}")
    for (system, prompt), m in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{system:<18} {prompt:>6} {m['decode_tps']:>13.1f} {m['prefill_tps']:>14.1f} {m['peak_rss_mb']:>12.0f}")
    for prompt in PROMPTS:
        ours, peer = med[("edge-runtime", prompt)], med[("llama-cpp-python", prompt)]
        print(f"prompt {prompt}: decode {ours['decode_tps'] / peer['decode_tps']:.2f}x llama-cpp-python, "
              f"peak RSS {ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x")
    if args.fidelity:
        print_fidelity(args)
    return 0


def print_fidelity(args) -> None:
    """KLD / top-1 against the float model per evaluation domain: the bundle's (its manifest, written by the
    export) beside llama-cpp-python's on the same windows (bench/peers.py, cached under build/peers)."""
    from peers import peer_fidelity

    manifest = json.loads((args.bundle / "manifest.json").read_text(encoding="utf-8"))
    ours = (manifest.get("fidelity") or {}).get("domains")
    if not ours:
        print(f"{args.bundle} has no held-out figures (exported with --no-eval): fidelity not compared")
        return
    env = Path(args.llama_python).parent.parent
    theirs = peer_fidelity("llama", args.gguf, {"llama": str(env)}, args.threads)["domains"]
    print(f"{'domain':<10} {'edge-runtime KLD / top-1':>26} {'llama-cpp-python KLD / top-1':>30}")
    for name, h in ours.items():
        t = theirs.get(name)
        peer = f"{t['kl']:.4f} / {100 * t['top1']:.1f}%" if t else "-"
        print(f"{name:<10} {h['kl']:>17.4f} / {100 * h['top1']:.1f}% {peer:>30}")


if __name__ == "__main__":
    sys.exit(main())
