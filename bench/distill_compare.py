"""Teacher vs distilled student as int4 bundles: bytes, decode speed and the student's KLD to the teacher (the part
of the distillation report that needs the exporter and the runtime). Run after
`python -m export.distill --out build/student`, which writes the per-domain report this script reprints.

Both bundles are quantized the same way (int4 search from float weights, --no-transcode), so the speed ratio
reflects the smaller model, not a different weight format.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def run_one(bundle: Path, threads: int) -> dict:
    p = subprocess.run([sys.executable, str(ROOT / "bench/run_one.py"), str(bundle), "--prompt-tokens", "16",
                        "--new-tokens", "128", "--threads", str(threads), "--json"],
                       capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(p.stdout.strip().splitlines()[-1])


def decode_tps(bundles: list[Path], runs: int, threads: int) -> list[tuple[float, float]]:
    """(median decode tok/s, MB) per bundle, the bundles' runs alternated so that drift hits them alike."""
    out = [[run_one(b, threads) for b in bundles] for _ in range(runs)]  # [runs][bundle]
    return [(statistics.median(r[i]["decode_tps"] for r in out), out[0][i]["bundle_mb"])
            for i in range(len(bundles))]


def main(argv=None) -> int:
    from export.version import ensure_bundle

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--student", default=str(ROOT / "build/student"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    common = ("--quant", "int4", "--no-eval")
    # the GGUF teacher re-quantized from its float weights like the student (which has no GGUF blocks to keep)
    teacher = ensure_bundle(str(MODEL), ROOT / "build/distill/teacher-int4", *common, "--no-transcode")
    student = ensure_bundle(args.student, ROOT / "build/distill/student-int4", *common)
    (t_tps, t_mb), (s_tps, s_mb) = decode_tps([teacher, student], args.runs, args.threads)
    report = Path(args.student) / "report.json"
    kld = "n/a"
    if report.is_file():
        from export.distill.report import format_report

        r = json.loads(report.read_text())
        print(format_report(r))
        kld = " / ".join(f"{name} {d['kld']:.3f}" for name, d in r["domains"].items())
    print(f"| int4 bundle | MB | decode tok/s (median of {args.runs}, {args.threads} threads) | x teacher | "
          "KLD to teacher (float student, per held-out domain) |")
    print("|---|---|---|---|---|")
    print(f"| teacher (30 layers) | {t_mb:.1f} | {t_tps:.1f} | 1.00 | 0 |")
    print(f"| student | {s_mb:.1f} | {s_tps:.1f} | {s_tps / t_tps:.2f} | {kld} |")
    print(f"student decodes {s_tps / t_tps:.2f}x the teacher's speed at {s_mb / t_mb:.2f}x the bytes "
          f"(bar: >= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
