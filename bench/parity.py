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
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge_runtime.parity import compare  # noqa: E402


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


def _inputs(path: str, window: int, steps: int):
    """bundle, probe ids, prompts and the KV context they need."""
    from edge_runtime.bundle import Bundle

    bundle = Bundle.open(path)
    probe, prompts = probe_ids(bundle, window), greedy_prompts(bundle, steps)
    return bundle, probe, prompts, max([len(probe)] + [len(p["ids"]) + steps for p in prompts])


def parity(path: str, threads: int = 2, steps: int = 32, window: int = 0, exact: bool = False) -> dict:
    """NumPy against ORT on one bundle's default graph, or on its exact graph (float32 activations)."""
    from edge_runtime.backends.numpy_backend import NumpyBackend
    from edge_runtime.backends.ort import OrtBackend

    bundle, probe, prompts, context = _inputs(path, window, steps)
    ort = OrtBackend(bundle, context, threads=threads, float_activations=exact)
    ours = NumpyBackend(bundle, context, threads=threads, float_activations=exact)
    level = 0 if exact else bundle.accuracy_level
    return {"bundle": path, "graph": "exact" if exact else "default", "accuracy_level": level,
            "kv_dtype": ort.kv_dtype, **compare(ours, ort, probe, prompts, steps)}


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
    """ORT against ORT on the default graph: one prefill (MatMulNBits' M>1 kernels) vs one token at a time (its
    M=1 kernels), on the probe window and on the greedy prompts; both exact executions of the same graph."""
    from edge_runtime.backends.ort import OrtBackend
    from edge_runtime.verify import stepwise_logits

    bundle, probe, prompts, context = _inputs(path, window, steps)
    ort = OrtBackend(bundle, context, threads=threads)
    return {"bundle": path, **compare(ort, ort, probe, prompts, steps, a_logits=stepwise_logits(ort, probe),
                                    a_greedy=lambda ids: greedy_after_steps(ort, ids, steps))}


def _norm_float64(model, x, name):
    """DecoderForward.norm with the mean of squares summed in float64: the same function, rounded differently."""
    import numpy as np

    var = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True).astype(np.float32)
    return model.w.vector(name) * (x / np.sqrt(var + np.float32(model.eps)))


def perturb_check(path: str, threads: int = 2, window: int = 0, steps: int = 32) -> dict:
    """NumPy against NumPy on the default graph, one of them with a one-ulp change of rounding (_norm_float64),
    on the probe window and the greedy prompts: how far such a change alone moves this bundle's graph."""
    from edge_runtime.backends.numpy_backend import NumpyBackend

    bundle, probe, prompts, context = _inputs(path, window, steps)
    plain, changed = (NumpyBackend(bundle, context, threads=threads) for _ in range(2))
    changed.model.norm = types.MethodType(_norm_float64, changed.model)
    return {"bundle": path, **compare(changed, plain, probe, prompts, steps)}


def compare_exact(path: str, threads: int = 2, window: int = 0, steps: int = 32) -> dict:
    """ORT's default graph against ORT's exact graph of the same bundle: the int8 activations' whole effect."""
    from edge_runtime.backends.ort import OrtBackend

    bundle, probe, prompts, context = _inputs(path, window, steps)
    default = OrtBackend(bundle, context, threads=threads)
    exact = OrtBackend(bundle, context, threads=threads, float_activations=True)
    return {"bundle": path, **compare(default, exact, probe, prompts, steps)}


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
    ap.add_argument("bundles", nargs="*", help="bundle folders (default: the SmolLM2 bundles of bench/bench.py)")
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
        import importlib.util

        # bench.py by path: run as a script, this folder is on sys.path and `bench` is that module, not the folder
        spec = importlib.util.spec_from_file_location("bench_main", Path(__file__).with_name("bench.py"))
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        names = [f"smollm2-{n}" for n in bench.EXPORT_ARGS]
        bench.ensure_bundles(names, bench.log)
        args.bundles = [str(bench.BUNDLES / n) for n in names]
    for path in args.bundles:
        from edge_runtime.bundle import Bundle

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
