"""GGUF quantization types (export.sources.gguf_blocks) and their exact transcoding into bundle blocks, held
bit for bit to gguf-py's own dequantization."""
from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.errors import EdgeError
from edge_runtime.format.quant import BlockQuant
from export.quant.quantize import exact_zero_points, transcode_bits, transcode_gguf
from export.sources.gguf_blocks import GGUF_TYPES, split_blocks

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
RNG = np.random.default_rng(7)
# Byte offsets of each K-quant block's float16 scale fields (ggml-quants.h block_q*_K layouts).
F16_FIELDS = {"q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}
QUANTIZABLE = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")  # gguf-py implements quantize for these


def raw_tensor(kind: str, n: int = 6, k: int = 512) -> np.ndarray:
    """Raw bytes of an [n, k] tensor: gguf's own quantization of random weights where gguf-py has one, else
    random bytes with finite float16 scales (every code, scale and min pattern occurs)."""
    t = GGUF_TYPES[kind]
    if kind in QUANTIZABLE:
        w = RNG.normal(0, 0.05, (n, k)).astype(np.float32)
        w[:, :32] += 0.3  # some blocks far from centered: large mins
        return gguf.quants.quantize(w, Q[kind.upper()])
    raw = RNG.integers(0, 256, (n * k // t.block, t.type_size), dtype=np.uint8)
    for at in F16_FIELDS[kind]:
        scale = RNG.uniform(1e-4, 3e-3, raw.shape[0]).astype(np.float16)
        raw[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def gguf_dequant(kind, raw, n):
    return gguf.quants.dequantize(raw, Q[kind.upper()]).reshape(n, -1)


@pytest.mark.parametrize("kind", sorted(GGUF_TYPES))
def test_split_blocks_is_gguf_dequantize(kind):
    raw = raw_tensor(kind)
    b = split_blocks(kind, raw)
    t = GGUF_TYPES[kind]
    assert b.q.shape == (6, 512 // t.sub, t.sub) and b.q.dtype == np.uint8
    assert b.q.max() < 2 ** t.bits and (b.m is not None) == t.offsets
    assert np.array_equal(b.dequantize(), gguf_dequant(kind, raw, 6))


@pytest.mark.parametrize("kind", sorted(GGUF_TYPES))
@pytest.mark.parametrize("bits", [None, 8])
def test_transcode_is_bit_exact(kind, bits):
    raw = raw_tensor(kind)
    b = split_blocks(kind, raw)
    bq = transcode_gguf(b, bits)
    assert bq.bits == (bits or (4 if GGUF_TYPES[kind].bits <= 4 else 8))
    assert bq.block_size == GGUF_TYPES[kind].sub
    assert (bq.offsets is not None) == GGUF_TYPES[kind].offsets
    if bq.bits == 8:
        assert bq.zero_points is None  # centering lives in the codes: the kernel's symmetric path
    assert np.array_equal(bq.dequantize(), gguf_dequant(kind, raw, 6))
    rows = np.array([4, 0, 4])
    assert np.array_equal(bq.dequantize(rows), gguf_dequant(kind, raw, 6)[rows])  # the embedding-row gather


@pytest.mark.parametrize("kind", ["q4_k", "q6_k", "q5_0", "q2_k"])
def test_transcode_into_smaller_blocks_is_exact(kind):
    raw = raw_tensor(kind)
    bq = transcode_gguf(split_blocks(kind, raw), 8, 16 if GGUF_TYPES[kind].sub == 32 else None)
    assert bq.block_size == 16
    assert np.array_equal(bq.dequantize(), gguf_dequant(kind, raw, 6))
    with pytest.raises(EdgeError):
        transcode_gguf(split_blocks(kind, raw), 8, 64)


def test_wider_codes_do_not_fit_four_bits():
    for kind in ("q5_0", "q5_1", "q5_k", "q6_k", "q8_0"):
        b = split_blocks(kind, raw_tensor(kind))
        assert transcode_bits(b) == 8
        with pytest.raises(EdgeError, match="exactly"):
            transcode_gguf(b, 4)


def test_q4_k_keeps_four_bit_codes_and_its_minimum_as_offsets():
    raw = raw_tensor("q4_k")
    b = split_blocks("q4_k", raw)
    bq = transcode_gguf(b)
    assert np.array_equal(bq.unpacked_q(), b.q)  # the codes themselves, packed two per byte
    assert np.array_equal(bq.scales, b.d)         # d * sub-block scale, exact in float32
    z = bq.zero_point_values().astype(np.float64)
    np.testing.assert_array_equal(bq.offsets.astype(np.float64) - z * b.d, b.m)  # m = -(dmin * min)


def test_exact_zero_points():
    d = np.array([[1.0, 2.0 ** -20, 3.0]], np.float32)
    m = np.array([[0.5, 1.0, 2.0 ** 30]], np.float32)
    z = exact_zero_points(d, m, np.array([[8, 8, 8]]), 15)
    # 1 + 8*2^-20 needs 24 bits: exact; 2^30 + 3*z is exact only for z = 0 (its float32 ulp is 128)
    assert z.tolist() == [[8, 8, 0]]
    v = m.astype(np.float64) + z * d.astype(np.float64)
    assert np.array_equal(v.astype(np.float32).astype(np.float64), v)


def test_four_bit_zero_points_stored_only_when_a_block_needs_one():
    d = np.full((2, 2), 2.0 ** -10, np.float32)
    m = np.array([[0.25, -0.5], [2.0 ** 20, 0.0]], np.float32)
    q = RNG.integers(0, 16, (2, 2, 32)).astype(np.uint8)
    from export.sources.gguf_blocks import GGUFBlocks

    bq = transcode_gguf(GGUFBlocks("q4_1", d, m, q))
    assert bq.zero_points is not None and bq.zero_point_values().tolist() == [[8, 8], [0, 8]]
    assert np.array_equal(bq.dequantize(), GGUFBlocks("q4_1", d, m, q).dequantize())
    m[1, 0] = 1.0
    assert transcode_gguf(GGUFBlocks("q4_1", d, m, q)).zero_points is None


def test_block_quant_from_arrays_round_trip():
    b = split_blocks("q6_k", raw_tensor("q6_k"))
    bq = transcode_gguf(b)
    again = BlockQuant.from_arrays(bq.bits, bq.block_size, bq.shape, bq.arrays())
    assert np.array_equal(again.dequantize(), b.dequantize())


def test_gguf_paths_line():
    from export.quant.quantize import gguf_paths

    table = {"a": {"bits": 4, "method": "transcode", "gguf_type": "q4_k"},
             "b": {"bits": 8, "method": "transcode", "gguf_type": "q6_k"},
             "c": {"bits": 8, "method": "transcode", "gguf_type": "q6_k"},
             "e": {"bits": 4, "method": "search", "gguf_type": "q8_0"},
             "f": {"bits": 8, "method": "sym"}}
    assert gguf_paths(table) == ("GGUF tensors: 1 q4_k -> int4 exact, 2 q6_k -> int8 exact, "
                                 "1 q8_0 -> int4 re-quantized search")
    assert gguf_paths({"f": table["f"]}) is None
