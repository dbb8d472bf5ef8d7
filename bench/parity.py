"""NumPy backend vs ONNX Runtime backend on the same bundles: the parity figures of issue #5.

For each bundle, both backends run the probe window (logits of every position from an empty cache: the
reference probe, or --window N tokens of held-out text) and the reference chat prompts (greedy decoding of
--steps tokens, EOS ignored), twice:
  exact graph    the bundle's weights with float32 activations and KV (graph.exact_graph, what
                 `edge-run verify --cross` checks): a continuous function, so the two agree to float rounding;
  default graph  MatMulNBits rounding every activation to int8 (accuracy_level 4): a one-ulp difference
                 anywhere flips some roundings and the flips compound over the layers, so the top-1 agreement
                 there is bounded by how often the model's top-2 gap is that small, not by a kernel error.
Printed for each: top-1 agreement, max and mean |logit diff|, the top-2 gap of ORT's logits where top-1
differs, the greedy common prefix per prompt. Three checks measure the default graph's floor on the bundle:
  --self-check     ONNX Runtime against itself: one prefill vs one token at a time (its M>1 and M=1 kernels);
  --perturb-check  the NumPy backend against itself with one change of float rounding (RMSNorm's mean of
                   squares summed in float64 instead of float32: a one-ulp difference in the norm's output);
  --compare-exact  ONNX Runtime's default graph against its exact graph: what the int8 activations move.

    .venv/bin/python bench/parity.py bundles/smollm2-int8 bundles/smollm2-int4 [--window 512] [--self-check]
    make parity    # the bench bundles (exported if missing or stale), 512 tokens, every check
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge_runtime.quality.agreement import compare_exact, parity, perturb_check, self_check  # noqa: E402


def figures(r: dict) -> str:
    greedy = " ".join(f"{g}/{r['greedy_steps']}" for g in r["greedy_prefix"]) or "-"
    gaps = r["gap_at_disagreements"]
    return (f"top-1 agreement {100 * r['top1']:.1f}% of {r['positions']}, max |logit diff| "
            f"{r['max_abs_diff']:.2e}, mean {r['mean_abs_diff']:.2e}, greedy common prefix {greedy}"
            + (f", ORT top-2 gap where top-1 differs: {gaps}" if gaps else ""))


CHECKS = {  # option -> (function, label)
    "self_check": (self_check, "ORT one token at a time vs ORT one prefill (greedy: prompt stepped vs prefilled)"),
    "perturb_check": (perturb_check, "NumPy with float64 RMSNorm sums vs NumPy"),
    "compare_exact": (compare_exact, "ORT default graph vs ORT exact graph"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*", help="bundle folders (default: the SmolLM2 bundles of bench/speed.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32, help="greedy tokens per reference prompt")
    ap.add_argument("--window", type=int, default=0, metavar="N",
                    help="take the probe figures on N tokens of held-out text (default: the reference probe)")
    ap.add_argument("--self-check", action="store_true", help="also ORT prefill vs ORT one token at a time")
    ap.add_argument("--perturb-check", action="store_true", help="also NumPy vs NumPy with one ulp changed")
    ap.add_argument("--compare-exact", action="store_true", help="also ORT default graph vs ORT exact graph")
    ap.add_argument("--json", action="store_true", help="one JSON object per figure line")
    args = ap.parse_args(argv)
    if not args.bundles:
        import speed as bench  # bench/speed.py: run as a script, this folder is on sys.path

        names = [f"smollm2-{n}" for n in bench.EXPORT_ARGS]
        bench.ensure_bundles(names, bench.log)
        args.bundles = [str(bench.BUNDLES / n) for n in names]
    for path in args.bundles:
        from edge_runtime.format.bundle import Bundle

        bundle = Bundle.open(path)
        runs = [("exact", True)] if bundle.exact_graph_file() else []
        if bundle.accuracy_level != 0:
            runs.append(("default", False))
        for name, exact in runs:
            r = parity(path, args.threads, args.steps, args.window, exact)
            print(json.dumps(r) if args.json else
                  f"{path} {name} graph (accuracy_level {r['accuracy_level']}, kv {r['kv_dtype']}), NumPy vs ORT: "
                  + figures(r), flush=True)
        for key, (check, label) in CHECKS.items():
            if getattr(args, key):
                r = check(path, args.threads, args.window, args.steps)
                print(json.dumps(r) if args.json else f"  {label}: " + figures(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
