"""Held-out evaluation of a written bundle against the float reference: the manifest's `fidelity` figures.

The float model (export.quality.reference.FloatReference) and the bundle (run by the runtime's own backend, logits of
every position through `logits_index`) score the same windows of held-out text; the figures are aggregated
over all scored positions. The bundle's figures on its own reference probes are recorded alongside, as the
baseline `edge-run verify` holds it to on device.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edge_runtime.errors import EdgeError
from edge_runtime.format.bundle import Bundle
from edge_runtime.quality.fidelity import (
    FidelityReport,
    kl_divergence,
    perplexity,
    rms_top_prob_diff,
    top1_agreement,
)
from edge_runtime.quality.verify import probe_context, probe_report

WINDOWS = 6
WINDOW_TOKENS = 256

FloatLogits = Callable[[Sequence[int]], np.ndarray]  # ids [S] -> float32 logits [S, V]


@dataclass(frozen=True)
class EvalSet:
    """The scored windows of one evaluation domain; skip[i] leading rows of window i are context, not scored."""

    name: str
    source: str
    windows: list
    skip: tuple = ()


def read_eval_text(path: str) -> str:
    """The text of --eval-text FILE (one-line EdgeError when unreadable)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeError(f"cannot read --eval-text {path}: {e}") from None


def eval_sets(tok, encode_chat: Callable[[str], list[int]],
              greedy: Callable[[list[list[int]], int], list[list[int]]], eval_text: str | None = None) -> list[EvalSet]:
    """The evaluation domains (export.quality.eval_domains) as token windows of tokenizer `tok`, or --eval-text
    FILE's alone; the windows start with tok's BOS when it adds one (token_windows).

    greedy(prompts' ids, n): the float model's greedy replies, which make the chat domain's windows."""
    from . import eval_domains as D

    bos = window_bos(tok)
    if eval_text is not None:
        return [EvalSet(Path(eval_text).name, eval_text, token_windows(tok.encode(read_eval_text(eval_text)), bos=bos))]
    sets = [EvalSet(d.name, d.source, token_windows(tok.encode(d.text()), bos=bos)) for d in D.TEXT_DOMAINS]
    chat = D.chat_windows(encode_chat, greedy)
    prompt_lens = tuple(len(encode_chat(t)) - 1 for t in D.CHAT_PROMPTS)  # score from the last prompt token on
    chat_domain = next(d for d in D.DOMAINS if d.name == "chat")
    return sets + [EvalSet("chat", chat_domain.source, chat, prompt_lens)]


def window_bos(tok) -> int | None:
    """The id every window starts with: the BOS of a tokenizer that adds one, as every prompt in use does."""
    return tok.bos_token_id if tok.add_bos_token else None


def token_windows(ids: Sequence[int], n: int = WINDOWS, window: int = WINDOW_TOKENS,
                  phase: float = 0.0, bos: int | None = None) -> list[list[int]]:
    """n windows of `window` tokens spread evenly over ids, each starting `phase` of a stride in.

    Evaluation takes phase 0 and calibration (calibration_windows) phase 0.5 with the same n (or a multiple of
    it), so the two never share a token while len(ids) >= 2 * n * window. A text too short for n windows gives
    consecutive windows of what there is. With `bos` each window starts with it (its last token dropped), as
    llama.cpp's perplexity chunks do: a model that always sees BOS at position 0 (Gemma's attention sink) is not
    measured without it.
    """
    return [w if bos is None or w[0] == bos else [int(bos)] + w[:-1] for w in _windows(ids, n, window, phase)]


def _windows(ids: Sequence[int], n: int, window: int, phase: float) -> list[list[int]]:
    ids = [int(t) for t in ids]
    if len(ids) < 2:
        raise EdgeError(f"evaluation text is too short ({len(ids)} tokens)")
    if len(ids) < n * window:
        chunks = [ids[i:i + window] for i in range(0, len(ids), window)][:n]
        return [w for w in chunks if len(w) >= 2]
    stride = len(ids) // n
    starts = [min(i * stride + int(phase * stride), len(ids) - window) for i in range(n)]
    return [ids[s:s + window] for s in starts]


def calibration_windows(ids: Sequence[int], k: int = 1, bos: int | None = None) -> list[list[int]]:
    """k windows from the middle of the calibration text's phase-0.5 windows (eval_domains.calibration_text).

    More than WINDOWS come from a grid WINDOWS times r as fine (r whole): its phase-0.5 windows still fall
    between the phase-0 windows of WINDOWS, so calibration and an evaluation of the same text stay disjoint."""
    n = WINDOWS * -(-k // WINDOWS)                                       # k rounded up to a multiple of WINDOWS
    windows = token_windows(ids, n, WINDOW_TOKENS, phase=0.5, bos=bos)
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
                   windows: Sequence[Sequence[int]], skip: Sequence[int] = ()) -> FidelityReport:
    """Every figure over all windows' next-token positions (row t of a window scores its token t+1), the first
    skip[i] rows of window i left out."""
    n = kl = top1 = sq = nll_p = nll_q = 0.0
    for i, ids in enumerate(windows):
        s = skip[i] if i < len(skip) else 0
        p = float_logits(ids)[s:-1]                                    # [T, V]: scored rows with a next token
        q = bundle_logits(ids)[s:-1]
        t, targets = len(p), list(ids[s + 1:])
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


def pooled(reports: Sequence[FidelityReport]) -> FidelityReport:
    """The figures over all positions of several reports (each a position-weighted mean; PPL by its log)."""
    n = sum(r.positions for r in reports)
    mean = lambda f: sum(f(r) * r.positions for r in reports) / n  # noqa: E731
    ppl_p = float(np.exp(mean(lambda r: np.log(r.ppl_float))))
    ppl_q = float(np.exp(mean(lambda r: np.log(r.ppl_quant))))
    return FidelityReport(positions=int(n), kl=mean(lambda r: r.kl), kl_method="full", top1=mean(lambda r: r.top1),
                          rms_top_prob_diff=float(np.sqrt(mean(lambda r: r.rms_top_prob_diff ** 2))),
                          ppl_float=ppl_p, ppl_quant=ppl_q, ppl_ratio=ppl_q / ppl_p)


def evaluate_domains(float_logits: FloatLogits, model_logits: FloatLogits, sets: Sequence[EvalSet]) -> dict:
    """{"heldout": pooled over every domain's positions, "domains": {name: figures + source}}; each window is
    run once by each model."""
    reports = [heldout_report(float_logits, model_logits, es.windows, es.skip) for es in sets]
    domains = {es.name: {**r.to_dict(), "source": es.source, "windows": len(es.windows)}
               for es, r in zip(sets, reports)}
    windows = [w for es in sets for w in es.windows]
    return {"heldout": {**pooled(reports).to_dict(), "text": "+".join(es.name for es in sets),
                        "windows": len(windows), "window_tokens": max(len(w) for w in windows)},
            "domains": domains}


def evaluate_bundle(bundle_dir, float_logits: FloatLogits, sets: Sequence[EvalSet], backend: str = "ort",
                    threads: int = 1) -> dict:
    """The manifest's `fidelity` entry of a written bundle: held-out figures per domain and pooled, and the
    verify baseline.

    {"heldout": FidelityReport pooled over the domains, "domains": {name: FidelityReport + source}, "probe":
    FidelityReport on reference.json (when the bundle has one), "backend": name, "accuracy_level": MatMulNBits
    activation precision of the graph}
    """
    from edge_runtime.quality.verify import all_logits

    bundle = Bundle.open(bundle_dir, verify=False)
    reference = None
    if (bundle.manifest.get("reference") or {}).get("file"):
        reference = bundle.read_json(bundle.manifest["reference"]["file"])
    windows = [w for es in sets for w in es.windows]
    context = max([len(w) for w in windows] + ([probe_context(reference)] if reference else []))
    name, engine = open_backend(bundle, context, backend, threads)
    out = {**evaluate_domains(float_logits, lambda ids: all_logits(engine, ids), sets),
           "backend": name, "accuracy_level": bundle.manifest.get("graph", {}).get("accuracy_level")}
    if reference is not None:
        out["probe"] = probe_report(engine, reference).to_dict()
    return out


def worst_domain(fidelity: dict) -> tuple[str, dict]:
    """(name, figures) of the domain with the largest KLD (the pooled figures when there are no domains)."""
    domains = fidelity.get("domains") or {"held-out": fidelity["heldout"]}
    return max(domains.items(), key=lambda kv: kv[1]["kl"])


def summary(fidelity: dict) -> str:
    """One line for the export log."""
    h = fidelity["heldout"]
    line = (f"fidelity vs float on {h['positions']} held-out tokens: KLD {h['kl']:.4f}, "
            f"top-1 {100 * h['top1']:.1f}%, PPL ratio {h['ppl_ratio']:.3f}")
    for name, d in (fidelity.get("domains") or {}).items():
        line += f"; {name} {d['kl']:.4f} / {100 * d['top1']:.1f}%"
    probe = fidelity.get("probe")
    if probe and probe.get("greedy_prefix"):
        line += f", greedy prefix {sum(probe['greedy_prefix'])}/{sum(probe['greedy_tokens'])}"
    return line
