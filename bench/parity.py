"""NumPy backend vs ONNX Runtime backend on the same bundles: the parity figures of issue #5.

For each bundle, both backends run its reference.json inputs (edge_runtime/verify.py): the probe window
(logits of every position from an empty cache) and the chat prompts (greedy decoding of --steps tokens, EOS
ignored). Printed per bundle: top-1 agreement on the probe window, max and mean |logit diff|, the top-2 gap
of ORT's logits at the positions where top-1 differs, and the greedy common prefix per prompt.

    .venv/bin/python bench/parity.py bundles/smollm2-int8 bundles/smollm2-int4 [--threads 2] [--json]

Reading the figures: a graph with accuracy_level 0 (fp32 activations) is a continuous function, and the two
backends agree to float rounding. At accuracy_level 4 MatMulNBits rounds every activation to int8, so a
one-ulp difference anywhere flips some rounding and the flips compound over the layers: the top-1 agreement
there is bounded by how often the model's top-2 gap is that small, not by a kernel error (see --compare-to, and
--self-check: ONNX Runtime's own prefill and decode kernels disagree as much).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def logits_parity(a: np.ndarray, b: np.ndarray) -> dict:
    """Figures of logits a against reference logits b, both [T, vocab]."""
    agree = a.argmax(-1) == b.argmax(-1)
    top2 = np.sort(b, axis=-1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    return {"positions": int(agree.size), "top1": float(agree.mean()),
            "max_abs_diff": float(np.abs(a - b).max()), "mean_abs_diff": float(np.abs(a - b).mean()),
            "gap_at_disagreements": [round(float(g), 3) for g in gap[~agree]]}


def backends_for(path: str, threads: int, context: int):
    from edge_runtime.backends.numpy_backend import NumpyBackend
    from edge_runtime.backends.ort import OrtBackend
    from edge_runtime.bundle import Bundle

    bundle = Bundle.open(path)
    return bundle, OrtBackend(bundle, context, threads=threads), NumpyBackend(bundle, context, threads=threads)


def parity(path: str, threads: int = 2, steps: int = 32) -> dict:
    """The parity figures of one bundle (see the module docstring)."""
    from edge_runtime.bundle import Bundle
    from edge_runtime.verify import all_logits, greedy_ids

    reference = Bundle.open(path).read_json("reference.json")
    probe, prompts = reference["probe"]["ids"], reference.get("prompts", [])
    context = max([len(probe)] + [len(p["ids"]) + steps for p in prompts])
    bundle, ort, ours = backends_for(path, threads, context)
    graph = bundle.manifest.get("graph") or {}
    out = {"bundle": path, "accuracy_level": graph.get("accuracy_level", 0),
           "kv_dtype": graph.get("kv_dtype", "float32")}
    theirs = all_logits(ort, probe)
    out.update(logits_parity(all_logits(ours, probe), theirs))
    out["greedy_prefix"] = [common_prefix(greedy_ids(ours, p["ids"], steps), greedy_ids(ort, p["ids"], steps))
                            for p in prompts]
    out["greedy_steps"] = steps
    return out


def compare_to(path: str, other: str, threads: int = 2) -> dict:
    """ORT on `path` against ORT on `other` (e.g. the same weights at accuracy_level 0) on the probe window:
    how far int8 activations alone move the logits, the scale the NumPy-vs-ORT figures should be read on."""
    from edge_runtime.backends.ort import OrtBackend
    from edge_runtime.bundle import Bundle
    from edge_runtime.verify import all_logits

    a, b = Bundle.open(path), Bundle.open(other)
    probe = a.read_json("reference.json")["probe"]["ids"]
    la = all_logits(OrtBackend(a, len(probe), threads=threads), probe)
    lb = all_logits(OrtBackend(b, len(probe), threads=threads), probe)
    return {"bundle": path, "against": other, **logits_parity(la, lb)}


def self_check(path: str, threads: int = 2) -> dict:
    """ORT against ORT on the probe window: one prefill (MatMulNBits' M>1 kernels) vs one token at a time (its
    M=1 kernels), both exact executions of the same graph; the floor any other executor is judged against."""
    from edge_runtime.backends.ort import OrtBackend
    from edge_runtime.bundle import Bundle
    from edge_runtime.verify import all_logits, stepwise_logits

    bundle = Bundle.open(path)
    probe = bundle.read_json("reference.json")["probe"]["ids"]
    ort = OrtBackend(bundle, len(probe), threads=threads)
    return {"bundle": path, **logits_parity(stepwise_logits(ort, probe), all_logits(ort, probe))}


def line(r: dict) -> str:
    greedy = " ".join(f"{g}/{r['greedy_steps']}" for g in r["greedy_prefix"])
    return (f"{r['bundle']}: accuracy_level {r['accuracy_level']}, kv {r['kv_dtype']}: top-1 agreement "
            f"{100 * r['top1']:.1f}% of {r['positions']} probe positions, max |logit diff| "
            f"{r['max_abs_diff']:.2e}, mean {r['mean_abs_diff']:.2e}, greedy common prefix {greedy}"
            + (f", ORT top-2 gap where top-1 differs: {r['gap_at_disagreements']}"
               if r["gap_at_disagreements"] else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32, help="greedy tokens per reference prompt")
    ap.add_argument("--compare-to", metavar="BUNDLE",
                    help="also print ORT on the first bundle vs ORT on this one (e.g. its accuracy_level 0 twin)")
    ap.add_argument("--self-check", action="store_true",
                    help="also print ORT one-token steps vs ORT one prefill on each bundle's probe window")
    ap.add_argument("--json", action="store_true", help="one JSON object per bundle instead of a line")
    args = ap.parse_args(argv)
    for path in args.bundles:
        r = parity(path, args.threads, args.steps)
        print(json.dumps(r) if args.json else line(r), flush=True)
        if args.self_check:
            r = self_check(path, args.threads)
            print(json.dumps(r) if args.json else
                  f"  ORT one token at a time vs ORT one prefill: top-1 agreement {100 * r['top1']:.1f}%, "
                  f"max |logit diff| {r['max_abs_diff']:.2e}, mean {r['mean_abs_diff']:.2e}", flush=True)
    if args.compare_to:
        r = compare_to(args.bundles[0], args.compare_to, args.threads)
        print(json.dumps(r) if args.json else
              f"ORT {r['bundle']} vs ORT {r['against']}: top-1 agreement {100 * r['top1']:.1f}%, "
              f"max |logit diff| {r['max_abs_diff']:.2e}, mean {r['mean_abs_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
