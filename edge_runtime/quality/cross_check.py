"""`edge-run cross-check`: the NumPy backend and ONNX Runtime checked against each other on one bundle.

Both run the bundle's exact graph (Bundle.exact_graph_file: its weights with float32 activations and a float32
KV cache), a continuous function of the weights, so two correct executors agree to float rounding: the probe
window's logits differ by at most MAX_DIFF_REL of their scale, its top-1 agrees at >= TOP1_MIN of positions,
and every reference prompt decodes the same GREEDY_STEPS greedy tokens.

The default graph at accuracy_level 4 is not compared this way: MatMulNBits rounds every activation to int8 and
an ulp anywhere flips some roundings, which compound over the layers, so there two correct executors (or ONNX
Runtime's own prefill and one-token kernels) agree only statistically; bench/parity.py measures that floor.
The int8 rounding itself is checked kernel by kernel against MatMulNBits (tests/test_numpy_backend.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BundleError, EdgeError
from ..format.bundle import Bundle
from ..sessions.state import common_prefix
from .verify import all_logits, forced_choices, greedy_ids, probe_context, reference_of

TOP1_MIN = 0.99     # probe-window top-1 agreement between the two executors
GREEDY_STEPS = 32   # greedy tokens compared per reference prompt (EOS ignored)
# max |logit diff| <= MAX_DIFF_REL * max |ORT logit|: float rounding over 30 layers measures ~1e-5 of the
# scale (SmolLM2: 3e-4 on logits up to 39); a kernel 1% off on one matrix measures ~1e-3.
MAX_DIFF_REL = 5e-4


def logits_parity(a: np.ndarray, b: np.ndarray) -> dict:
    """Figures of logits a against reference logits b, both [T, vocab]: top-1 agreement, |diff|, and b's top-2
    gap at the positions where the top-1 differs (small gaps there mean rounding, large ones a bug)."""
    agree = a.argmax(-1) == b.argmax(-1)
    top2 = np.sort(b, axis=-1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    return {"positions": int(agree.size), "top1": float(agree.mean()), "ref_max_abs": float(np.abs(b).max()),
            "max_abs_diff": float(np.abs(a - b).max()), "mean_abs_diff": float(np.abs(a - b).mean()),
            "gap_at_disagreements": [round(float(g), 3) for g in gap[~agree]]}


def compare(a, b, probe, prompts, steps: int, a_logits=None, a_greedy=None) -> dict:
    """Backend a against backend b: logits_parity on the probe window, and the greedy common prefix of `steps`
    tokens per prompt: a decodes them one at a time, b is fed a's tokens (verify.forced_choices: one prefill per
    prompt, which costs b what a single decode step costs where its weights are dequantized per call).
    a_logits / a_greedy replace a's own runs (e.g. its one-token-at-a-time path)."""
    a_logits = all_logits(a, probe) if a_logits is None else a_logits
    a_greedy = a_greedy or (lambda ids: greedy_ids(a, ids, steps))
    prefix = []
    for p in prompts:
        tokens = a_greedy(p["ids"])
        prefix.append(common_prefix(tokens, forced_choices(b, p["ids"], tokens)))
    return {**logits_parity(a_logits, all_logits(b, probe)), "greedy_prefix": prefix, "greedy_steps": steps}


@dataclass
class CrossResult:
    bundle: str
    figures: dict  # compare(NumPy, ORT): logits_parity on the probe window, greedy_prefix per reference prompt

    @property
    def greedy_prefix(self) -> list:
        return self.figures["greedy_prefix"]

    @property
    def greedy_tokens(self) -> list:
        return [self.figures["greedy_steps"]] * len(self.greedy_prefix)

    @property
    def max_diff_limit(self) -> float:
        return MAX_DIFF_REL * self.figures["ref_max_abs"]

    @property
    def ok(self) -> bool:
        f = self.figures
        return (f["top1"] >= TOP1_MIN and f["max_abs_diff"] <= self.max_diff_limit
                and self.greedy_prefix == self.greedy_tokens)

    def lines(self) -> list[str]:
        f = self.figures
        greedy = " ".join(f"{a}/{b}" for a, b in zip(self.greedy_prefix, self.greedy_tokens))
        return [f"cross-check {self.bundle}: NumPy vs ONNX Runtime on the exact graph (float32 activations)",
                f"  top-1 agreement {100 * f['top1']:.1f}% of {f['positions']} probe positions "
                f"(limit >= {100 * TOP1_MIN:.0f}%)",
                f"  max |logit diff| {f['max_abs_diff']:.2e} (limit <= {self.max_diff_limit:.2e}: "
                f"{MAX_DIFF_REL:g} of the largest |logit|), mean {f['mean_abs_diff']:.2e}",
                f"  greedy common prefix per prompt: {greedy or '(no prompts)'} (limit: all)"]


def cross_check(bundle_path, threads: int = 2) -> CrossResult:
    """Run the bundle's reference probe window and prompts on both executors' exact graph; compare."""
    from ..backends import has_onnxruntime

    if not has_onnxruntime():
        raise EdgeError("cross-check compares the NumPy backend with ONNX Runtime, which is not installed "
                        "(verify --backend numpy checks the NumPy backend alone)")
    from ..backends.numpy.backend import NumpyBackend
    from ..backends.ort.llama import OrtBackend

    bundle = Bundle.open(bundle_path, verify=True)
    reference = reference_of(bundle)
    context = probe_context(reference, GREEDY_STEPS)
    if context > bundle.max_context:
        raise BundleError(f"bundle {bundle.root}: the cross-check needs a context of {context} tokens, "
                          f"more than its max_context {bundle.max_context}")
    ort = OrtBackend(bundle, context, threads=threads, float_activations=True)
    ours = NumpyBackend(bundle, context, threads=threads, float_activations=True)
    figures = compare(ours, ort, reference["probe"]["ids"], reference.get("prompts", []), GREEDY_STEPS)
    ours.close()
    return CrossResult(str(bundle.root), figures)
