"""Held-out evaluation of a written bundle against the float reference: the manifest's `fidelity` figures.

The float model (export.reference.FloatReference) and the bundle (run by the runtime's own backend, logits of
every position through `logits_index`) score the same windows of held-out text; the figures are aggregated
over all scored positions. The bundle's figures on its own reference probes are recorded alongside, as the
baseline `edge-run verify` holds it to on device.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np

from edge_runtime.bundle import Bundle
from edge_runtime.errors import EdgeError
from edge_runtime.fidelity import FidelityReport, kl_divergence, perplexity, rms_top_prob_diff, top1_agreement
from edge_runtime.verify import probe_context, probe_report

from .probes import probe_text

WINDOWS = 6
WINDOW_TOKENS = 256
DEFAULT_TEXT_NAME = "pydoc_data.topics"

FloatLogits = Callable[[Sequence[int]], np.ndarray]  # ids [S] -> float32 logits [S, V]


def default_eval_text() -> str:
    """CPython's pydoc topics (all of them but the probe's), in key order: held-out English + code."""
    from pydoc_data.topics import topics

    probe = probe_text()
    return "\n\n".join(topics[k] for k in sorted(topics) if topics[k] != probe)


def read_eval_text(path: str | None) -> tuple[str, str]:
    """(text, name) of --eval-text FILE, or of the default held-out text."""
    if path is None:
        return default_eval_text(), DEFAULT_TEXT_NAME
    try:
        return Path(path).read_text(encoding="utf-8"), Path(path).name
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeError(f"cannot read --eval-text {path}: {e}") from None


def token_windows(ids: Sequence[int], n: int = WINDOWS, window: int = WINDOW_TOKENS,
                  phase: float = 0.0) -> list[list[int]]:
    """n windows of `window` tokens spread evenly over ids, each starting `phase` of a stride in.

    Evaluation takes phase 0 and calibration (calibration_windows) phase 0.5 with the same n, so the two never
    share a token while len(ids) >= 2 * n * window. A text too short for n windows gives consecutive windows
    of what there is.
    """
    ids = [int(t) for t in ids]
    if len(ids) < 2:
        raise EdgeError(f"evaluation text is too short ({len(ids)} tokens)")
    if len(ids) < n * window:
        chunks = [ids[i:i + window] for i in range(0, len(ids), window)][:n]
        return [w for w in chunks if len(w) >= 2]
    stride = len(ids) // n
    starts = [min(i * stride + int(phase * stride), len(ids) - window) for i in range(n)]
    return [ids[s:s + window] for s in starts]


def calibration_windows(ids: Sequence[int], k: int = 1) -> list[list[int]]:
    """k windows from the middle of the default text's phase-0.5 windows: never scored by the evaluation."""
    windows = token_windows(ids, WINDOWS, WINDOW_TOKENS, phase=0.5)
    mid = max(0, len(windows) // 2 - k // 2)
    return windows[mid:mid + k]


def cached(fn: FloatLogits) -> FloatLogits:
    """Memoize float logits by window (the float model is the slow half of every evaluation)."""
    memo: dict[tuple, np.ndarray] = {}

    def logits(ids: Sequence[int]) -> np.ndarray:
        key = tuple(int(t) for t in ids)
        if key not in memo:
            memo[key] = fn(key)
        return memo[key]

    return logits


def heldout_report(float_logits: FloatLogits, bundle_logits: FloatLogits,
                   windows: Sequence[Sequence[int]]) -> FidelityReport:
    """Every figure over all windows' next-token positions (row t of a window scores its token t+1)."""
    n = kl = top1 = sq = nll_p = nll_q = 0.0
    for ids in windows:
        p = float_logits(ids)[:-1]                                     # [T, V]: rows with a next token
        q = bundle_logits(ids)[:-1]
        t, targets = len(p), list(ids[1:])
        n += t
        kl += kl_divergence(p, q) * t
        top1 += top1_agreement(p, q) * t
        sq += rms_top_prob_diff(p, q) ** 2 * t
        nll_p += np.log(perplexity(p, targets)) * t
        nll_q += np.log(perplexity(q, targets)) * t
    ppl_p, ppl_q = float(np.exp(nll_p / n)), float(np.exp(nll_q / n))
    return FidelityReport(positions=int(n), kl=kl / n, kl_method="full", top1=top1 / n,
                          rms_top_prob_diff=float(np.sqrt(sq / n)), ppl_float=ppl_p, ppl_quant=ppl_q,
                          ppl_ratio=ppl_q / ppl_p)


def open_backend(bundle: Bundle, context: int, backend: str = "ort", threads: int = 1):
    from edge_runtime import backends

    name = backends.resolve(backend, bundle.contract)
    return name, backends.make_backend(name, bundle, min(context, bundle.max_context), threads)


def evaluate_bundle(bundle_dir, float_logits: FloatLogits, windows: Sequence[Sequence[int]],
                    text_name: str = DEFAULT_TEXT_NAME, backend: str = "ort", threads: int = 1) -> dict:
    """The manifest's `fidelity` entry of a written bundle: held-out figures and the verify baseline.

    {"heldout": FidelityReport + text/windows, "probe": FidelityReport on reference.json (when the bundle has
    one), "backend": name, "accuracy_level": MatMulNBits activation precision of the graph}
    """
    from edge_runtime.verify import all_logits

    bundle = Bundle.open(bundle_dir, verify=False)
    reference = None
    if (bundle.manifest.get("reference") or {}).get("file"):
        reference = bundle.read_json(bundle.manifest["reference"]["file"])
    context = max([len(w) for w in windows] + ([probe_context(reference)] if reference else []))
    name, engine = open_backend(bundle, context, backend, threads)
    heldout = heldout_report(float_logits, lambda ids: all_logits(engine, ids), windows)
    out = {"heldout": {**heldout.to_dict(), "text": text_name, "windows": len(windows),
                       "window_tokens": max(len(w) for w in windows)},
           "backend": name, "accuracy_level": bundle.manifest.get("graph", {}).get("accuracy_level")}
    if reference is not None:
        out["probe"] = probe_report(engine, reference).to_dict()
    return out


def summary(fidelity: dict) -> str:
    """One line for the export log."""
    h = fidelity["heldout"]
    line = (f"fidelity vs float on {h['positions']} held-out tokens: KLD {h['kl']:.4f}, "
            f"top-1 {100 * h['top1']:.1f}%, PPL ratio {h['ppl_ratio']:.3f}")
    probe = fidelity.get("probe")
    if probe and probe.get("greedy_prefix"):
        line += f", greedy prefix {sum(probe['greedy_prefix'])}/{sum(probe['greedy_tokens'])}"
    return line
