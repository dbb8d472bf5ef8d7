"""The sliding-window layers' KV buffers under ONNX Runtime: window - 1 + stride positions that shift.

GroupQueryAttention writes a pass's keys at the positions after `seqlens_k` of a linear buffer; it cannot wrap
like the NumPy backend's ring. So a window layer's buffer [1, kv_heads, capacity, head_dim] holds the positions
base, base + 1, ... in its slots 0, 1, ..., and before a pass that would not fit, the last window - 1 keys (all a
new query can still see) move to the front and base moves with them. The graph reads these layers' seqlens and
total length counted from slot 0 (`seqlens_k.window`, `total_sequence_length.window`), and the rotary rows of
positions base.. (`rotary.window.cos_cache` / `sin_cache`): GroupQueryAttention rotates a key by its slot, and
the stored keys are already rotated, so moving them is exact. Passes longer than the stride are split by the
backend. Resuming at a position whose window has moved out is refused (sessions.state.CacheState.resume_at
never asks for it: `floor` is the first position a pass may start at).

A decode step right after a multi-token pass (the prompt's) first shifts if fewer than `stride` slots are
free: a reply of up to `stride` tokens then leaves the prompt's window in place, and a session's next turn
resumes at the end of the prompt instead of prefilling the conversation again.
"""
from __future__ import annotations

import numpy as np

from ...errors import EdgeError
from ...format.contracts import WINDOW_INPUTS
from ...spec import Rope, kv_capacity, shift_stride
from ...spec.rope import half_tables


class ShiftingWindows:
    """The shared state of every sliding-window layer's buffer: base (the position in slot 0), the graph's
    window inputs, and the move that keeps the last window - 1 keys."""

    def __init__(self, window: int, rope: Rope, context: int, head_dim: int, dtype):
        self.window, self.rope, self.head_dim = int(window), rope, int(head_dim)
        self.capacity, self.stride = kv_capacity(window, context), shift_stride(window)
        self.base = 0
        self.buffers: list[np.ndarray] = []   # [1, kv_heads, capacity, head_dim] per window layer, K then V
        self.seqlens = np.zeros(1, np.int32)  # [1]  slots in use after the pass - 1
        self.total = np.zeros((), np.int32)   # []   slots in use after the pass
        self.cos = np.zeros((self.capacity, head_dim // 2), dtype)  # [capacity, D/2] rows of positions base..
        self.sin = np.zeros_like(self.cos)
        self._last_pass = 0
        self._rows()

    def inputs(self) -> dict[str, np.ndarray]:
        return dict(zip(WINDOW_INPUTS, (self.seqlens, self.total, self.cos, self.sin)))

    def prepare(self, past_len: int, s: int) -> None:
        """Make room for s (<= stride) new positions at past_len and set the graph's window inputs."""
        if past_len == 0:
            self.set_base(0)
        elif past_len - self.base < min(past_len, self.window - 1):
            raise EdgeError(f"the sliding-window cache starts at position {self.base}: a pass at {past_len} "
                            f"needs the keys from {max(0, past_len - self.window + 1)} (prefill from 0)")
        reply_room = s == 1 and self._last_pass > 1 and past_len >= self.window - 1
        if past_len - self.base + (self.stride if reply_room else s) > self.capacity:
            self._shift(past_len)
        self._last_pass = s
        self.seqlens[0] = past_len - self.base + s - 1
        self.total[()] = past_len - self.base + s

    def _shift(self, past_len: int) -> None:
        """Keep the window - 1 keys before past_len (all a query at past_len still sees) in the first slots."""
        keep = self.window - 1
        first = past_len - keep - self.base
        for buf in self.buffers:
            buf[:, :, :keep] = buf[:, :, first:first + keep]   # overlapping: NumPy copies through a buffer
        self.set_base(past_len - keep)

    def floor(self) -> int:
        """The first position a pass may start at: every key its window needs is still held."""
        return 0 if self.base == 0 else self.base + self.window - 1

    def set_base(self, base: int) -> None:
        if base != self.base:
            self.base = int(base)
            self._rows()

    def _rows(self) -> None:
        cos, sin = half_tables(self.capacity, self.head_dim, self.rope, start=self.base)
        self.cos[...], self.sin[...] = cos, sin
