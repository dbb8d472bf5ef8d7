"""GGUF quantized tensors as (scale, offset, codes) per sub-block: every GGUF type the bundle can hold, in one table.

Each type's raw blocks [n, type_size] are split, vectorized over all blocks, into sub-blocks of `sub` elements
that share one float32 scale `d` and (for the asymmetric types) one float32 offset `m`:

    W = d * (q - zero) + m          q: unsigned integer codes of `bits` bits, zero: the type's constant

evaluated in that order, which is the order gguf-py's dequantization uses (so the floats are bit-identical).
K-quants store 6- or 8-bit sub-block scales times a float16 super-block scale; their product is exact in
float32, so the sub-block scale is one float. The layouts follow gguf-py (gguf/quants.py) and ggml-quants.c.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

QK_K = 256  # elements per K-quant super-block


@dataclass
class GGUFBlocks:
    """One GGUF-quantized matrix [N, K] split into sub-blocks along K (rows in HF order): W = d*(q - zero) + m."""

    kind: str                   # lower-case GGUF type name, a key of GGUF_TYPES ("q4_k")
    d: np.ndarray               # float32 [N, nb]: the sub-block scale
    m: Optional[np.ndarray]     # float32 [N, nb]: the sub-block offset (asymmetric types), else None
    q: np.ndarray               # uint8 [N, nb, sub]: codes, 0 .. 2^bits - 1, in natural element order

    @property
    def type(self) -> GGUFType:
        return GGUF_TYPES[self.kind]

    def dequantize(self) -> np.ndarray:
        """float32 [N, K], bit-identical to gguf.quants.dequantize of the stored blocks."""
        w = self.q.astype(np.float32)
        if self.type.zero:
            w -= np.float32(self.type.zero)
        w *= self.d[..., None]
        if self.m is not None:
            w += self.m[..., None]
        return w.reshape(self.q.shape[0], -1)

    def take_rows(self, order: np.ndarray) -> GGUFBlocks:
        """The same blocks with rows reordered (rows are independent: blocks run along K)."""
        m = None if self.m is None else self.m[order]
        return GGUFBlocks(self.kind, self.d[order], m, self.q[order])


Split = Callable[[np.ndarray], tuple]  # raw [n, type_size] uint8 -> (d [n, s], m [n, s] | None, q [n, s, sub])


@dataclass(frozen=True)
class GGUFType:
    """One GGUF quantization type: sizes as gguf-py's GGML_QUANT_SIZES, and how its blocks split."""

    block: int       # elements per GGUF block
    type_size: int   # bytes per GGUF block
    sub: int         # elements sharing one scale (and offset)
    bits: int        # code width
    zero: int        # the constant subtracted from every code
    offsets: bool    # asymmetric: a float offset per sub-block
    split: Split


def _f16(raw: np.ndarray) -> np.ndarray:
    """[n, 2] bytes -> float32 [n, 1]."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """[n, g*width/2] bytes -> [n, g, width] codes: a run's low nibbles first, then its high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, width // 2) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, -1, width)


def _bits_of(packed: np.ndarray, shifts, mask: int, width: int) -> np.ndarray:
    """[n, bytes] -> [n, g, width]: each shift's field of every byte, runs of `width` bytes in order."""
    n = packed.shape[0]
    s = np.array(shifts, np.uint8).reshape(1, 1, len(shifts), 1)
    return ((packed.reshape(n, -1, 1, width) >> s) & np.uint8(mask)).reshape(n, -1, width)


def _high_bit32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of a little-endian uint32 is element j's fifth bit -> [n, 32] of 0/1."""
    bits = np.ascontiguousarray(qh).view(np.uint32) >> np.arange(32, dtype=np.uint32)[None, :]
    return (bits & np.uint32(1)).astype(np.uint8)


def _split_q4_0(raw):
    return _f16(raw[:, :2]), None, _nibbles(raw[:, 2:], 32)


def _split_q4_1(raw):
    return _f16(raw[:, :2]), _f16(raw[:, 2:4]), _nibbles(raw[:, 4:], 32)


def _q5(raw, start):
    return _nibbles(raw[:, start + 4:], 32) | (_high_bit32(raw[:, start:start + 4]) << np.uint8(4))[:, None, :]


def _split_q5_0(raw):
    return _f16(raw[:, :2]), None, _q5(raw, 2)


def _split_q5_1(raw):
    return _f16(raw[:, :2]), _f16(raw[:, 2:4]), _q5(raw, 4)


def _split_q8_0(raw):
    return _f16(raw[:, :2]), None, (raw[:, 2:] ^ np.uint8(0x80))[:, None, :]  # int8 -> code + 128


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, each [n, 8] (gguf-py Q4_K.get_scale_min)."""
    n = scales.shape[0]
    d, m, m_d = np.split(scales.reshape(n, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _k_scales(raw, sc, mn):
    """d*sc and -(dmin*mn) per sub-block, as gguf-py forms them (both products exact in float32)."""
    d, dmin = _f16(raw[:, :2]), _f16(raw[:, 2:4])
    return d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))


def _split_q4_k(raw):
    d, m = _k_scales(raw, *_scale_min_k4(raw[:, 4:16]))
    return d, m, _nibbles(raw[:, 16:], 64).reshape(raw.shape[0], 8, 32)


def _split_q5_k(raw):
    d, m = _k_scales(raw, *_scale_min_k4(raw[:, 4:16]))
    ql = _nibbles(raw[:, 48:], 64).reshape(raw.shape[0], 8, 32)
    qh = _bits_of(raw[:, 16:48], range(8), 1, 32)  # [n, 8, 32]: bit i of byte j -> element 32*i + j
    return d, m, ql | (qh << np.uint8(4))


def _split_q6_k(raw):
    n = raw.shape[0]
    ql = _bits_of(raw[:, :128], (0, 4), 0x0F, 64).reshape(n, 8, 32)
    qh = _bits_of(raw[:, 128:192], (0, 2, 4, 6), 0x03, 32).reshape(n, 8, 32)
    q = (ql | (qh << np.uint8(4))).reshape(n, 16, 16)
    d = _f16(raw[:, 208:210]) * raw[:, 192:208].view(np.int8).astype(np.float32)
    return d, None, q


def _split_q2_k(raw):
    scales = raw[:, :16]
    d, dmin = _f16(raw[:, 80:82]), _f16(raw[:, 82:84])
    q = _bits_of(raw[:, 16:80], (0, 2, 4, 6), 0x03, 32).reshape(raw.shape[0], 16, 16)
    return d * (scales & 0x0F).astype(np.float32), -(dmin * (scales >> 4).astype(np.float32)), q


def _split_q3_k(raw):
    n = raw.shape[0]
    hmask, qs, scales, d = raw[:, :32], raw[:, 32:96], raw[:, 96:108], _f16(raw[:, 108:110])
    low = _bits_of(scales[:, :8], (0, 4), 0x0F, 8).reshape(n, 16)
    high = _bits_of(scales[:, 8:], (0, 2, 4, 6), 0x03, 4).reshape(n, 16)
    sc = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
    ql = _bits_of(qs, (0, 2, 4, 6), 0x03, 32).reshape(n, 16, 16)
    qh = _bits_of(hmask, range(8), 1, 32).reshape(n, 16, 16)
    return d * sc, None, ql | (qh << np.uint8(2))  # element = ql - 4*(1 - hbit) = code - 4


# Every GGUF type whose values the bundle can hold exactly (codes of <= 8 bits, one scale and offset per
# sub-block of 16 or 32). Others (IQ*, TQ*, MXFP4, ...) are dequantized and re-quantized.
GGUF_TYPES = {
    "q4_0": GGUFType(32, 2 + 16, 32, 4, 8, False, _split_q4_0),
    "q4_1": GGUFType(32, 2 + 2 + 16, 32, 4, 0, True, _split_q4_1),
    "q5_0": GGUFType(32, 2 + 4 + 16, 32, 5, 16, False, _split_q5_0),
    "q5_1": GGUFType(32, 2 + 2 + 4 + 16, 32, 5, 0, True, _split_q5_1),
    "q8_0": GGUFType(32, 2 + 32, 32, 8, 128, False, _split_q8_0),
    "q2_k": GGUFType(QK_K, 16 + QK_K // 4 + 2 + 2, 16, 2, 0, True, _split_q2_k),
    "q3_k": GGUFType(QK_K, QK_K // 8 + QK_K // 4 + 12 + 2, 16, 3, 4, False, _split_q3_k),
    "q4_k": GGUFType(QK_K, 2 + 2 + 12 + QK_K // 2, 32, 4, 0, True, _split_q4_k),
    "q5_k": GGUFType(QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2, 32, 5, 0, True, _split_q5_k),
    "q6_k": GGUFType(QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2, 16, 6, 32, False, _split_q6_k),
}


def split_blocks(kind: str, data: np.ndarray) -> GGUFBlocks:
    """Raw bytes of a [N, K] tensor of type `kind` ([N, K/block * type_size] uint8) -> GGUFBlocks."""
    t = GGUF_TYPES[kind]
    rows = data.shape[0]
    raw = np.ascontiguousarray(data).reshape(-1, t.type_size)  # [N * K/block, type_size]
    d, m, q = t.split(raw)
    per_row = raw.shape[0] // rows * (t.block // t.sub)  # sub-blocks per row
    d = np.ascontiguousarray(d, dtype=np.float32).reshape(rows, per_row)
    m = None if m is None else np.ascontiguousarray(m, dtype=np.float32).reshape(rows, per_row)
    return GGUFBlocks(kind, d, m, np.ascontiguousarray(q, dtype=np.uint8).reshape(rows, per_row, t.sub))
