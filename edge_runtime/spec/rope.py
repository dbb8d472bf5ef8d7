"""Rotary position tables, the one implementation both the ONNX graph and the NumPy forward pass use.

Matches Hugging Face's rotary embeddings (default and "linear" rope types): inv_freq[j] = 1 / theta^(2j/D),
divided by the linear factor, and the angles position * inv_freq rounded to float32 as HF computes them (so long
positions see the float reference's phase); cos/sin are then taken in float64 and rounded to float32.
"""
from __future__ import annotations

import numpy as np

from . import Rope


def rope_angles(n_positions: int, head_dim: int, rope: Rope, start: int = 0) -> np.ndarray:
    """float32 [n_positions, head_dim/2]: position * inv_freq for positions start, start + 1, ..."""
    inv_freq = (1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
    if rope.factor != 1.0:
        inv_freq = (inv_freq / np.float32(rope.factor)).astype(np.float32)
    positions = np.arange(start, start + n_positions, dtype=np.float32)
    return np.outer(positions, inv_freq).astype(np.float32)                                    # [P, D/2]


def half_tables(n_positions: int, head_dim: int, rope: Rope, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n_positions, head_dim/2] float32 of positions start..: the layout of GroupQueryAttention's
    cos/sin caches (rows of a longer table equal it exactly: every entry is computed on its own)."""
    angles = rope_angles(n_positions, head_dim, rope, start).astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def full_tables(n_positions: int, head_dim: int, rope: Rope) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n_positions, head_dim] float32: half_tables duplicated over both halves (rotate_half layout)."""
    cos, sin = half_tables(n_positions, head_dim, rope)
    return np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)
