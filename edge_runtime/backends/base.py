"""The contract every backend executes: one forward step over new tokens with a preallocated KV cache.

Generation, sampling, tokenization and memory planning live above this line and are shared; a backend only
turns token ids into logits and keeps its own KV cache, sized once for `context` tokens.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str      # "ort" | "numpy"
    context: int   # KV-cache capacity in tokens, fixed at construction (never grows)
    # The smallest window of a layer whose cache keeps fewer positions than the context, or None when every
    # layer keeps the whole context. Once more positions than its cache holds are written, the keys a forward
    # at an earlier past_len would need may be gone (sessions.state.CacheState.resume_at).
    kv_ring: int | None
    # Optional: `resume_floor(end) -> int`, the first position a forward may start at once `end` positions are
    # written (both backends' window caches hold window - 1 + window // 2: spec.kv_capacity); without it, a
    # kv_ring of exactly its window resumes only at the end or one before it (sessions.state.ring_floor).

    def forward(self, ids: np.ndarray, past_len: int, logits_index: np.ndarray) -> np.ndarray:
        """Run `ids` ([S] int64) at positions past_len .. past_len+S-1.

        The KV entries of those positions are written into the cache; entries at positions >= past_len from
        earlier calls are overwritten (so rewinding is just calling with a smaller past_len).
        Returns float32 logits [len(logits_index), vocab] for the chunk positions in `logits_index`.
        Requires past_len + S <= context.
        """
        ...

    def kv_arrays(self) -> list[np.ndarray]:
        """The KV cache as writable arrays, positions on axis -2 (e.g. [1, kv_heads, context, head_dim] per
        layer, key then value): session files save and restore these, cut to the positions in use."""
        ...

    def kv_held(self, n: int, base: int | None = None) -> tuple[int, list[np.ndarray]]:
        """(position of the first slot of a shifting window buffer, 0 for other caches; views of kv_arrays cut to
        the slots holding positions < n): what a session file saves. `base` (from a session file) sets where
        shifting buffers start before the views are taken, for loading."""
        ...

    def kv_nbytes(self) -> int:
        """Bytes held by the KV cache (for the stats line and the memory planner)."""
        ...

    def describe(self) -> str:
        """A short note for the stats line (e.g. threads, kv dtype, resident dequantized matrices)."""
        ...
