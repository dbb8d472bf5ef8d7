"""Scoring a token sequence: the logits of every position, and the log-prob of each token given the ones
before it. Both run the sequence from position 0 in chunks through the model's KV cache."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from ..errors import ContextOverflowError, EdgeError
from ..sessions.state import CacheState
from .generate import PREFILL_CHUNK, forward


def check_ids(ids: Sequence[int], vocab_size: int, context: int | None = None) -> list[int]:
    """A non-empty list of in-vocabulary ids (that fits the context, when given)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise EdgeError("ids must be a non-empty sequence of token ids")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise EdgeError(f"token ids must lie in 0..{vocab_size - 1}")
    if context is not None and arr.size > context:
        raise ContextOverflowError(f"{arr.size} tokens do not fit the context of {context}")
    return [int(i) for i in arr]


def chunk_logits(backend, cache: CacheState, ids: Sequence[int],
                 chunk: int = PREFILL_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """(start, logits [S, V] of positions start..start+S-1) for each chunk of `ids`, run from position 0."""
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        yield start, forward(backend, cache, part, start, np.arange(len(part), dtype=np.int64))


def logits(backend, cache: CacheState, ids: Sequence[int], chunk: int = PREFILL_CHUNK) -> np.ndarray:
    """[len(ids), V] float32: row i is the model's prediction for the token after ids[:i+1]."""
    return np.concatenate([rows for _, rows in chunk_logits(backend, cache, ids, chunk)])


def logprobs(backend, cache: CacheState, ids: Sequence[int], chunk: int = PREFILL_CHUNK) -> np.ndarray:
    """[len(ids) - 1] float64: entry i is log p(ids[i+1] | ids[:i+1]) (the first id has no prediction)."""
    out = np.empty(len(ids) - 1, dtype=np.float64)
    for start, rows in chunk_logits(backend, cache, ids, chunk):
        z = rows.astype(np.float64)                                    # [S, V]
        top = z.max(axis=1, keepdims=True)
        norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))         # [S] log-sum-exp
        nxt = np.asarray(ids[start + 1:start + 1 + len(rows)])         # the ids these rows predict
        picked = z[np.arange(len(nxt)), nxt] - norm[:len(nxt)]
        out[start:start + len(nxt)] = picked
    return out
