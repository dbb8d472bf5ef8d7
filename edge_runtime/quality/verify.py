"""Re-running a bundle's stored float-reference probes and comparing with its export baseline (`edge-run verify`;
the two backends against each other instead: edge_runtime/quality/cross_check.py, `edge-run cross-check`).

reference.json (written at export) holds the float model's top-k log-probs on a probe window and its greedy
continuations of a few chat prompts. The bundle runs the same inputs here, and the figures are checked against
the ones the exporter measured on the same bundle (manifest `fidelity.probe`), within TOLERANCES: a broken
kernel, an altered weights file or a runtime regression shows up as a metric past its limit.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import BundleError
from ..format.bundle import Bundle
from ..sessions.state import common_prefix
from .fidelity import FidelityReport, compare_topk

# metric -> (relative, absolute) slack on the export baseline. Another CPU or backend rounds differently
# (MatMulNBits' int8 activations, NumPy vs ORT), so a healthy bundle drifts a little; a damaged one does not
# stay within these. greedy_prefix compares the total common prefix over the reference prompts.
TOLERANCES = {
    "kl": (0.5, 0.01),            # kl <= base * 1.5 + 0.01 nats
    "top1": (0.0, 0.05),          # top1 >= base - 0.05
    "ppl_ratio": (0.05, 0.02),    # ppl_ratio <= base * 1.05 + 0.02
    "greedy_prefix": (0.5, 0.0),  # total prefix >= base * 0.5
}
# Without an export baseline (older bundle): limits any usable quantization meets.
ABSOLUTE_LIMITS = {"kl": 0.5, "top1": 0.6, "ppl_ratio": 1.5}


@dataclass
class Check:
    metric: str
    value: float
    limit: float
    higher_is_better: bool
    baseline: float | None = None

    @property
    def ok(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        base = "" if self.baseline is None else f"export {fmt_metric(self.metric, self.baseline)}, "
        status = "ok" if self.ok else "FAIL"
        return (f"  {self.metric:<14}{fmt_metric(self.metric, self.value):>10}  "
                f"({base}limit {op} {fmt_metric(self.metric, self.limit)})  {status}")


@dataclass
class VerifyResult:
    """The probe figures of a bundle, the export baseline they were held to, and each check."""

    bundle: str
    backend: str
    report: FidelityReport
    baseline: FidelityReport | None
    checks: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.metric for c in self.checks if not c.ok]


def fmt_metric(metric: str, v: float) -> str:
    if metric == "top1":
        return f"{100 * v:.1f}%"
    if metric == "greedy_prefix":
        return f"{v:.0f}"
    return f"{v:.4f}"


# -- running the probes --------------------------------------------------------------------------------------


def all_logits(backend, ids: Sequence[int]) -> np.ndarray:
    """float32 [S, vocab] logits of every position of `ids`, from an empty cache."""
    ids = np.asarray(ids, dtype=np.int64)
    return backend.forward(ids, 0, np.arange(len(ids), dtype=np.int64))


def stepwise_logits(backend, ids: Sequence[int]) -> np.ndarray:
    """float32 [S, vocab]: the same as all_logits, computed one token at a time (the decode path's kernels)."""
    ids = np.asarray(ids, dtype=np.int64)
    first = np.zeros(1, np.int64)
    return np.concatenate([backend.forward(ids[i:i + 1], i, first) for i in range(len(ids))])


def greedy_ids(backend, prompt_ids: Sequence[int], n: int) -> list[int]:
    """n argmax tokens after prompt_ids (no early stop: the reference's length decides)."""
    ids = np.asarray(prompt_ids, dtype=np.int64)
    logits = backend.forward(ids, 0, np.array([len(ids) - 1], np.int64))
    out, past = [], len(ids)
    for _ in range(n):
        token = int(np.argmax(logits[-1]))
        out.append(token)
        if len(out) == n:
            break
        logits = backend.forward(np.array([token], np.int64), past, np.zeros(1, np.int64))
        past += 1
    return out


def forced_choices(backend, prompt_ids: Sequence[int], tokens: Sequence[int]) -> list[int]:
    """backend's argmax after prompt_ids + tokens[:i], for every i < len(tokens), in one prefill: where another
    executor's greedy run produced `tokens`, the common prefix of the two equals that of this backend's own
    greedy run (up to the first difference both see the same ids), without a decode call per token."""
    ids = np.asarray([*prompt_ids, *tokens[:-1]], dtype=np.int64)
    first = len(prompt_ids) - 1
    logits = backend.forward(ids, 0, np.arange(first, len(ids), dtype=np.int64))  # [len(tokens), vocab]
    return [int(t) for t in logits.argmax(-1)]


def probe_context(reference: dict, greedy_steps: int | None = None) -> int:
    """KV-cache size the probes need (greedy_steps: tokens decoded per prompt; default its reference's)."""
    lengths = [len(reference["probe"]["ids"])]
    lengths += [len(p["ids"]) + (len(p["greedy_ids"]) if greedy_steps is None else greedy_steps)
                for p in reference.get("prompts", [])]
    return max(lengths)


def reference_of(bundle: Bundle) -> dict:
    """The bundle's reference.json; a one-line error when it was exported without one."""
    ref_file = (bundle.manifest.get("reference") or {}).get("file")
    if not ref_file:
        raise BundleError(f"bundle {bundle.root} has no reference probes (exported with --no-reference)")
    reference = bundle.read_json(ref_file)
    if not _is_reference(reference, bundle.config.vocab_size, bundle.max_context):
        raise BundleError(f"bundle {bundle.root}: {ref_file} does not hold reference probes of this model")
    return reference


def _ids(x, vocab: int, limit: int) -> bool:
    return isinstance(x, list) and 0 < len(x) <= limit and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in x)


def _is_reference(ref, vocab: int, context: int) -> bool:
    """reference.json's shape: a probe window (ids, top-k ids and log-probs per position) and prompts with
    their greedy continuations, every id in the vocabulary and every sequence within the context."""
    probe = ref.get("probe") if isinstance(ref, dict) else None
    if not isinstance(probe, dict) or not _ids(probe.get("ids"), vocab, context):
        return False
    rows, lps = probe.get("top_ids"), probe.get("top_logprobs")
    if not (isinstance(rows, list) and isinstance(lps, list) and len(rows) == len(lps) == len(probe["ids"])):
        return False
    try:
        top = np.asarray(rows, dtype=np.int64)
        lp = np.asarray(lps, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return False
    if top.ndim != 2 or top.shape != lp.shape or top.size == 0 or top.min() < 0 or top.max() >= vocab:
        return False
    prompts = ref.get("prompts", [])
    return isinstance(prompts, list) and all(
        isinstance(p, dict) and _ids(p.get("ids"), vocab, context) and _ids(p.get("greedy_ids"), vocab, context)
        for p in prompts)


def probe_report(backend, reference: dict) -> FidelityReport:
    """The bundle's figures on reference.json: top-k KL / top-1 / PPL on the probe, greedy prefix per prompt."""
    probe = reference["probe"]
    ids = probe["ids"]
    top_ids = np.asarray(probe["top_ids"], dtype=np.int64)[:-1]          # [T-1, k]: rows with a next token
    top_lp = np.asarray(probe["top_logprobs"], dtype=np.float64)[:-1]
    q_logits = all_logits(backend, ids)[:-1]                              # [T-1, V]
    report = compare_topk(top_ids, top_lp, q_logits, targets=ids[1:],
                          ref_target_logprobs=probe.get("target_logprobs"))
    prompts = reference.get("prompts", [])
    report.greedy_prefix = [common_prefix(greedy_ids(backend, p["ids"], len(p["greedy_ids"])), p["greedy_ids"])
                            for p in prompts]
    report.greedy_tokens = [len(p["greedy_ids"]) for p in prompts]
    return report


# -- checking against the baseline ---------------------------------------------------------------------------


def checks_against(report: FidelityReport, baseline: FidelityReport | None) -> list[Check]:
    """One Check per metric: baseline-relative within TOLERANCES, or ABSOLUTE_LIMITS without a baseline."""
    checks = []
    for metric, higher in (("kl", False), ("top1", True), ("ppl_ratio", False)):
        value = getattr(report, metric)
        base = None if baseline is None else getattr(baseline, metric)
        if value is None:
            continue
        if base is None:
            checks.append(Check(metric, value, ABSOLUTE_LIMITS[metric], higher))
            continue
        rel, abs_ = TOLERANCES[metric]
        limit = base - abs_ if higher else base * (1 + rel) + abs_
        checks.append(Check(metric, value, limit, higher, base))
    if report.greedy_prefix and baseline is not None and baseline.greedy_prefix:
        base = float(sum(baseline.greedy_prefix))
        checks.append(Check("greedy_prefix", float(sum(report.greedy_prefix)),
                            base * TOLERANCES["greedy_prefix"][0], True, base))
    return checks


def baseline_of(manifest: dict) -> FidelityReport | None:
    probe = (manifest.get("fidelity") or {}).get("probe")
    return FidelityReport.from_dict(probe) if probe else None


def verify(bundle_path, backend: str = "auto", threads: int | None = None) -> VerifyResult:
    """Open the bundle (checksums checked), run its reference probes on `backend`, check against the baseline."""
    from .. import backends
    from ..threads import check_threads

    threads = check_threads(threads)
    bundle = Bundle.open(bundle_path, verify=True)
    reference = reference_of(bundle)
    name = backends.resolve(backend, bundle.contract)
    engine = backends.make_backend(name, bundle, min(probe_context(reference), bundle.max_context), threads)
    report = probe_report(engine, reference)
    baseline = baseline_of(bundle.manifest)
    return VerifyResult(str(bundle.root), name, report, baseline, checks_against(report, baseline))
