"""Weight quantizers: float [N, K] (or GGUF blocks) -> BlockQuant, vectorized over all blocks; presets.

Every quantizer works on row chunks shaped [n, kb, bs] (n rows, kb blocks of bs elements) with whole-array
NumPy operations; Python only loops over row chunks (to stay in cache) and over the few search candidates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from edge_runtime.errors import EdgeError
from edge_runtime.format.config import ModelConfig
from edge_runtime.format.quant import BLOCK_SIZES, QUANT_TYPES, BlockQuant, pack_4bit

CHUNK_ELEMS = 1 << 17  # elements per row chunk: keeps the search's temporaries in L2
# Factors on the block range tried by the int4 search (1.0 = plain min/max). Each candidate's codes are refit
# by least squares, so the grid only has to propose code assignments; widening (> 1) helps the integer zero
# point, whose rounding shifts the grid. 12 points in [0.75, 1.1]: a denser grid barely lowers the error, and the
# search's time grows with every point.
SEARCH_RANGE_FACTORS = (1.0, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 1.025, 1.05, 1.075, 1.1)
SEARCH_REFITS = 3  # alternating (codes -> scale/zero point) rounds after the grid, from the best candidate
METHODS = ("sym", "asym", "rtn", "search", "gptq", "transcode")
PRESETS = ("fp32", "int8", "int4", "exact")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. method: sym|asym (8-bit), rtn|search|gptq (4-bit), transcode (GGUF blocks)."""

    bits: int
    block_size: int = 32
    method: str = "search"
    offsets: bool = False

    def __post_init__(self):
        if self.bits not in QUANT_TYPES or self.method not in METHODS or self.block_size not in BLOCK_SIZES:
            raise ValueError(f"invalid {self}: bits 4|8, method in {METHODS}, block_size in {BLOCK_SIZES}")


# -- shared block helpers ------------------------------------------------------------------------------------


def _check_shape(w: np.ndarray, block_size: int) -> tuple[int, int]:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {w.shape}")
    n, k = w.shape
    if block_size not in BLOCK_SIZES or k % block_size:
        raise ValueError(f"block size {block_size} must be one of {BLOCK_SIZES} and divide K={k}")
    return n, k


def _row_chunks(n: int, k: int):
    step = max(1, CHUNK_ELEMS // k)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _codes(x: np.ndarray, inv_s: np.ndarray, c: np.ndarray, qmax: int) -> np.ndarray:
    """clip(rint(x * inv_s + c), 0, qmax) as float32, with inv_s and c per block [n, kb, 1]."""
    q = x * inv_s
    q += c
    np.rint(q, out=q)
    return np.clip(q, 0, qmax, out=q)  # clip with out=: one in-place pass, faster than maximum + minimum


def _safe_inv(s: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(s != 0, 1.0 / s, 0.0).astype(np.float32)


def _pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes [N, kb, bs] (any numeric dtype) -> MatMulNBits qweight [N, kb, bs*bits/8]."""
    q = q.astype(np.uint8)
    return pack_4bit(q) if bits == 4 else q


# -- int8 ----------------------------------------------------------------------------------------------------


def quantize_int8(w: np.ndarray, block_size: int = 32, symmetric: bool = True) -> BlockQuant:
    """Weight-only block-wise int8 by round-to-nearest.

    symmetric: scale = absmax/127 and the default zero point 128 (no zero-point array); otherwise the block's
    [min, max] (widened to include 0) maps onto 0..255 with a stored integer zero point.
    """
    w = np.asarray(w, dtype=np.float32)
    n, k = _check_shape(w, block_size)
    qt = QUANT_TYPES[8]
    x = w.reshape(n, k // block_size, block_size)                # [N, kb, bs]
    if symmetric:
        s = np.abs(x).max(axis=-1) / 127.0                       # [N, kb]
        z = np.full_like(s, qt.default_zp)
    else:
        lo = np.minimum(x.min(axis=-1), 0.0)
        hi = np.maximum(x.max(axis=-1), 0.0)
        s = (hi - lo) / qt.qmax
        z = np.clip(np.rint(-lo * _safe_inv(s)), 0, qt.qmax)
    q = _codes(x, _safe_inv(s)[..., None], z[..., None], qt.qmax)
    zp = None if symmetric else z.astype(np.uint8)
    return BlockQuant(8, block_size, (n, k), q.astype(np.uint8), s.astype(np.float32), zp)


# -- int4 ----------------------------------------------------------------------------------------------------


def _bsum(a: np.ndarray, b: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-block sum of a (or a*b) over the last axis, float64 [n, kb] (einsum: faster than .sum on short axes)."""
    s = np.einsum("...i->...", a) if b is None else np.einsum("...i,...i->...", a, b)
    return s.astype(np.float64)


@dataclass
class _Moments:
    """Per-block weighted sums, float64 [n, kb]: all a least-squares fit of x ~ s*q + m needs."""

    sw: np.ndarray
    swx: np.ndarray
    swxx: np.ndarray
    wx: np.ndarray  # x * weights, float32 [n, kb, bs] (x itself when unweighted)
    swq: Optional[np.ndarray] = None  # the code sums, once codes are chosen (with_codes)
    swqq: Optional[np.ndarray] = None
    swxq: Optional[np.ndarray] = None

    @classmethod
    def of(cls, x: np.ndarray, wt: Optional[np.ndarray]) -> "_Moments":
        if wt is None:
            return cls(np.full(x.shape[:-1], x.shape[-1], np.float64), _bsum(x), _bsum(x, x), x)
        wx = x * wt
        sw = np.broadcast_to(wt.sum(axis=-1, dtype=np.float64), x.shape[:-1])
        return cls(sw, _bsum(wx), _bsum(wx, x), wx)

    def with_codes(self, q: np.ndarray, wt: Optional[np.ndarray]) -> "_Moments":
        wq = q if wt is None else q * wt
        return _Moments(self.sw, self.swx, self.swxx, self.wx, _bsum(wq), _bsum(wq, q), _bsum(self.wx, q))


def _fit_offset(mo: _Moments, s_old: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares of x ~ s*q + m for fixed codes -> (s, m, squared error), all [n, kb]."""
    vqq = mo.sw * mo.swqq - mo.swq ** 2
    vxq = mo.sw * mo.swxq - mo.swx * mo.swq
    ok = vqq > 0  # a block whose codes are all equal keeps its scale; its mean goes into m
    s = np.where(ok, vxq / np.where(ok, vqq, 1.0), s_old)
    m = (mo.swx - s * mo.swq) / np.maximum(mo.sw, 1e-30)
    return s, m, _fixed_error(mo, s, m, offsets=True)


def _fit_int_zp(mo: _Moments, s_old: np.ndarray, z_old: np.ndarray, qmax: int):
    """Least squares for x ~ s*(q - z) with integer z in [0, qmax], codes fixed -> (s, z, squared error)."""
    s, m, _ = _fit_offset(mo, s_old)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(s != 0, np.clip(np.rint(-m / s), 0, qmax), z_old)
    num = mo.swxq - z * mo.swx                                # sum w x (q - z)
    den = mo.swqq - 2 * z * mo.swq + z * z * mo.sw            # sum w (q - z)^2
    ok = den > 0
    s = np.where(ok, num / np.where(ok, den, 1.0), s_old)
    return s, z, _fixed_error(mo, s, z, offsets=False)


def _int4_candidates(x: np.ndarray, offsets: bool, qmax: int):
    """Yield (s, p) per range factor; p is the integer zero point z, or the float minimum m with offsets."""
    lo, hi = x.min(axis=-1), x.max(axis=-1)                   # [n, kb]
    if not offsets:  # an integer zero point can only place 0 on the grid if the range contains it
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    mid = (lo + hi) / 2
    for f in SEARCH_RANGE_FACTORS:
        if offsets:  # scale around the middle: the float minimum can sit anywhere
            a = mid - f * (hi - lo) / 2
            yield f * (hi - lo) / qmax, a
        else:        # scale about 0, which the integer zero point keeps exactly representable
            s = f * (hi - lo) / qmax
            yield s, np.clip(np.rint(-f * lo * _safe_inv(s)), 0, qmax)


def _code_shift(s: np.ndarray, p: np.ndarray, offsets: bool) -> np.ndarray:
    """The c of _codes, [n, kb, 1]: codes are rint(x/s + z), or rint((x - m)/s) with offsets."""
    c = -p * _safe_inv(s) if offsets else p
    return c[..., None].astype(np.float32)


def _search_chunk(x: np.ndarray, wt: Optional[np.ndarray], offsets: bool, qmax: int, grid: bool):
    """Best (s, p) per block of one chunk [n, kb, bs] by weighted squared error; p as in _int4_candidates."""
    cands = _int4_candidates(x, offsets, qmax)
    if not grid:  # plain RTN: the first candidate is the block's own range
        return next(cands)
    mo = _Moments.of(x, wt)
    best = None
    for s0, p0 in cands:
        best = _refit_and_keep(x, wt, mo, s0, p0, offsets, qmax, best)
    for _ in range(SEARCH_REFITS):
        best = _refit_and_keep(x, wt, mo, best[0], best[1], offsets, qmax, best)
    return best[0], best[1]


def _refit_and_keep(x, wt, mo, s0, p0, offsets, qmax, best):
    """Quantize with (s0, p0), refit the block parameters to the codes, keep whichever blocks improved.

    (s0, p0) itself competes too, so the search is never worse than its first candidate (plain RTN).
    """
    q = _codes(x, _safe_inv(s0)[..., None], _code_shift(s0, p0, offsets), qmax)
    mq = mo.with_codes(q, wt)
    tries = [(s0, p0, _fixed_error(mq, s0, p0, offsets))]
    tries.append(_fit_offset(mq, s0) if offsets else _fit_int_zp(mq, s0, p0, qmax))
    for s, p, err in tries:
        if best is None:
            best = (s, p, err)
            continue
        better = err < best[2]
        best = (np.where(better, s, best[0]), np.where(better, p, best[1]), np.where(better, err, best[2]))
    return best


def _fixed_error(mo: _Moments, s: np.ndarray, p: np.ndarray, offsets: bool) -> np.ndarray:
    """Weighted squared error of x ~ s*q + m (offsets, p = m) or s*(q - z) (p = z), from the moments."""
    m = p if offsets else -s * p
    return mo.swxx - 2 * s * mo.swxq - 2 * m * mo.swx + s * s * mo.swqq + 2 * s * m * mo.swq + m * m * mo.sw


def _importance(act_scale: Optional[np.ndarray], k: int, block_size: int) -> Optional[np.ndarray]:
    """Per-element error weights [kb, bs] from calibration: act_scale^2 (E[x_k^2] if act_scale is the RMS)."""
    if act_scale is None:
        return None
    a = np.asarray(act_scale, dtype=np.float64).reshape(-1)
    if a.shape[0] != k:
        raise ValueError(f"act_scale has {a.shape[0]} entries, the weight has K={k}")
    wt = a * a / max(float(np.mean(a * a)), 1e-30)
    # A floor keeps channels that calibration never excited from being quantized arbitrarily badly.
    return np.maximum(wt, 1e-3).astype(np.float32).reshape(k // block_size, block_size)


def quantize_int4(w: np.ndarray, block_size: int = 32, method: str = "search", offsets: bool = False,
                  act_scale: Optional[np.ndarray] = None, hessian: Optional[np.ndarray] = None) -> BlockQuant:
    """Block-wise 4-bit quantization with integer zero points (and optionally a float offset per block).

    method="rtn": the block's [min, max] (including 0) onto 0..15, round to nearest.
    method="search": try scaled ranges, refit (scale, zero point) to each candidate's codes by least squares
    and alternate codes / refit from the best (HQQ-like), minimizing the squared error weighted by act_scale^2
    (act_scale: [K] activation RMS per input channel from calibration, optional).
    method="gptq": the search's block parameters, codes rounded by GPTQ under the input second moments
    `hessian` [K, K] (export.quant.gptq); integer zero points only.
    offsets=True: fit W ~ s*q + m with a float m per block, stored as the default zero point 8 plus
    offsets = m + 8*s (the graph adds blocksum(x) @ offsets^T), i.e. GGUF Q4_1's asymmetric blocks.
    """
    if method not in ("rtn", "search", "gptq"):
        raise ValueError(f"int4 method must be 'rtn', 'search' or 'gptq', not {method!r}")
    w = np.asarray(w, dtype=np.float32)
    n, k = _check_shape(w, block_size)
    qt, kb = QUANT_TYPES[4], k // block_size
    if method == "gptq":
        return _quantize_int4_gptq(w, block_size, offsets, hessian)
    wt = _importance(act_scale, k, block_size) if method == "search" else None
    qweight = np.empty((n, kb, qt.block_bytes(block_size)), np.uint8)
    scales = np.empty((n, kb), np.float32)
    param = np.empty((n, kb), np.float32)  # integer zero point, or the float minimum m with offsets
    for rows in _row_chunks(n, k):
        x = w[rows].reshape(-1, kb, block_size)  # [n, kb, bs]
        s, p = _search_chunk(x, wt, offsets, qt.qmax, grid=(method == "search"))
        s, p = s.astype(np.float32), p.astype(np.float32)
        q = _codes(x, _safe_inv(s)[..., None], _code_shift(s, p, offsets), qt.qmax)
        qweight[rows], scales[rows], param[rows] = _pack_codes(q, 4), s, p
    if offsets:  # W = s*q + m = (q - 8)*s + (m + 8s)
        return BlockQuant(4, block_size, (n, k), qweight, scales, None, param + qt.default_zp * scales)
    return BlockQuant(4, block_size, (n, k), qweight, scales, pack_4bit(param.astype(np.uint8)))


def _quantize_int4_gptq(w: np.ndarray, block_size: int, offsets: bool, hessian: Optional[np.ndarray]) -> BlockQuant:
    from .gptq import gptq_int4

    n, k = w.shape
    if offsets:
        raise ValueError("int4 method 'gptq' rounds onto integer zero points: it takes no offsets")
    if hessian is None or hessian.shape != (k, k):
        raise ValueError(f"int4 method 'gptq' needs the input Hessian [K, K] = [{k}, {k}]")
    qmax = QUANT_TYPES[4].qmax

    def search_block(x, wt):
        return _search_chunk(x, wt, False, qmax, grid=True)

    codes, s, z = gptq_int4(w, hessian, block_size, search_block)
    qweight = _pack_codes(codes.reshape(n, k // block_size, block_size), 4)
    return BlockQuant(4, block_size, (n, k), qweight, s, pack_4bit(z.astype(np.uint8)))


# -- GGUF transcoding ----------------------------------------------------------------------------------------


def _split_blocks(d: np.ndarray, m: Optional[np.ndarray], q: np.ndarray, block_size: Optional[int]):
    """GGUF sub-blocks cut into blocks of block_size (dividing theirs) sharing their parent's d and m: exact."""
    n, kb, bs = q.shape
    if block_size is None or block_size == bs:
        return d, m, q
    if block_size > bs or bs % block_size:
        raise EdgeError(f"cannot transcode GGUF blocks of {bs} into blocks of {block_size} exactly")
    parts = bs // block_size
    m = None if m is None else np.repeat(m, parts, axis=1)
    return np.repeat(d, parts, axis=1), m, q.reshape(n, kb * parts, block_size)


def _is_float32(v: np.ndarray) -> np.ndarray:
    """v (float64) is exactly a float32."""
    return v.astype(np.float32).astype(np.float64) == v


def exact_zero_points(d: np.ndarray, m: np.ndarray, want: np.ndarray, zmax: int) -> np.ndarray:
    """Per block, the integer zero point z in [0, zmax] nearest `want` for which m + z*d is a float32 exactly.

    An asymmetric block W = d*q + m is stored as (q - z)*d + (m + z*d); the bundle's offset m + z*d is then
    exact, so dequantization rounds once, like gguf's. z = 0 always qualifies (the offset is m itself); a
    centered z keeps (q - z) small, which is what ONNX Runtime's int8 activations multiply.
    d, m: float32 [N, kb]; want: integer-valued [N, kb]. Loops over candidate distances, not blocks.
    """
    d64, m64 = d.astype(np.float64), m.astype(np.float64)
    z = np.zeros(d.shape, np.int64)
    todo = np.ones(d.shape, bool)
    for step in range(zmax + 1):
        for sign in ((0,) if step == 0 else (-1, 1)):
            cand = want.astype(np.int64) + sign * step
            ok = todo & (cand >= 0) & (cand <= zmax)
            ok[ok] = _is_float32(m64[ok] + cand[ok] * d64[ok])
            z[ok] = cand[ok]
            todo &= ~ok
        if not todo.any():
            break
    return z  # blocks never matched keep 0


def _transcode_symmetric(blocks, d, q, bits: int) -> BlockQuant:
    """W = d*(q - zero): codes shifted so the bundle's default zero point stands for the type's (exact)."""
    n, kb, bs = q.shape
    qt = QUANT_TYPES[bits]
    shift = qt.default_zp - blocks.type.zero
    top = (1 << blocks.type.bits) - 1
    if shift < 0 or top + shift > qt.qmax:
        raise EdgeError(f"cannot hold GGUF {blocks.kind} codes in {bits} bits with the default zero point")
    codes = (q.astype(np.int16) + shift).astype(np.uint8)
    return BlockQuant(bits, bs, (n, kb * bs), _pack_codes(codes, bits), d.copy())


def _transcode_asymmetric(d, m, q, bits: int) -> BlockQuant:
    """W = d*q + m as (q - z)*d + (m + z*d), z per block from exact_zero_points.

    4 bits: z near the default 8, stored only if some block needs another one. 8 bits: z near the block's mean
    code, folded into the codes (q - z + 128, default zero point), so no zero-point array is stored."""
    n, kb, bs = q.shape
    qt = QUANT_TYPES[bits]
    if bits == 4:
        z = exact_zero_points(d, m, np.full(d.shape, qt.default_zp), qt.qmax)
        offsets = (m.astype(np.float64) + z * d.astype(np.float64)).astype(np.float32)
        zp = None if (z == qt.default_zp).all() else pack_4bit(z.astype(np.uint8))
        return BlockQuant(4, bs, (n, kb * bs), pack_4bit(q), d.copy(), zp, offsets)
    top = int(q.max(initial=0))
    z = exact_zero_points(d, m, np.rint(q.mean(axis=-1, dtype=np.float32)), top)
    offsets = (m.astype(np.float64) + z * d.astype(np.float64)).astype(np.float32)
    codes = (q.astype(np.int16) - z[..., None] + qt.default_zp).astype(np.uint8)  # z <= top < 128: in range
    return BlockQuant(8, bs, (n, kb * bs), codes, d.copy(), None, offsets)


def transcode_bits(blocks) -> int:
    """The narrowest bundle width that holds the GGUF type's codes: 4 or 8."""
    return 4 if blocks.type.bits <= 4 else 8


def transcode_gguf(blocks, bits: Optional[int] = None, block_size: Optional[int] = None) -> BlockQuant:
    """GGUF blocks (export.sources.GGUFBlocks, any type of GGUF_TYPES) -> the same values as a BlockQuant.

    Symmetric types (W = d*(q - zero): Q4_0, Q5_0, Q8_0, Q3_K, Q6_K) keep their codes, shifted so that the
    bundle's default zero point (8 or 128) stands for the type's; asymmetric ones (W = d*q + m: Q4_1, Q5_1,
    Q2_K, Q4_K, Q5_K) get a per-block offset (see exact_zero_points). Either way BlockQuant.dequantize gives
    gguf's float32 values bit for bit.
    bits: 4 or 8 (default: the narrowest that holds the codes, transcode_bits). 8 bits on 4-bit codes runs
    them on the int8 kernel. block_size: dividing the GGUF sub-block (32 or 16); smaller blocks repeat their
    parent's d and m.
    """
    bits = transcode_bits(blocks) if bits is None else bits
    if bits not in QUANT_TYPES or blocks.type.bits > bits:
        raise EdgeError(f"cannot transcode GGUF {blocks.kind} ({blocks.type.bits}-bit codes) to {bits} bits exactly")
    d, m, q = _split_blocks(blocks.d, blocks.m, blocks.q, block_size)  # [N, kb], [N, kb] | None, [N, kb, bs]
    if m is None:
        return _transcode_symmetric(blocks, d, q, bits)
    return _transcode_asymmetric(d, m, q, bits)


def gguf_paths(tensors: Mapping[str, dict]) -> Optional[str]:
    """One line from the manifest's quantization table: which GGUF types were transcoded exactly, which
    re-quantized from their float values (None when no tensor came from GGUF blocks)."""
    paths: dict[tuple, int] = {}
    for entry in tensors.values():
        if "gguf_type" in entry:
            how = "exact" if entry["method"] == "transcode" else f"re-quantized {entry['method']}"
            key = (how, entry["gguf_type"], entry["bits"])
            paths[key] = paths.get(key, 0) + 1
    if not paths:
        return None
    parts = [f"{n} {kind} -> int{bits} {how}" for (how, kind, bits), n in sorted(paths.items())]
    return "GGUF tensors: " + ", ".join(parts)


# -- per-tensor dispatch and presets -------------------------------------------------------------------------


def quantize_tensor(name: str, w: np.ndarray, spec: QuantSpec, gguf_blocks: Optional[Mapping] = None,
                    act_scale: Optional[np.ndarray] = None, hessian: Optional[np.ndarray] = None) -> BlockQuant:
    """Quantize one HF tensor by its spec; gguf_blocks maps HF names to GGUF blocks (needed for transcode)."""
    if spec.method == "transcode":
        if not gguf_blocks or name not in gguf_blocks:
            raise EdgeError(f"cannot transcode {name}: the source has no GGUF blocks for it")
        return transcode_gguf(gguf_blocks[name], spec.bits, spec.block_size)
    if spec.bits == 8:
        return quantize_int8(w, spec.block_size, symmetric=(spec.method != "asym"))
    if spec.bits == 4:
        return quantize_int4(w, spec.block_size, spec.method, spec.offsets, act_scale, hessian)
    raise EdgeError(f"{name}: unsupported quantization width {spec.bits} bits (supported: 4, 8)")


def _fitting_block_size(k: int, wanted: int) -> Optional[int]:
    """The largest supported block size <= wanted that divides K (None: keep the tensor in fp32)."""
    return next((bs for bs in sorted(BLOCK_SIZES, reverse=True) if bs <= wanted and k % bs == 0), None)


def _transcode_spec(blocks, preset: str, block_size: int) -> QuantSpec:
    """The exact transcode of GGUF blocks: the narrowest width holding their codes (8 for 5- to 8-bit codes,
    whatever the preset), 8 under int8.

    int8, and exact for the codes it holds at 8 bits, split the GGUF blocks into the preset's smaller blocks
    when asked (still exact): MatMulNBits rounds its int8 activations per weight block, so smaller blocks mean
    finer activations."""
    sub = blocks.q.shape[-1]
    bits = 8 if preset == "int8" else transcode_bits(blocks)
    splits = preset == "int8" or (preset == "exact" and bits == 8)
    bs = block_size if splits and block_size < sub and sub % block_size == 0 else sub
    return QuantSpec(bits, bs, "transcode", offsets=blocks.m is not None)


def _fits_preset(blocks, preset: str) -> bool:
    """Whether a GGUF tensor is transcoded under the preset (else re-quantized from its float values).

    int8 and exact: always. int4: all but Q8_0, which is re-quantized to 4 bits: a tied Q8_0 embedding (as
    SmolLM2's) is the lm_head too, and an 8-bit lm_head takes longer per token than a 4-bit one (per-op times:
    bench/ort_graph.py profile); recipe mixed weighs that choice, recipe exact keeps it."""
    return preset != "int4" or blocks.kind != "q8_0"


def preset_specs(config: ModelConfig, preset: str, gguf_blocks: Optional[Mapping] = None,
                 transcode: bool = True, block_size: int = 32, method: str = "search",
                 offsets: bool = False, int8_method: str = "sym") -> dict:
    """HF name -> QuantSpec (or None: stays fp32) for every tensor of the model under a preset.

    Every linear weight is quantized (q/k/v/o, gate/up/down, lm_head and the token embedding); norms and
    biases stay fp32. int8: block-wise int8, `int8_method` sym (scales only) or asym (integer zero points,
    1 byte per block more: finer steps for blocks not centered on 0, as Q4_1-derived or smoothed weights are).
    int4: 4-bit with `method` / `offsets`; method gptq only for matmul weights GPTQ can round (export.quant.gptq
    hessian_keys: not the embedding table, nor a tied lm_head), the search for the others. transcode=True:
    a tensor with GGUF blocks is transcoded exactly instead (see transcode_gguf, _fits_preset): 4-bit codes
    into the preset's width, 5- to 8-bit codes into 8 bits. exact: every GGUF-quantized tensor transcoded
    (Q8_0 too), the float ones as int8. A tensor whose K no supported block size <= block_size divides stays
    fp32.
    """
    if preset not in PRESETS:
        raise EdgeError(f"unknown quantization preset {preset!r} (choose from {', '.join(PRESETS)})")
    gptq_names = set()
    if method == "gptq":
        from .gptq import hessian_keys

        gptq_names = set(hessian_keys(config))
    from edge_runtime.spec import spec_for

    spec = spec_for(config)
    in_features = spec.in_features()  # the matrices; norms and biases stay fp32
    specs = {}
    for name in spec.tensor_names():
        k = in_features.get(name)
        bs = None if k is None else _fitting_block_size(k, block_size)
        if preset == "fp32" or bs is None:
            specs[name] = None
        elif transcode and gguf_blocks and name in gguf_blocks and _fits_preset(gguf_blocks[name], preset):
            specs[name] = _transcode_spec(gguf_blocks[name], preset, bs)
        elif preset in ("int8", "exact"):
            specs[name] = QuantSpec(8, bs, int8_method)
        else:
            specs[name] = QuantSpec(4, bs, "search" if method == "gptq" and name not in gptq_names else method,
                                    offsets)
    return specs
