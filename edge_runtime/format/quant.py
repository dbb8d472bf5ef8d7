"""Block-quantized linear weights in ONNX Runtime MatMulNBits layout: the runtime's view of bundle weights.

A weight `W` `[N, K]` is cut along K into blocks of `block_size`; block `b` of row `n` dequantizes as

    W[n, b*bs + i] = (q[n, b, i] - zp[n, b]) * scales[n, b] + offsets[n, b]

(see docs/bundle-format.md). This module is NumPy only: the exporter builds these objects, the NumPy backend
dequantizes them on its hot path, and the graph builder turns `arrays()` into initializers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

import numpy as np

from ..errors import BundleError


@dataclass(frozen=True)
class QuantType:
    """One integer code width: its range and the zero point assumed when a tensor stores none."""

    bits: int
    qmax: int        # codes are unsigned, 0 .. qmax
    default_zp: int  # 2^(bits-1): the symmetric zero point

    def block_bytes(self, block_size: int) -> int:
        return block_size * self.bits // 8


# The quantization types, specified once.
QUANT_TYPES = {
    4: QuantType(bits=4, qmax=2**4 - 1, default_zp=2**3),
    8: QuantType(bits=8, qmax=2**8 - 1, default_zp=2**7),
}
BLOCK_SIZES = (16, 32, 64, 128)
Rows = Union[slice, np.ndarray]  # a slice or an index array of rows
# Array suffixes in weights.bin, in storage order; only the first two are always present.
SUFFIXES = ("qweight", "scales", "zero_points", "offsets")


def quant_type(bits: int) -> QuantType:
    try:
        return QUANT_TYPES[int(bits)]
    except KeyError:
        raise BundleError(f"unsupported quantization width: {bits} bits (supported: 4, 8)") from None


def pack_4bit(q: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes two per byte along the last axis, element 2j in the low nibble (odd length: pad 0)."""
    q = np.asarray(q, dtype=np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return q[..., 0::2] | (q[..., 1::2] << np.uint8(4))


def unpack_4bit(p: np.ndarray) -> np.ndarray:
    """Inverse of pack_4bit: [..., m] bytes -> [..., 2m] codes (low nibble first)."""
    p = np.asarray(p, dtype=np.uint8)
    out = np.empty(p.shape[:-1] + (p.shape[-1], 2), np.uint8)  # [..., m, 2]
    np.bitwise_and(p, np.uint8(0x0F), out=out[..., 0])
    np.right_shift(p, np.uint8(4), out=out[..., 1])
    return out.reshape(p.shape[:-1] + (2 * p.shape[-1],))


@dataclass
class BlockQuant:
    """One block-quantized linear weight [N, K]: MatMulNBits input B, its scales, zero points and offsets."""

    bits: int
    block_size: int
    shape: tuple                               # (N, K)
    qweight: np.ndarray                        # uint8 [N, kb, bs*bits/8]
    scales: np.ndarray                         # float32 [N, kb]
    # uint8, 4-bit: [N, ceil(kb/2)] two per byte; 8-bit: [N, kb]; None means the default 2^(bits-1)
    zero_points: Optional[np.ndarray] = None
    offsets: Optional[np.ndarray] = None       # float32 [N, kb], added after the integer dequantization

    def __post_init__(self):
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self._check()

    @property
    def n_blocks(self) -> int:
        return self.shape[1] // self.block_size

    @property
    def qtype(self) -> QuantType:
        return quant_type(self.bits)

    def _check(self) -> None:
        qt = self.qtype
        n, k = self.shape
        bs = self.block_size
        if bs not in BLOCK_SIZES or k % bs:
            raise BundleError(f"block size {bs} does not fit K={k} (need one of {BLOCK_SIZES} dividing K)")
        kb = k // bs
        expect = {"qweight": (n, kb, qt.block_bytes(bs)), "scales": (n, kb), "offsets": (n, kb),
                  "zero_points": (n, (kb + 1) // 2) if self.bits == 4 else (n, kb)}
        dtypes = {"qweight": np.uint8, "zero_points": np.uint8, "scales": np.float32, "offsets": np.float32}
        for suffix, arr in self.arrays().items():
            if tuple(arr.shape) != expect[suffix]:
                raise BundleError(f"quantized {suffix} has shape {arr.shape}, expected {expect[suffix]}")
            if arr.dtype != dtypes[suffix]:
                raise BundleError(f"quantized {suffix} is {arr.dtype}, expected {np.dtype(dtypes[suffix])}")

    # -- views of the codes -------------------------------------------------------------------------------

    def unpacked_q(self, rows: Rows = slice(None)) -> np.ndarray:
        """Integer codes, uint8 [n, kb, bs]."""
        qw = self.qweight[rows]
        return unpack_4bit(qw) if self.bits == 4 else np.asarray(qw)

    def zero_point_values(self, rows: Rows = slice(None)) -> np.ndarray:
        """Zero points unpacked, uint8 [n, kb] (the symmetric default when none are stored)."""
        if self.zero_points is None:
            return np.full(self.scales[rows].shape, self.qtype.default_zp, np.uint8)
        zp = self.zero_points[rows]
        return unpack_4bit(zp)[:, :self.n_blocks] if self.bits == 4 else np.asarray(zp)

    def dequantize(self, rows: Rows = slice(None)) -> np.ndarray:
        """Float32 [n, K] for the given rows (all by default; a slice or an index array), vectorized over blocks.

        Evaluated as ((q - zp) * scale) + offset in float32, in that order: q - zp is an exact small integer and
        its product with a scale of up to 18 significant bits (a GGUF float16 times a K-quant sub-block scale) is
        exact, so GGUF values transcoded into the bundle come back bit-identical to gguf's own dequantization.
        """
        scales = self.scales[rows]
        n, kb = scales.shape
        w = self.unpacked_q(rows).astype(np.float32)  # [n, kb, bs]
        if self.zero_points is None:
            w -= np.float32(self.qtype.default_zp)
        else:
            w -= self.zero_point_values(rows)[:, :, None]
        w *= scales[:, :, None]
        if self.offsets is not None:
            w += self.offsets[rows][:, :, None]
        return w.reshape(n, kb * self.block_size)

    # -- storage ---------------------------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        """The stored arrays keyed by suffix (`W.qweight`, `W.scales`, ...); absent optional ones left out."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zero_points is not None:
            out["zero_points"] = self.zero_points
        if self.offsets is not None:
            out["offsets"] = self.offsets
        return out

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays().values())

    def manifest_entry(self, method: str) -> dict:
        """The `quantization.tensors[name]` entry of the manifest for this weight."""
        return {"bits": self.bits, "block_size": self.block_size, "method": method,
                "zero_points": self.zero_points is not None, "offsets": self.offsets is not None}

    @classmethod
    def from_arrays(cls, bits: int, block_size: int, shape, arrays: Mapping[str, np.ndarray]) -> "BlockQuant":
        missing = [s for s in SUFFIXES[:2] if s not in arrays]
        if missing:
            raise BundleError(f"quantized weight is missing its {', '.join(missing)} array")
        return cls(int(bits), int(block_size), tuple(shape), arrays["qweight"], arrays["scales"],
                   arrays.get("zero_points"), arrays.get("offsets"))

    @classmethod
    def from_bundle(cls, bundle, name: str, qmeta: Mapping) -> "BlockQuant":
        """Memory-mapped views of `name.qweight` etc. in a Bundle, checked against its manifest entry."""
        arrays = {}
        for suffix in SUFFIXES:
            key = f"{name}.{suffix}"
            if suffix in ("zero_points", "offsets") and not qmeta.get(suffix, False):
                if bundle.has_tensor(key):
                    raise BundleError(f"bundle has {key} but the manifest says {name} has no {suffix}")
                continue
            arrays[suffix] = bundle.tensor(key)
        bits, bs = int(qmeta["bits"]), int(qmeta["block_size"])
        n, kb = arrays["scales"].shape
        return cls.from_arrays(bits, bs, (n, kb * bs), arrays)
