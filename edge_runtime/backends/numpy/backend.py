"""NumPy backend for the `edge-llama-v1` contract: the decoder forward pass over a bundle's weights.bin.

It needs nothing but NumPy. Float tensors are read-only views of the memory-mapped weights file; quantized
linears run through kernels.QuantMatrix on the packed codes (never dequantized whole), except those that a
`resident_bytes` budget allows to keep as dequantized float32 copies. The units the manifest lists as fused
(q/k/v, gate/up: manifest `decoder.units`) are multiplied as one matrix.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np

from ...errors import BundleError, ContextOverflowError, EdgeError, UnsupportedModelError
from ...format.config import ModelConfig
from ...format.contracts import DECODER as CONTRACT
from ...format.quant import SUFFIXES, BlockQuant
from ...spec import EMBED, spec_for, supported
from .kernels import FloatMatrix, QuantMatrix, RowPool, set_blas_threads
from .llama import KV_DTYPES, DecoderForward

Matrix = Union[FloatMatrix, QuantMatrix]


def _plain(a: np.ndarray) -> np.ndarray:
    """The same bytes as a base-class ndarray: slicing an np.memmap runs Python code on every access."""
    return a.view(np.ndarray)


def _span(bundle, names: Sequence[str]) -> np.ndarray | None:
    """One view over tensors stored back to back with one dtype and row shape (a fused initializer)."""
    metas = [bundle.tensor_index[n] for n in names]
    for a, b in zip(metas, metas[1:]):
        if (a["offset"] + a["nbytes"] != b["offset"] or a["dtype"] != b["dtype"]
                or list(a["shape"][1:]) != list(b["shape"][1:])):
            return None
    first = bundle.tensor(names[0])  # checks the first part's bounds
    rows = sum(int(m["shape"][0]) for m in metas)
    start, nbytes = int(metas[0]["offset"]), sum(int(m["nbytes"]) for m in metas)
    buf = bundle.weights_mmap()
    if start + nbytes > buf.size:
        raise BundleError(f"bundle {bundle.root}: tensor {names[-1]} lies past the end of weights.bin")
    return _plain(buf[start:start + nbytes].view(first.dtype).reshape((rows,) + first.shape[1:]))


class BundleWeights:
    """The `llama_numpy.Weights` lookup over a bundle: matrices grouped as stored, vectors as views."""

    def __init__(self, bundle, pool: RowPool, resident_bytes: int = 0, float_activations: bool = False):
        self.bundle, self.pool = bundle, pool
        self.cfg: ModelConfig = bundle.config
        self.qmeta = (bundle.manifest.get("quantization") or {}).get("tensors") or {}
        # The graph's MatMulNBits rounds activations to int8 at accuracy_level 4: do the same (same contract),
        # unless asked for the bundle's exact graph (float32 activations).
        self.int8_activations = bundle.accuracy_level == 4 and not float_activations
        self.head_name = spec_for(self.cfg).head
        self.groups: dict[tuple, Matrix] = {}          # names stored together -> one matrix
        self.rows: dict[str, tuple[tuple, int, int]] = {}  # name -> (its group, its rows r0:r1 in the group)
        self.vectors: dict[str, np.ndarray] = {}        # norms and biases, looked up once
        for names in self._matrix_groups():
            self._add_group(names)
        self.resident = self._make_resident(int(resident_bytes))

    def _matrix_groups(self) -> list[tuple]:
        """The manifest's units: a fused one as one group, the others one weight each."""
        units = (self.bundle.manifest.get("decoder") or {}).get("units")
        if units is None:
            raise BundleError(f"bundle {self.bundle.root}: the manifest lists no decoder units")
        names = [n for u in units for n in u["names"]]
        if sorted(names) != sorted(spec_for(self.cfg).in_features()):  # each of the family's matrices, once
            raise BundleError(f"bundle {self.bundle.root}: the manifest's decoder units do not name this model's "
                              "matrices")
        groups = []
        for u in units:
            groups += [tuple(u["names"])] if u.get("fused") else [(n,) for n in u["names"]]
        return groups

    def _add_group(self, names: tuple) -> None:
        fused = self._fused(names) if len(names) > 1 else None
        parts = [(names, fused)] if fused is not None else [((n,), self._load(n)) for n in names]
        for group, matrix in parts:
            self.groups[group] = matrix
            r0 = 0
            for n in group:
                r1 = r0 + self._n_rows(n)
                self.rows[n] = (group, r0, r1)
                r0 = r1

    def _n_rows(self, name: str) -> int:
        key = f"{name}.scales" if name in self.qmeta else name
        return int(self.bundle.tensor_index[key]["shape"][0])

    def _quant(self, name: str, arrays: dict) -> QuantMatrix:
        bits, bs = int(self.qmeta[name]["bits"]), int(self.qmeta[name]["block_size"])
        n, kb = arrays["scales"].shape
        return QuantMatrix(BlockQuant.from_arrays(bits, bs, (n, kb * bs), arrays), self.pool,
                           int8_activations=self.int8_activations)

    def _load(self, name: str) -> Matrix:
        if name not in self.qmeta:
            return FloatMatrix(_plain(self.bundle.tensor(name)), self.pool)
        bq = BlockQuant.from_bundle(self.bundle, name, self.qmeta[name])  # checks arrays against the manifest
        return self._quant(name, {k: _plain(v) for k, v in bq.arrays().items()})

    def _fused(self, names: tuple) -> Matrix | None:
        """One matrix over weights stored back to back (the graph builder's fused q/k/v and gate/up)."""
        quantized = {n in self.qmeta for n in names}
        if quantized == {False}:
            w = _span(self.bundle, names)
            return None if w is None else FloatMatrix(w, self.pool)
        metas = [self.qmeta.get(n) for n in names]
        if quantized != {True} or any(m != metas[0] for m in metas):
            return None
        arrays = {}
        for suffix in SUFFIXES:
            keys = [f"{n}.{suffix}" for n in names]
            present = [self.bundle.has_tensor(k) for k in keys]
            if not any(present):
                continue
            span = _span(self.bundle, keys) if all(present) else None
            if span is None:
                return None
            arrays[suffix] = span
        if any(bool(metas[0].get(s, False)) != (s in arrays) for s in ("zero_points", "offsets")):
            return None  # _load reports the mismatch between manifest and file
        return self._quant(names[0], arrays)

    def _make_resident(self, budget: int) -> list[tuple[tuple, int]]:
        """Swap quantized matrices for float32 copies while the budget lasts: the lm_head first (one big
        matrix read every token), then the others largest first (every byte saves about the same time)."""
        candidates = [g for g, m in self.groups.items() if isinstance(m, QuantMatrix)]
        candidates.sort(key=lambda g: (g != (self.head_name,), -np.prod(self.groups[g].shape)))
        chosen = []
        for g in candidates:
            nbytes = int(np.prod(self.groups[g].shape)) * 4
            if nbytes <= budget:
                self.groups[g] = FloatMatrix(self.groups[g].dequantize(), self.pool)
                budget -= nbytes
                chosen.append((g, nbytes))
        return chosen

    @property
    def resident_nbytes(self) -> int:
        """RAM held besides the mmapped file: float copies and per-block bias tables (not the workspaces)."""
        tables = sum(m.resident_nbytes for m in self.groups.values() if isinstance(m, QuantMatrix))
        return sum(b for _, b in self.resident) + tables

    # -- the Weights protocol -----------------------------------------------------------------------------

    def vector(self, name: str) -> np.ndarray:
        v = self.vectors.get(name)
        if v is None:
            v = self.vectors[name] = _plain(self.bundle.tensor(name))
        return v

    def linears(self, names: Sequence[str], x: np.ndarray) -> list[np.ndarray]:
        group = self.rows[names[0]][0]
        if len(group) == 1 or tuple(names) != group:
            return [self.linear(n, x) for n in names]
        y = self.groups[group].matmul(x)  # [S, sum of N]: one product for the whole group
        return [y[:, self.rows[n][1]:self.rows[n][2]] for n in names]

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        group, r0, r1 = self.rows[name]
        y = self.groups[group].matmul(x)
        return y if len(group) == 1 else y[:, r0:r1]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.groups[self.rows[EMBED][0]].dequantize(ids)  # [S, hidden]

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        return self.linear(self.head_name, x)

    def _label(self, group: tuple) -> str:
        """A short name for the stats line: 'lm_head', 'embed_tokens', 'L3 gate+up'."""
        if group == (self.head_name,):
            return "lm_head"
        parts = group[0].split(".")
        if parts[1] != "layers":
            return parts[1]
        return f"L{parts[2]} " + "+".join(n.split(".")[-2].removesuffix("_proj") for n in group)

    def describe(self) -> str:
        bits = sorted({int(m["bits"]) for m in self.qmeta.values()})
        kind = "/".join(f"int{b}" for b in bits) if bits else "float"
        fused = sum(len(g) > 1 for g in self.groups)
        note = f"{kind} weights ({fused} fused groups)"
        tables = self.resident_nbytes - sum(b for _, b in self.resident)
        if tables:
            note += f", zero-point tables {tables / 2**20:.0f} MB"
        if not self.resident:
            return note + ", none resident"
        names = [self._label(g) for g, _ in self.resident]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"{note}, resident float32: {shown} ({sum(b for _, b in self.resident) / 2**20:.0f} MB)"


class NumpyBackend:
    """The Backend protocol (backends.base.Backend) in pure NumPy; see the module docstring.

    threads: the row chunks of every matrix product are shared by this many threads, each calling NumPy's
    BLAS single-threaded (set process-wide; where that BLAS cannot be reached, set OPENBLAS_NUM_THREADS=1
    before numpy is imported). kv_dtype: None takes the default graph's (bundle.kv_dtypes). resident_bytes:
    budget for dequantized float32 copies of matrices. float_activations: compute what the bundle's exact graph
    does (float32 activations, float32 KV cache) instead of its default graph's int8 activations.
    """

    name = "numpy"

    def __init__(self, bundle, context: int, threads: int | None = None, kv_dtype: str | None = None,
                 resident_bytes: int = 0, float_activations: bool = False):
        if bundle.contract != CONTRACT:
            raise UnsupportedModelError(f"the numpy backend runs {CONTRACT} bundles, not {bundle.contract}")
        cfg = bundle.config
        if not supported(cfg.model_type):
            raise UnsupportedModelError(f"the numpy backend has no decoder spec for {cfg.model_type}")
        # Default: the default graph's KV precision, so both backends run the same contract (a float16 cache
        # also means float16 attention, numpy/llama.py).
        kv_dtype = bundle.run_kv_dtype(kv_dtype, float_activations)
        if kv_dtype not in KV_DTYPES:
            raise EdgeError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        self.context = bundle.check_context(context)
        from ...threads import default_threads

        self.threads = int(threads) if threads else default_threads()
        self.blas_limited = set_blas_threads(1)  # the pool's threads share every product (kernels.py)
        self.kv_dtype = kv_dtype
        self.pool = RowPool(self.threads)
        self.weights = BundleWeights(bundle, self.pool, resident_bytes, float_activations)
        spec = spec_for(cfg)
        windows = tuple(layer.get("window") for layer in (bundle.manifest.get("decoder") or {}).get("layers", ()))
        if windows != spec.windows:
            raise BundleError(f"bundle {bundle.root}: the manifest's layer windows {windows} are not those of a "
                              f"{cfg.model_type} of this config {spec.windows}")
        self.model = DecoderForward(cfg, self.weights, self.context, kv_dtype, spec)
        self.vocab_size = cfg.vocab_size
        self.kv_ring = self.model.cache.ring

    def resume_floor(self, end: int) -> int:
        """The first position a pass may start at, `end` positions written (KVCache.floor)."""
        return self.model.cache.floor(end)

    def forward(self, ids: np.ndarray, past_len: int, logits_index: np.ndarray) -> np.ndarray:
        """Run ids [S] at positions past_len..past_len+S-1 -> logits [len(logits_index), vocab]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)                    # [S]
        logits_index = np.asarray(logits_index, dtype=np.int64).reshape(-1)  # [L]
        s_len, past_len = ids.shape[0], int(past_len)
        if past_len < 0 or s_len == 0:
            raise EdgeError(f"forward needs at least one token at past_len >= 0 (got {s_len} at {past_len})")
        if past_len + s_len > self.context:
            raise ContextOverflowError(f"{past_len + s_len} tokens do not fit the context of {self.context}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise EdgeError(f"token ids must lie in 0..{self.vocab_size - 1}")
        if logits_index.size and (logits_index.min() < -s_len or logits_index.max() >= s_len):
            raise EdgeError(f"logits_index must point into the {s_len} new positions")
        return np.ascontiguousarray(self.model.forward(ids, past_len, logits_index), dtype=np.float32)

    def kv_arrays(self) -> list[np.ndarray]:
        """Views [1, kv_heads, capacity, head_dim] of each layer's keys, then values (the ORT backend's order);
        capacity is the context, or a sliding-window layer's ring (spec.kv_capacity)."""
        c = self.model.cache
        return [a[None] for k, v in zip(c.keys, c.values) for a in (k, v)]

    def kv_held(self, n: int, base: int | None = None) -> tuple[int, list[np.ndarray]]:
        """(0, views of the slots holding positions < n): a ring's slots are a function of the position."""
        if base:
            raise EdgeError("the NumPy backend's caches start at position 0")
        return 0, [a[..., :min(n, a.shape[-2]), :] for a in self.kv_arrays()]

    def kv_nbytes(self) -> int:
        return self.model.cache.nbytes

    def describe(self) -> str:
        blas = "BLAS 1 each" if self.blas_limited else "BLAS threads from the environment"
        acts = "int8 activations (as MatMulNBits), " if self.weights.int8_activations else ""
        return f"{self.threads} threads ({blas}), kv {self.kv_dtype}, {acts}{self.weights.describe()}"

    def close(self) -> None:
        self.pool.close()
