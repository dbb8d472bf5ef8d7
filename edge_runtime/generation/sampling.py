"""Turning one step's logits into a token id: a sampler factory of small apply_* steps; logits processors.

The order matches Hugging Face `generate`: repetition penalty (a logits processor), then temperature, top-k,
top-p, min-p. Greedy decoding (temperature 0) is a plain argmax: no softmax, no random numbers.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import numpy as np

from ..errors import SamplingError

Sampler = Callable[[np.ndarray], int]                             # logits [V] -> token id
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (ids so far [T], logits [V]) -> logits [V]

NUCLEUS_PREFILTER = 512  # top-p without top-k first looks for the nucleus among this many best tokens


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def validate(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, max_new_tokens: int = 0) -> None:
    """Raise SamplingError (one line) for the first argument out of range. NaN fails every check."""
    if not temperature >= 0:
        raise SamplingError(f"temperature must be >= 0, got {temperature}")
    if not _is_int(top_k) or top_k < 0:
        raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise SamplingError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p < 1:
        raise SamplingError(f"min_p must be in [0, 1), got {min_p}")
    if not repetition_penalty > 0 or math.isinf(repetition_penalty):
        raise SamplingError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                            f"got {repetition_penalty}")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits, set the rest to -inf (k = 0 or k >= V keeps everything)."""
    if k <= 0 or k >= logits.size:
        return logits
    keep = np.argpartition(-logits, k - 1)[:k]
    out = np.full_like(logits, -np.inf)
    out[keep] = logits[keep]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def apply_top_p(probs: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose total probability reaches p; renormalize.

    A token is kept when the probability of the tokens ranked strictly above it is < p, so the most likely
    token always survives (as in Hugging Face's TopPLogitsWarper).
    """
    if p >= 1.0:
        return probs
    order = np.argsort(-probs, kind="stable")
    ranked = probs[order]
    above = np.cumsum(ranked) - ranked
    out = np.zeros_like(probs)
    kept = order[above < p]
    out[kept] = probs[kept]
    return out / out.sum()


def apply_min_p(probs: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens less likely than min_p times the most likely one; renormalize."""
    if min_p <= 0.0:
        return probs
    out = np.where(probs >= min_p * probs.max(), probs, 0.0)
    return out / out.sum()


def categorical(rng: np.random.Generator, probs: np.ndarray) -> int:
    """One draw from `probs` (sums to 1): a uniform number located in the cumulative sum."""
    cdf = np.cumsum(probs)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(i, probs.size - 1)  # guards the (measure-zero) draw landing exactly on the last edge


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def top_k_candidates(logits: np.ndarray, k: int) -> np.ndarray | None:
    """Ids of the k largest logits in id order, or None for "all of them".

    argpartition is O(V), so what follows (softmax, the top-p sort) touches only k values. Id order matters:
    argpartition's order is unspecified, and a fixed order makes a seed draw the same tokens as masking the
    full vector would.
    """
    if 0 < k < logits.size:
        return np.sort(np.argpartition(-logits, k - 1)[:k])
    return None


def nucleus_candidates(probs: np.ndarray, p: float, m: int = NUCLEUS_PREFILTER) -> np.ndarray | None:
    """Ids (in id order) of the m most likely tokens if they already hold mass >= p, else None.

    Every token of the top-p nucleus is then among them (any token ranked below has >= p above it), so the
    sort in apply_top_p covers m values instead of the whole vocabulary.
    """
    if p >= 1.0 or probs.size <= m:
        return None
    best = np.argpartition(-probs, m - 1)[:m]
    return np.sort(best) if probs[best].sum() >= p else None


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    """Return `logits [V] -> token id`. Same seed and same logits give the same tokens."""
    validate(temperature, top_k, top_p, min_p)
    if temperature == 0:
        return greedy
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        ids = top_k_candidates(logits, top_k)
        vals = logits if ids is None else logits[ids]
        probs = softmax(vals.astype(np.float64) / temperature)
        if ids is None:
            ids = nucleus_candidates(probs, top_p)
            probs = probs if ids is None else probs[ids]  # true probabilities: top-p needs them unscaled
        probs = apply_min_p(apply_top_p(probs, top_p), min_p)
        i = categorical(rng, probs)
        return i if ids is None else int(ids[i])

    return sample


def apply_repetition_penalty(logits: np.ndarray, tokens: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL / Hugging Face penalty on every id already seen: positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or tokens.size == 0:
        return logits
    out = logits.copy()
    seen = logits[tokens]
    out[tokens] = np.where(seen > 0, seen / penalty, seen * penalty)  # duplicates write the same value
    return out


def make_logits_processors(repetition_penalty: float = 1.0,
                           repetition_context_size: int | None = None) -> list[LogitsProcessor]:
    """Processors applied in order before sampling; the penalty looks at the last `repetition_context_size`
    tokens (prompt included), or all of them when None, as Hugging Face does."""
    validate(repetition_penalty=repetition_penalty)
    if repetition_penalty == 1.0:
        return []

    def repetition(tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if repetition_context_size is not None:
            tokens = tokens[-repetition_context_size:]
        return apply_repetition_penalty(logits, tokens, repetition_penalty)

    return [repetition]


def check_processors(processors: Sequence[LogitsProcessor]) -> list[LogitsProcessor]:
    """Caller-supplied logits processors as a list, each a callable (ids so far [T], logits [V]) -> logits."""
    if callable(processors):
        processors = [processors]
    out = list(processors or ())
    for p in out:
        if not callable(p):
            raise SamplingError(f"logits processors must be callables (ids, logits) -> logits, got {p!r}")
    return out


def apply_processors(processors: Sequence[LogitsProcessor], tokens: np.ndarray,
                     logits: np.ndarray) -> np.ndarray:
    for process in processors:
        logits = process(tokens, logits)
    return logits
