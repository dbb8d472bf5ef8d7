"""What a model's one KV cache holds, and who may use it: the threading contract of a loaded Model.

A Model owns one backend and one KV cache. Every use of them (a stream from its first token to its end,
`logits`, `logprobs`, a session's save/load) holds the model's lock, so callers on other threads wait their
turn and never interleave forward passes (ONNX Runtime's IO binding and the NumPy cache are not reentrant).
A second use from the thread that holds the lock (two streams opened and read alternately) cannot wait for
itself: it raises StreamBusyError instead of corrupting the first.

`ids` are the tokens whose keys/values sit at positions 0..len(ids)-1, so a new prompt that starts the same
way reuses them (prefix reuse) instead of prefilling them again. Only the first `exact` of them are reused by
default: those written by multi-token (prefill) passes from position 0 on. Keys/values written one token at a
time (an answer being decoded) take another kernel path whose rounding differs slightly from a prefill's, and
with int8 activations that can flip a near-tie later; run again in the next prefill, they make a reused
prompt's logits those of prefilling it from scratch, so a session answers exactly what re-prefilling the
conversation would. `reuse_decoded=True` reuses them too (faster turns, answers equal to rounding).

A pass may start only where the cache still holds every key its window needs (`resume_at`): anywhere for a
cache of the whole context; for sliding-window caches (Backend.kv_ring), from where the backend says (its
`resume_floor(end)`: both backends keep room for a reply of half a window, so a turn resumes at the previous
prompt's end), or without one, past a ring's wrap only at the end or one before it (`ring_floor`). A shorter
shared prefix is prefilled again from 0. A failed pass may have overwritten ring slots of positions before it,
so it empties such a cache (`failed`).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from ..errors import StreamBusyError


def ring_floor(ring: int | None) -> Callable[[int], int]:
    """The first position a pass may start at once `end` positions are written into rings of `ring` slots:
    0 until they wrap, then end - 1 (the end itself, or the last position run again for its logits)."""
    return lambda end: end - 1 if ring is not None and end > ring else 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class CacheState:
    """The ids held by the KV cache, and the lock that serializes every use of the backend."""

    def __init__(self, reuse_decoded: bool = False, ring: int | None = None,
                 floor: Callable[[int], int] | None = None):
        self.ids: list[int] = []
        self.ring = ring  # Backend.kv_ring
        self.floor = floor or ring_floor(ring)  # end -> first position a pass may start at (Backend.resume_floor)
        self.exact = 0  # leading ids whose keys/values came from prefill passes (see the module docstring)
        self.reuse_decoded = reuse_decoded
        self._lock = threading.Lock()
        self._owner: int | None = None

    def claim(self) -> Claim:
        """Wait for the cache (held by another thread) and take it; StreamBusyError if this thread holds it."""
        me = threading.get_ident()
        if self._owner == me:
            raise StreamBusyError("a stream on this model is still open in this thread: read it to the end "
                                  "or close() it before starting another generation")
        self._lock.acquire()
        self._owner = me
        return Claim(self)

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    def truncate(self, n: int) -> None:
        """Positions >= n are about to be overwritten (or were left half-written by a failed pass)."""
        del self.ids[n:]
        self.exact = min(self.exact, n)

    def append(self, ids, past_len: int) -> None:
        """Record a successful pass of `ids` at past_len (= len(self.ids))."""
        self.ids.extend(int(i) for i in ids)
        if len(ids) > 1 and self.exact == past_len:
            self.exact += len(ids)

    def failed(self, past_len: int) -> None:
        """A pass at past_len raised: its positions are half-written, and with a ring so may be earlier ones."""
        self.truncate(0 if self.ring is not None else past_len)

    def resume_at(self, n: int) -> int:
        """Where a pass meant to start at position n (<= len(ids)) may start and still see the keys of every
        position before it: n, or 0 when the cache no longer holds them (self.floor)."""
        return n if n >= self.floor(len(self.ids)) else 0

    def reusable(self, ids) -> int:
        """How many leading `ids` the cache holds and may reuse."""
        held = self.ids if self.reuse_decoded else self.ids[:self.exact]
        return common_prefix(held, ids)


class Claim:
    """The right to use the cache until release() (idempotent; a stream may end on another thread)."""

    def __init__(self, state: CacheState):
        self._state: CacheState | None = state

    def release(self) -> None:
        state, self._state = self._state, None
        if state is not None:
            state._release()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
