"""NumPy backend vs ONNX Runtime backend on the same bundles: the parity figures of issue #5.

For each bundle, both backends run its reference.json inputs (edge_runtime/verify.py): the probe window
(logits of every position from an empty cache) and the chat prompts (greedy decoding of --steps tokens, EOS
ignored). Printed per bundle: top-1 agreement on the probe window, max and mean |logit diff|, the top-2 gap
of ORT's logits at the positions where top-1 differs, and the greedy common prefix per prompt.

    .venv/bin/python bench/parity.py bundles/smollm2-int8 bundles/smollm2-int4 [--threads 2] [--json]

Reading the figures: a graph with accuracy_level 0 (fp32 activations) is a continuous function, and the two
backends agree to float rounding. At accuracy_level 4 MatMulNBits rounds every activation to int8, so a
one-ulp difference anywhere flips some rounding and the flips compound over the layers: the top-1 agreement
there is bounded by how often the model's top-2 gap is that small, not by a kernel error. Two checks measure
that bound on the bundle itself:
  --self-check     ONNX Runtime against itself: one prefill vs one token at a time (its M>1 and M=1 kernels);
  --perturb-check  the NumPy backend against itself with one change of float rounding (RMSNorm's mean of
                   squares summed in float64 instead of float32: a one-ulp difference in the norm's output).
Any executor that is not bit for bit MLAS's kernels lands at that floor; --window N takes N tokens of held-out
text instead of the 128-position reference probe, for tighter figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
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


def probe_ids(bundle, window: int = 0) -> list[int]:
    """The ids every figure is taken on: the reference probe window, or `window` tokens of held-out text."""
    if not window:
        return bundle.read_json("reference.json")["probe"]["ids"]
    from edge_runtime.testing import text_prompt_ids
    from edge_runtime.tokenizer import Tokenizer

    return text_prompt_ids(Tokenizer.from_bundle(bundle), window)


def greedy_prompts(bundle, steps: int) -> list[dict]:
    """The reference prompts greedy figures are taken on (none when steps is 0)."""
    return bundle.read_json("reference.json").get("prompts", []) if steps > 0 else []


def _context(probe, prompts, steps: int) -> int:
    """Cache positions for the probe window and for every prompt plus its greedy steps."""
    return max([len(probe)] + [len(p["ids"]) + steps for p in prompts])


def backends_for(path: str, threads: int, context: int):
    from edge_runtime.backends.numpy_backend import NumpyBackend
    from edge_runtime.backends.ort import OrtBackend
    from edge_runtime.bundle import Bundle

    bundle = Bundle.open(path)
    return bundle, OrtBackend(bundle, context, threads=threads), NumpyBackend(bundle, context, threads=threads)


def parity(path: str, threads: int = 2, steps: int = 32, window: int = 0) -> dict:
    """The parity figures of one bundle (see the module docstring)."""
    from edge_runtime.bundle import Bundle
    from edge_runtime.verify import all_logits, greedy_ids

    bundle = Bundle.open(path)
    probe, prompts = probe_ids(bundle, window), greedy_prompts(bundle, steps)
    bundle, ort, ours = backends_for(path, threads, _context(probe, prompts, steps))
    graph = bundle.manifest.get("graph") or {}
    out = {"bundle": path, "accuracy_level": graph.get("accuracy_level", 0),
           "kv_dtype": graph.get("kv_dtype", "float32")}
    theirs = all_logits(ort, probe)
    out.update(logits_parity(all_logits(ours, probe), theirs))
    out["greedy_prefix"] = [common_prefix(greedy_ids(ours, p["ids"], steps), greedy_ids(ort, p["ids"], steps))
                            for p in prompts]
    out["greedy_steps"] = steps
    return out


def compare_to(path: str, other: str, threads: int = 2, window: int = 0) -> dict:
    """ORT on `path` against ORT on `other` (e.g. the same weights at accuracy_level 0) on the probe window:
    how far int8 activations alone move the logits, the scale the NumPy-vs-ORT figures should be read on."""
    from edge_runtime.backends.ort import OrtBackend
    from edge_runtime.bundle import Bundle
    from edge_runtime.verify import all_logits

    a, b = Bundle.open(path), Bundle.open(other)
    probe = probe_ids(a, window)
    la = all_logits(OrtBackend(a, len(probe), threads=threads), probe)
    lb = all_logits(OrtBackend(b, len(probe), threads=threads), probe)
    return {"bundle": path, "against": other, **logits_parity(la, lb)}


def greedy_after_steps(backend, prompt_ids, n: int) -> list[int]:
    """verify.greedy_ids with the prompt fed one token at a time instead of as one prefill."""
    import numpy as np

    from edge_runtime.verify import stepwise_logits

    out, past = [int(np.argmax(stepwise_logits(backend, prompt_ids)[-1]))], len(prompt_ids)
    while len(out) < n:
        logits = backend.forward(np.array(out[-1:], np.int64), past, np.zeros(1, np.int64))
        out.append(int(np.argmax(logits[-1])))
        past += 1
    return out


def self_check(path: str, threads: int = 2, window: int = 0, steps: int = 32) -> dict:
    """ORT against ORT: one prefill (MatMulNBits' M>1 kernels) vs one token at a time (its M=1 kernels), on the
    probe window and on the greedy prompts; both exact executions of the same graph."""
    from edge_runtime.backends.ort import OrtBackend
    from edge_runtime.bundle import Bundle
    from edge_runtime.verify import all_logits, greedy_ids, stepwise_logits

    bundle = Bundle.open(path)
    probe, prompts = probe_ids(bundle, window), greedy_prompts(bundle, steps)
    ort = OrtBackend(bundle, _context(probe, prompts, steps), threads=threads)
    greedy = [common_prefix(greedy_after_steps(ort, p["ids"], steps), greedy_ids(ort, p["ids"], steps))
              for p in prompts]
    return {"bundle": path, **logits_parity(stepwise_logits(ort, probe), all_logits(ort, probe)),
            "greedy_prefix": greedy, "greedy_steps": steps}


def _norm_float64(model, x, name):
    """LlamaForward.norm with the mean of squares summed in float64: the same function, rounded differently."""
    import numpy as np

    var = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True).astype(np.float32)
    return model.w.vector(name) * (x / np.sqrt(var + np.float32(model.eps)))


def perturb_check(path: str, threads: int = 2, window: int = 0, steps: int = 32) -> dict:
    """NumPy against NumPy, one of them with a one-ulp change of rounding (_norm_float64), on the probe window
    and the greedy prompts: how far such a change alone moves this bundle's graph."""
    from edge_runtime.backends.numpy_backend import NumpyBackend
    from edge_runtime.bundle import Bundle
    from edge_runtime.verify import all_logits, greedy_ids

    bundle = Bundle.open(path)
    probe, prompts = probe_ids(bundle, window), greedy_prompts(bundle, steps)
    context = _context(probe, prompts, steps)
    plain, changed = (NumpyBackend(bundle, context, threads=threads) for _ in range(2))
    changed.model.norm = types.MethodType(_norm_float64, changed.model)
    greedy = [common_prefix(greedy_ids(changed, p["ids"], steps), greedy_ids(plain, p["ids"], steps))
              for p in prompts]
    return {"bundle": path, **logits_parity(all_logits(changed, probe), all_logits(plain, probe)),
            "greedy_prefix": greedy, "greedy_steps": steps}


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
    ap.add_argument("--perturb-check", action="store_true",
                    help="also print NumPy vs NumPy with a one-ulp change of rounding on each bundle's probe window")
    ap.add_argument("--window", type=int, default=0, metavar="N",
                    help="take the probe figures on N tokens of held-out text (default: the reference probe)")
    ap.add_argument("--json", action="store_true", help="one JSON object per bundle instead of a line")
    args = ap.parse_args(argv)
    checks = [(args.self_check, self_check, "ORT one token at a time vs ORT one prefill (greedy: prompt stepped vs prefilled)"),
              (args.perturb_check, perturb_check, "NumPy with float64 RMSNorm sums vs NumPy")]
    for path in args.bundles:
        r = parity(path, args.threads, args.steps, args.window)
        print(json.dumps(r) if args.json else line(r), flush=True)
        for wanted, check, label in checks:
            if wanted:
                r = check(path, args.threads, args.window, args.steps)
                greedy = " ".join(f"{g}/{r['greedy_steps']}" for g in r["greedy_prefix"])
                print(json.dumps(r) if args.json else
                      f"  {label}: top-1 agreement {100 * r['top1']:.1f}% of {r['positions']}, "
                      f"max |logit diff| {r['max_abs_diff']:.2e}, mean {r['mean_abs_diff']:.2e}, "
                      f"greedy common prefix {greedy}", flush=True)
    if args.compare_to:
        r = compare_to(args.bundles[0], args.compare_to, args.threads, args.window)
        print(json.dumps(r) if args.json else
              f"ORT {r['bundle']} vs ORT {r['against']}: top-1 agreement {100 * r['top1']:.1f}%, "
              f"max |logit diff| {r['max_abs_diff']:.2e}, mean {r['mean_abs_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
