"""Block-quantized matrix products for the NumPy backend, computed without materializing the float matrix.

For a weight `W[n, b*bs + i] = q[n, b, i] * s[n, b] + c[n, b]` (c = offset - zp*scale, see quant.py) and
activations `x` [S, K], split into blocks `x[t, b, i]`:

    y[t, n] = sum_b s[n, b] * z[b, n, t]  +  sum_b c[n, b] * xs[t, b]
    z[b, n, t] = sum_i q[n, b, i] * x[t, b, i]     (one small matmul per block: the codes stay integers)
    xs[t, b]   = sum_i x[t, b, i]                  (block sums of the activations)

Rows are processed in chunks whose float codes stay in a core's L2 cache, so memory traffic is the packed
codes only. 4-bit codes are unpacked with 64-bit masks into `[low nibbles | high nibbles]` order per block;
the activations are permuted to match instead of interleaving the codes.

With int8 activations (what MatMulNBits does at accuracy_level 4) the activations are rounded per block to
integer codes `xi` with a scale `xsc[t, b]`, and the products are taken on integers, as MLAS does:

    y[t, n] = sum_b s[n, b] * xsc[t, b] * (z[b, n, t] - zp[n, b] * xis[t, b])  (+ offsets, see above)
    z[b, n, t] = sum_i q[n, b, i] * xi[t, b, i],   xis[t, b] = sum_i xi[t, b, i]

Codes times int8 values summed over a block stay far below 2^24, so z is exact in float32 whatever order BLAS
sums in, and the sum over blocks runs in a fixed order: a row's result does not depend on how many rows are
computed with it. That keeps a prompt prefilled in one pass, in chunks, or token by token on the same logits
(the int8 rounding of the next matmul's input would otherwise amplify an ulp into a different token).
"""
from __future__ import annotations

import ctypes
import glob
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from ...format.quant import BlockQuant, Rows

# Float codes per row chunk: 1 MB, a core's L2; smaller chunks run slower, larger ones no faster
# (bench/run_one.py --backend numpy).
CHUNK_FLOATS = 1 << 18
BLOCKWISE_MAX_ROWS = 12  # float activation rows up to which per-block products beat dequantize + GEMM (measured)
INT8_ROWS = 32  # int8 activation rows per per-block product: bounds the per-thread product buffer
_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_FOUR = np.uint64(4)

# -- threads --------------------------------------------------------------------------------------

def _openblas_setter() -> Callable[[int], None] | None:
    """openblas_set_num_threads of the OpenBLAS that NumPy loaded, if we find it (threadpoolctl's trick)."""
    libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    names = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
             "openblas_set_num_threads64_", "openblas_set_num_threads")
    for path in sorted(glob.glob(os.path.join(libdir, "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                return lambda n: fn(int(n))
    return None


def set_blas_threads(n: int) -> bool:
    """Limit NumPy's BLAS to `n` threads (process-wide). False when the BLAS is not an OpenBLAS we can reach;
    then OPENBLAS_NUM_THREADS / OMP_NUM_THREADS set before importing numpy are the only control.

    The NumPy backend sets 1: its own threads share every product by row chunks, and BLAS threads on top of
    them oversubscribe the cores (on a busy machine that slows a prefill chunk's GEMM down by a large factor).
    """
    setter = _openblas_setter()
    if setter is None:
        return False
    setter(n)
    return True


class Workspace(threading.local):
    """Per-thread scratch memory: a few flat buffers, and views of them cut once per chunk shape."""

    def __init__(self):
        self.buffers: dict[str, np.ndarray] = {}
        self.frames: dict[tuple, _Frame] = {}

    def take(self, role: str, shape: tuple, dtype) -> np.ndarray:
        """A view [shape] of this thread's buffer for `role` (grown, dropping cached frames, if too small)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        buf = self.buffers.get(role)
        if buf is None or buf.size < nbytes:
            # 25% headroom: chunk sizes differ a little between matrices; growing once is enough.
            buf = self.buffers[role] = np.empty(nbytes + nbytes // 4, np.uint8)
            self.frames.clear()  # they hold views of the old buffer
        return buf[:nbytes].view(dtype).reshape(shape)


class _Frame:
    """Views of one thread's buffers for a chunk of n rows and S activation rows (built once, reused)."""

    def __init__(self, ws: Workspace, bits: int, n: int, kb: int, bs: int, s_rows: int):
        self.f = ws.take("f32", (n, kb, bs), np.float32)  # float codes [n, kb, bs]
        self.f_t = self.f.transpose(1, 0, 2)                # [kb, n, bs]: one matrix per block
        self.f_rows = self.f.reshape(n, kb * bs)            # [n, K]
        self.z = ws.take("z", (kb, n, s_rows), np.float32)  # per-block products [kb, n, S]
        self.t = ws.take("t", (kb, n, s_rows), np.float32)  # terms of the int8 products [kb, n, S]
        self.y = ws.take("y", (n, s_rows), np.float32)      # their sum over blocks [n, S]
        if bits == 4:
            half = np.dtype((np.void, bs // 2))             # one half-block of codes, as one item
            words = n * kb * bs // 16                       # uint64 words of packed codes
            self.u = ws.take("u8", (n, kb, bs), np.uint8)   # codes [n, kb, (low nibbles | high nibbles)]
            self.lo = ws.take("lo", (words,), np.uint64)
            self.hi = ws.take("hi", (words,), np.uint64)
            pairs = self.u.reshape(-1).view(half).reshape(n * kb, 2)
            self.lo_dst, self.hi_dst = pairs[:, 0], pairs[:, 1]
            self.lo_src, self.hi_src = self.lo.view(half), self.hi.view(half)


class RowPool:
    """Runs work items (row chunks) on `threads` threads that take the next item as they become free.

    NumPy releases the GIL inside casts, bitwise ufuncs and BLAS calls, so the threads really run in parallel;
    each thread has its own Workspace. Items are handed out dynamically, so a thread that the OS schedules
    late (a busy or big.LITTLE machine) just takes fewer of them instead of holding the others up.
    """

    def __init__(self, threads: int = 1):
        self.threads = max(1, int(threads))
        self._executor = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None
        self.local = Workspace()

    def run(self, fn: Callable[[int], None], n_items: int) -> None:
        """Call fn(i) for every i in [0, n_items), on the calling thread and the pool's helpers."""
        if self._executor is None or n_items < 2:
            for i in range(n_items):
                fn(i)
            return
        counter = itertools.count()  # next() on it is atomic under the GIL

        def drain() -> None:
            for i in iter(counter.__next__, -1):
                if i >= n_items:
                    return
                fn(i)

        helpers = [self._executor.submit(drain) for _ in range(min(self.threads, n_items) - 1)]
        drain()
        for h in helpers:
            if not h.cancel():  # a helper that never started has nothing to finish
                h.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def row_chunks(n: int, k: int, threads: int) -> list[tuple[int, int]]:
    """[r0, r1) row ranges of at most about CHUNK_FLOATS elements each, as many as a multiple of `threads` so
    that every thread gets the same share."""
    count = -(-n * k // CHUNK_FLOATS)
    count = min(n, -(-count // threads) * threads)
    rows = -(-n // count)
    return [(r, min(r + rows, n)) for r in range(0, n, rows)]


# -- quantized matrix -----------------------------------------------------------------------------

def int8_codes(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """x [S, K] rounded to int8 per block of `block` values (what MatMulNBits does to its input at
    accuracy_level 4): (codes [S, kb, block] float32 holding integers in -127..127, scales [S, kb] absmax/127)."""
    s_rows, k = x.shape
    xb = x.reshape(s_rows, k // block, block)
    amax = np.abs(xb).max(axis=2, keepdims=True)
    # MLAS multiplies by 127/amax, not by 1/scale: the two differ by an ulp, which flips exact .5 ties
    # (common: inputs built from quantized embeddings land on them) and moves whole output rows.
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    return np.rint(xb * inv).astype(np.float32, copy=False), (amax / np.float32(127))[:, :, 0]


def int8_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """x [S, K] as MatMulNBits rounds it at accuracy_level 4 (int8_codes times their scales), float32."""
    codes, scales = int8_codes(x, block)
    return (codes * scales[:, :, None]).reshape(x.shape).astype(np.float32, copy=False)


class QuantMatrix:
    """A block-quantized weight W [N, K] (the mmapped arrays of a BlockQuant) times float activations."""

    def __init__(self, bq: BlockQuant, pool: RowPool, int8_activations: bool = False):
        self.bq, self.pool = bq, pool
        # ORT's MatMulNBits at accuracy_level 4 quantizes activations to int8 per weight block before the
        # product (and its zero-point term); emulating it keeps the two backends on the same numbers.
        self.int8_activations = int8_activations
        self.n, self.k = bq.shape
        self.bits, self.bs, self.kb = bq.bits, bq.block_size, bq.n_blocks
        self.bounds = row_chunks(self.n, self.k, pool.threads)
        # Per-chunk views, cut once: packed codes (4-bit: as uint64 words) and scales as [kb, n, 1].
        qw = bq.qweight
        self.q_chunks = [qw[c0:c1].reshape(-1).view(np.uint64) if self.bits == 4 else qw[c0:c1]
                         for c0, c1 in self.bounds]
        self.s_chunks = [bq.scales[c0:c1].T[:, :, None] for c0, c1 in self.bounds]
        # Column order of the unpacked codes: per block, the even (low-nibble) elements then the odd ones.
        half = np.arange(self.bs)
        if self.bits == 4:
            half = np.r_[half[0::2], half[1::2]]
        self.perm = (np.arange(self.kb)[:, None] * self.bs + half[None, :]).reshape(-1)  # [K]
        # Zero points, kept only when stored (else the type's default): with float activations as -zp*scale
        # [N, kb]; with int8 ones as float32 integers [n, kb, 1] per chunk, subtracted from the codes.
        self._zp_bias, self.zp_chunks = None, None
        if bq.zero_points is not None and int8_activations:
            zp = bq.zero_point_values().astype(np.float32)
            self.zp_chunks = [zp[c0:c1, :, None] for c0, c1 in self.bounds]
        elif bq.zero_points is not None:
            self._zp_bias = self.zero_point_bias(slice(None))
        self.off_chunks = None  # offsets [kb, n, 1] per chunk (views of the mmapped ones would be strided)
        if bq.offsets is not None and int8_activations:
            self.off_chunks = [np.ascontiguousarray(bq.offsets[c0:c1].T)[:, :, None] for c0, c1 in self.bounds]

    @property
    def shape(self) -> tuple:
        return (self.n, self.k)

    @property
    def resident_nbytes(self) -> int:
        """Bytes this matrix holds in RAM besides the mmapped bundle arrays."""
        chunks = (self.zp_chunks or []) + (self.off_chunks or [])
        return int(sum(c.nbytes for c in chunks)) + (0 if self._zp_bias is None else int(self._zp_bias.nbytes))

    def zero_point_bias(self, rows: Rows) -> np.ndarray:
        """-zp*scale, float32 [n, kb] for the given rows (slice or index array)."""
        return self.bq.zero_point_values(rows).astype(np.float32) * -self.bq.scales[rows]

    def dequantize(self, rows: Rows = slice(None)) -> np.ndarray:
        """Float32 W[rows] in true column order: [n, K]. Used for embedding rows and resident copies."""
        return self.bq.dequantize(rows)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x [S, K] float32 -> x @ W.T [S, N] float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.int8_activations:
            return self._int8_matmul(x)
        s_rows = x.shape[0]
        xp = x[:, self.perm] if self.bits == 4 else x  # [S, K] in code column order
        y = np.empty((s_rows, self.n), np.float32)
        if s_rows <= BLOCKWISE_MAX_ROWS:
            xbt = np.ascontiguousarray(xp.reshape(s_rows, self.kb, self.bs).transpose(1, 2, 0))  # [kb, bs, S]
            self.pool.run(lambda i: self._blockwise(xbt, y.T, i), len(self.bounds))
        else:
            self.pool.run(lambda i: self._dequant_gemm(xp, y, i), len(self.bounds))
        sums = x.reshape(s_rows, self.kb, self.bs).sum(axis=2)                 # [S, kb]
        y += self._bias_product(sums)
        if self.bq.offsets is not None:
            y += sums @ self.bq.offsets.T
        return y

    def _int8_matmul(self, x: np.ndarray) -> np.ndarray:
        """x [S, K] -> y [S, N] on int8 activation codes (module docstring): each row independent of the others."""
        s_rows = x.shape[0]
        xi, xsc = int8_codes(x, self.bs)                                      # [S, kb, bs], [S, kb]
        xp = xi.reshape(s_rows, self.k)[:, self.perm] if self.bits == 4 else xi.reshape(s_rows, self.k)
        xb = xp.reshape(s_rows, self.kb, self.bs)
        parts = []
        for t0 in range(0, s_rows, INT8_ROWS):                                # contiguous operands per part
            t = slice(t0, min(t0 + INT8_ROWS, s_rows))
            terms = [xsc[t]]
            if self.bq.offsets is not None:  # the graph sums the float activations for this term (ReduceSum)
                terms.append(x[t].reshape(-1, self.kb, self.bs).sum(axis=2))
            parts.append((t, np.ascontiguousarray(xb[t].transpose(1, 2, 0)),  # [kb, bs, s]
                          *[np.ascontiguousarray(a.T)[:, None, :] for a in terms]))  # [kb, 1, s] each
        y = np.empty((s_rows, self.n), np.float32)
        self.pool.run(lambda i: self._int8_blockwise(parts, y, i), len(self.bounds))
        return y

    def _int8_blockwise(self, parts: list, y: np.ndarray, i: int) -> None:
        """y[:, rows of chunk i] from exact per-block integer products [kb, n, s], part by part of the rows."""
        c0, c1 = self.bounds[i]
        fr = self._frame(c1 - c0, parts[0][1].shape[2])
        zero = self.zp_chunks[i] if self.zp_chunks is not None else np.float32(self.bq.qtype.default_zp)
        self._codes(i, fr, zero)                                              # q - zp: exact small integers
        offsets = self.off_chunks[i] if self.off_chunks is not None else None
        for t, xbt, xst, *sums in parts:
            s = xbt.shape[2]
            z, tmp, acc = fr.z[:, :, :s], fr.t[:, :, :s], fr.y[:, :s]         # [kb, n, s], [kb, n, s], [n, s]
            np.matmul(fr.f_t, xbt, out=z)                                     # exact: integers below 2^24
            z *= self.s_chunks[i]                                             # [kb, n, 1]
            z *= xst                                                          # [kb, 1, s]
            if offsets is not None:
                np.multiply(offsets, sums[0], out=tmp)
                z += tmp
            np.add.reduce(z, axis=0, out=acc)                                 # over blocks, in order
            y[t, c0:c1] = acc.T

    def _bias_product(self, xs: np.ndarray) -> np.ndarray:
        """xs [S, kb] block sums -> sum_b (-zp*scale)[n, b] * xs[t, b]: [S, N]."""
        if self._zp_bias is not None:
            return xs @ self._zp_bias.T
        return (xs @ self.bq.scales.T) * np.float32(-self.bq.qtype.default_zp)

    def _frame(self, n: int, s_rows: int) -> _Frame:
        ws = self.pool.local
        key = (self.bits, n, self.kb, self.bs, s_rows)
        frame = ws.frames.get(key)
        if frame is None:
            frame = ws.frames[key] = _Frame(ws, self.bits, n, self.kb, self.bs, s_rows)
        return frame

    def _codes(self, i: int, fr: _Frame, zero=None) -> None:
        """Codes of row chunk i as float32 into fr.f [n, kb, bs] (4-bit: low nibbles first in each block), minus
        `zero` ([n, kb, 1] or a scalar) if given."""
        q = self.q_chunks[i]
        if self.bits == 8:
            self._to_float(q, fr.f, zero)
            return
        # Nibbles are split with 64-bit masks (16 codes per op) on contiguous words, then the low and high
        # halves of each block are placed side by side as whole half-block items: every NumPy loop stays long.
        np.bitwise_and(q, _LOW_NIBBLES, out=fr.lo)
        np.right_shift(q, _FOUR, out=fr.hi)
        np.bitwise_and(fr.hi, _LOW_NIBBLES, out=fr.hi)
        np.copyto(fr.lo_dst, fr.lo_src)
        np.copyto(fr.hi_dst, fr.hi_src)
        self._to_float(fr.u, fr.f, zero)

    @staticmethod
    def _to_float(codes: np.ndarray, out: np.ndarray, zero) -> None:
        if zero is None:
            np.copyto(out, codes, casting="unsafe")
        else:
            np.subtract(codes, zero, out=out, dtype=np.float32, casting="unsafe")  # one pass: cast and subtract

    def _blockwise(self, xbt: np.ndarray, yt: np.ndarray, i: int) -> None:
        """yt[rows of chunk i] = sum_b s[n, b] * z[b, n, :] for small S (xbt: [kb, bs, S], yt: [N, S])."""
        c0, c1 = self.bounds[i]
        fr = self._frame(c1 - c0, xbt.shape[2])
        self._codes(i, fr)
        np.matmul(fr.f_t, xbt, out=fr.z)                   # [kb, n, S]
        np.multiply(fr.z, self.s_chunks[i], out=fr.z)
        np.add.reduce(fr.z, axis=0, out=yt[c0:c1])         # [n, S]

    def _dequant_gemm(self, xp: np.ndarray, y: np.ndarray, i: int) -> None:
        """Many activation rows: dequantize row chunk i (scale only; the bias is added after) and GEMM it."""
        c0, c1 = self.bounds[i]
        fr = self._frame(c1 - c0, 1)
        self._codes(i, fr)
        np.multiply(fr.f, self.s_chunks[i].transpose(1, 0, 2), out=fr.f)  # [n, kb, bs] * [n, kb, 1]
        y[:, c0:c1] = xp @ fr.f_rows.T                                     # [S, n]


class FloatMatrix:
    """A float weight [N, K] (a view of the mmapped file, or a resident dequantized copy), its products
    shared among the pool's threads by row chunks."""

    def __init__(self, w: np.ndarray, pool: RowPool):
        self.w = w if w.dtype == np.float32 else w.astype(np.float32)  # float16 files: converted once
        self.shape = tuple(w.shape)
        self.pool = pool
        self.bounds = row_chunks(self.shape[0], self.shape[1], pool.threads)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x [S, K] -> x @ W.T [S, N]."""
        y = np.empty((x.shape[0], self.shape[0]), np.float32)

        def chunk(i: int) -> None:
            c0, c1 = self.bounds[i]
            y[:, c0:c1] = x @ self.w[c0:c1].T

        self.pool.run(chunk, len(self.bounds))
        return y

    def dequantize(self, rows: Rows = slice(None)) -> np.ndarray:
        return np.asarray(self.w[rows], dtype=np.float32)
