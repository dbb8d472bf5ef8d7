"""How far a quantized model's next-token distributions are from the float reference (export and `verify`).

Conventions: `p` is the float (reference) model, `q` the quantized one; logits are [T, V] with row t scoring
the token at position t+1, so `targets[t]` is that token. All math runs in float64 from log-softmax, so
near-zero probabilities and large logits cannot overflow or lose the KL's small differences.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities over the last axis, shifted by the max so exp never overflows."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _logsumexp(a: np.ndarray) -> np.ndarray:
    """log(sum(exp(a))) over the last axis; -inf for an all -inf row."""
    m = a.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m + np.log(np.exp(a - m).sum(axis=-1, keepdims=True)))[..., 0]


def _xlogx_ratio(p: np.ndarray, log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """p * (log p - log q), with the 0 * log 0 = 0 convention."""
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (log_p - log_q), 0.0)


def _check_pair(p_logits: np.ndarray, q_logits: np.ndarray) -> None:
    if np.shape(p_logits) != np.shape(q_logits) or np.ndim(p_logits) != 2:
        raise ValueError(f"need two [T, V] logits, got {np.shape(p_logits)} and {np.shape(q_logits)}")


# -- from full logits ----------------------------------------------------------------------------------------


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(p || q) = sum_v p_v (log p_v - log q_v), in nats."""
    _check_pair(p_logits, q_logits)
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(_xlogx_ratio(np.exp(lp), lp, lq).sum(axis=-1).mean())


def top1_agreement(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Fraction of positions where both models' most likely token is the same."""
    _check_pair(p_logits, q_logits)
    return float(np.mean(np.argmax(p_logits, axis=-1) == np.argmax(q_logits, axis=-1)))


def _target_logprobs(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (np.shape(logits)[0],):
        raise ValueError(f"need one target per logits row: {targets.shape[0]} targets, {len(logits)} rows")
    return np.take_along_axis(log_softmax(logits), targets[:, None], axis=-1)[:, 0]


def perplexity(logits: np.ndarray, targets: Sequence[int]) -> float:
    """exp(mean negative log-likelihood of targets[t] under row t of logits)."""
    return float(np.exp(-_target_logprobs(logits, targets).mean()))


def ppl_ratio(p_logits: np.ndarray, q_logits: np.ndarray, targets: Sequence[int]) -> float:
    """Perplexity of the quantized model over that of the float model on the same targets (1.0 = no loss)."""
    return perplexity(q_logits, targets) / perplexity(p_logits, targets)


def rms_top_prob_diff(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """RMS over positions of p(top) - q(top), where top is the float model's most likely token."""
    _check_pair(p_logits, q_logits)
    top = np.argmax(p_logits, axis=-1)[:, None]
    p_top = np.exp(np.take_along_axis(log_softmax(p_logits), top, axis=-1))
    q_top = np.exp(np.take_along_axis(log_softmax(q_logits), top, axis=-1))
    return float(np.sqrt(np.mean((p_top - q_top) ** 2)))


# -- from the reference's stored top-k -----------------------------------------------------------------------
#
# reference.json keeps only the float model's k most likely tokens per position (ids, log-probs). The KL is
# then taken between the two distributions coarsened onto k + 1 outcomes: the k reference tokens, and one
# "rest" bucket holding all other tokens (p_rest = 1 - sum of the stored top-k probabilities, q_rest = the
# quantized model's mass on tokens outside the reference's top-k). By the log-sum inequality, merging outcomes
# never raises a KL, so this is a lower bound on the full KL; it is exact when the float model puts no mass
# outside its top-k, or when both models split the rest in the same proportions.


def _check_topk(top_ids: np.ndarray, top_logprobs: np.ndarray, q_logits: np.ndarray) -> None:
    if np.shape(top_ids) != np.shape(top_logprobs) or np.ndim(top_ids) != 2:
        raise ValueError(f"top_ids {np.shape(top_ids)}, top_logprobs {np.shape(top_logprobs)}: need [T, k]")
    if np.ndim(q_logits) != 2 or np.shape(q_logits)[0] != np.shape(top_ids)[0]:
        raise ValueError(f"q_logits {np.shape(q_logits)} must be [T, V] with T = {np.shape(top_ids)[0]}")


def topk_kl_divergence(top_ids: np.ndarray, top_logprobs: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(p || q) on the reference's top-k plus one rest bucket (a lower bound)."""
    _check_topk(top_ids, top_logprobs, q_logits)
    ids = np.asarray(top_ids, dtype=np.int64)
    lp = np.asarray(top_logprobs, dtype=np.float64)                 # [T, k]
    lq_all = log_softmax(q_logits)                                  # [T, V]
    lq = np.take_along_axis(lq_all, ids, axis=-1)                   # [T, k]
    # -expm1(log sum p_top) keeps p_rest accurate when the top-k holds almost all the mass.
    p_rest = np.clip(-np.expm1(np.minimum(_logsumexp(lp), 0.0)), 0.0, 1.0)   # [T]
    if ids.shape[1] >= lq_all.shape[1]:  # the top-k is the whole vocabulary: any p_rest is rounding noise
        p_rest = np.zeros_like(p_rest)
    np.put_along_axis(lq_all, ids, -np.inf, axis=-1)
    lq_rest = _logsumexp(lq_all)                                     # [T]
    with np.errstate(divide="ignore"):
        kl = _xlogx_ratio(np.exp(lp), lp, lq).sum(axis=-1) + _xlogx_ratio(p_rest, np.log(p_rest), lq_rest)
    return float(kl.mean())


def topk_top1_agreement(top_ids: np.ndarray, q_logits: np.ndarray) -> float:
    """Fraction of positions where the quantized argmax is the reference's best token (top_ids[:, 0])."""
    return float(np.mean(np.argmax(q_logits, axis=-1) == np.asarray(top_ids)[:, 0]))


def topk_rms_top_prob_diff(top_ids: np.ndarray, top_logprobs: np.ndarray, q_logits: np.ndarray) -> float:
    """rms_top_prob_diff with the reference's best token and its probability read from the stored top-k."""
    _check_topk(top_ids, top_logprobs, q_logits)
    top = np.asarray(top_ids, dtype=np.int64)[:, :1]
    p_top = np.exp(np.asarray(top_logprobs, dtype=np.float64)[:, 0])
    q_top = np.exp(np.take_along_axis(log_softmax(q_logits), top, axis=-1)[:, 0])
    return float(np.sqrt(np.mean((p_top - q_top) ** 2)))


# -- report --------------------------------------------------------------------------------------------------


@dataclass
class FidelityReport:
    """Fidelity figures of one quantized model against its float reference (manifest `fidelity`, verify)."""

    positions: int                         # next-token positions compared
    kl: float                              # mean KL(float || quant), nats
    kl_method: str                         # "full" or "top{k}+rest" (a lower bound, see topk_kl_divergence)
    top1: float                            # top-1 agreement
    rms_top_prob_diff: float
    ppl_float: Optional[float] = None      # on the probe's own next tokens, when known
    ppl_quant: Optional[float] = None
    ppl_ratio: Optional[float] = None
    greedy_prefix: Optional[list] = None   # common_prefix_len per reference prompt
    greedy_tokens: Optional[list] = None   # reference greedy length per prompt

    def to_dict(self) -> dict:
        """Plain JSON types (Python floats and ints)."""
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "FidelityReport":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _with_ppl(report: FidelityReport, ppl_float: Optional[float],
              ppl_quant: Optional[float]) -> FidelityReport:
    report.ppl_float, report.ppl_quant = ppl_float, ppl_quant
    if ppl_float is not None and ppl_quant is not None:
        report.ppl_ratio = ppl_quant / ppl_float
    return report


def compare_logits(p_logits: np.ndarray, q_logits: np.ndarray,
                   targets: Optional[Sequence[int]] = None) -> FidelityReport:
    """Every figure from full float and quantized logits [T, V] (perplexities when targets are given)."""
    report = FidelityReport(
        positions=int(np.shape(p_logits)[0]), kl=kl_divergence(p_logits, q_logits), kl_method="full",
        top1=top1_agreement(p_logits, q_logits), rms_top_prob_diff=rms_top_prob_diff(p_logits, q_logits))
    if targets is None:
        return report
    return _with_ppl(report, perplexity(p_logits, targets), perplexity(q_logits, targets))


def compare_topk(top_ids: np.ndarray, top_logprobs: np.ndarray, q_logits: np.ndarray,
                 targets: Optional[Sequence[int]] = None,
                 ref_target_logprobs: Optional[Sequence[float]] = None) -> FidelityReport:
    """Every figure from the reference's stored top-k [T, k] and the quantized logits [T, V].

    The float perplexity needs the reference's log-prob of each target (`ref_target_logprobs` [T]), which the
    top-k alone does not hold; without it only the quantized perplexity is reported.
    """
    report = FidelityReport(
        positions=int(np.shape(top_ids)[0]), kl=topk_kl_divergence(top_ids, top_logprobs, q_logits),
        kl_method=f"top{np.shape(top_ids)[1]}+rest", top1=topk_top1_agreement(top_ids, q_logits),
        rms_top_prob_diff=topk_rms_top_prob_diff(top_ids, top_logprobs, q_logits))
    if targets is None:
        return report
    ppl_float = None
    if ref_target_logprobs is not None:
        ppl_float = float(np.exp(-np.mean(np.asarray(ref_target_logprobs, dtype=np.float64))))
    return _with_ppl(report, ppl_float, perplexity(q_logits, targets))
