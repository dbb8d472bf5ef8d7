"""ONNX Runtime backend for the `edge-llama-v1` graph contract: KV cache bound once, in place, for the session.

Every past/present pair is one NumPy buffer [1, kv_heads, context, head_dim] bound with IO binding as both the
graph's past input and its present output (GroupQueryAttention writes the new positions in place), so a decode
step allocates and copies nothing but the logits. Decode steps reuse preallocated, pre-bound input arrays
and write the token id, seqlens_k and total_sequence_length into them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import BundleError, ContextOverflowError, UnsupportedModelError
from ...format.bundle import Bundle
from ...format.contracts import DECODER as CONTRACT
from ...format.contracts import WINDOW_INPUTS
from ...memory.pages import RELEASE_STEPS, FilePages, paging_out, reserve
from ...spec import spec_for
from .window import ShiftingWindows

# Each setting's effect on speed and peak RSS: `bench/ort_graph.py sweep BUNDLE` (one process per setting, VmHWM;
# `bench/ort_graph.py run BUNDLE --option NAME=VALUE` for one of them).
DEFAULT_OPTIONS: dict[str, Any] = {
    "graph_optimization_level": "all",
    "enable_cpu_mem_arena": True,      # off: no lower RSS (the weights are prepacked outside the arena)
    # on: each new chunk length (e.g. a slide's re-prefill) plans another pattern and the arena keeps that memory
    # for the rest of the session, past the memory plan; off: no growth, and decode is no slower
    "enable_mem_pattern": False,
    "disable_prepacking": False,       # on: less memory after load, but MatMulNBits runs far slower
    "use_device_allocator_for_initializers": False,  # no effect: prepacked copies replace the mmapped weights
    "use_env_allocators": False,       # no effect with one session per process
    "allow_spinning": True,            # off: faster when the cores are oversubscribed, slower when they are idle
    "parallel_prepack": False,         # on: prepacked on the intra-op threads at once: a little faster load, a
                                       # larger transient while loading
    # off: the graph's per-block offsets reach their Gemm through a Reshape view that ConstantFolding would turn
    # back into a prepacked constant; unpacked, MLAS's M=1 kernel reads them faster (a faster Q4_1 decode) and
    # the session holds no packed copy of them (export/graph/ops.py nbits_linear)
    "constant_folding": False,
}

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}
_CONFIG_ENTRIES = {  # option -> SessionOptions config key (values "0"/"1")
    "disable_prepacking": "session.disable_prepacking",
    "use_device_allocator_for_initializers": "session.use_device_allocator_for_initializers",
    "use_env_allocators": "session.use_env_allocators",
    "allow_spinning": "session.intra_op.allow_spinning",
    "parallel_prepack": "session.prepack.enable_parallel",
}


def make_session_options(threads: int, options: Mapping[str, Any] | None = None):
    """ORT SessionOptions for single-stream decoding: `threads` intra-op, 1 inter-op, sequential."""
    import onnxruntime as ort

    opts = dict(DEFAULT_OPTIONS, **(options or {}))
    unknown = set(opts) - set(DEFAULT_OPTIONS)
    if unknown:
        raise UnsupportedModelError(f"unknown ONNX Runtime session option(s): {', '.join(sorted(unknown))}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[opts["graph_optimization_level"]])
    so.enable_cpu_mem_arena = bool(opts["enable_cpu_mem_arena"])
    so.enable_mem_pattern = bool(opts["enable_mem_pattern"])
    so.log_severity_level = 3
    for key, entry in _CONFIG_ENTRIES.items():
        so.add_session_config_entry(entry, "1" if opts[key] else "0")
    if not opts["constant_folding"]:
        so.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
    return so


def exact_graph_file(bundle: Bundle) -> str:
    """The bundle's float32-activation graph; an error naming the fix when it has none."""
    path = bundle.exact_graph_file()
    if path is None:
        raise UnsupportedModelError(f"bundle {bundle.root} has no float-activation graph (graph.exact_graph): "
                                    "re-export it with this edge-export")
    return path


def inference_session(bundle: Bundle, name: str, options):
    """An ONNX Runtime session on a graph of the bundle, its external data files checked first
    (Bundle.graph_path); a graph ONNX Runtime cannot load is a BundleError."""
    import onnxruntime as ort

    path = bundle.graph_path(name)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception classes (Fail, InvalidGraph, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BundleError(f"bundle {bundle.root}: ONNX Runtime cannot load {name}: {first[:300]}") from None


class OrtBackend:
    name = "ort"
    kv_ring = None  # the whole context, or (graphs with window inputs) a window that shifts: see window.py

    def __init__(self, bundle: Bundle, context: int, threads: int = 2, kv_dtype: str | None = None,
                 session_options: Mapping[str, Any] | None = None, float_activations: bool = False):
        """kv_dtype: None takes the bundle's default graph; else the graph with that KV dtype (graph.kv_graphs).
        float_activations: run the bundle's exact graph instead (Bundle.exact_graph_file: the same weights,
        float32 activations and KV cache), the one the NumPy backend is checked against to float rounding."""
        import onnxruntime as ort

        if bundle.contract != CONTRACT:
            raise UnsupportedModelError(f"OrtBackend runs the {CONTRACT} contract, this bundle is {bundle.contract}")
        kv_dtype = bundle.run_kv_dtype(kv_dtype, float_activations)
        graph_file = exact_graph_file(bundle) if float_activations else None
        if kv_dtype not in bundle.kv_dtypes and graph_file is None:
            raise UnsupportedModelError(f"kv_dtype {kv_dtype} is not available: this bundle has graphs for a "
                                        f"{' or '.join(bundle.kv_dtypes)} KV cache")
        self.context, self.threads, self.kv_dtype = bundle.check_context(context), int(threads), kv_dtype
        self.float_activations = bool(float_activations)
        self.options = dict(DEFAULT_OPTIONS, **(session_options or {}))
        cfg = bundle.config
        self.vocab = cfg.vocab_size
        weights_file = bundle.path(bundle.manifest["weights"]["file"])
        with paging_out(weights_file):  # the file's pages go as the weights are prepacked (memory.pages)
            self.session = inference_session(bundle, graph_file or bundle.graph_file(kv_dtype),
                                             make_session_options(threads, session_options))
        self._ov = ort.OrtValue.ortvalue_from_numpy
        self.binding = self.session.io_binding()
        # What ONNX Runtime reads in place (the embedding table, norms, rotary tables) stays mapped, fully read
        # by prepacking. Its pages go now, after every chunk of several tokens and every RELEASE_STEPS decode
        # steps: resident are then at most the fault-around windows of the rows read since (the memory plan's
        # `mapped`), however many distinct tokens a session sees.
        self.weight_pages = FilePages(weights_file)
        self.weight_pages.release()
        self._steps = 0
        self.windows = self._shifting_windows(bundle)
        if self.windows is not None and self.windows.capacity < self.context:
            self.kv_ring = self.windows.window
        # [1, kv_heads, context (or the window's capacity), head_dim] per layer and per K/V, reserved once (the
        # memory plan counts all of it, so RSS never grows past the plan) and resident as positions are written.
        self.kv = []
        for ly in spec_for(cfg).layers:
            shifts = self.windows is not None and ly.window is not None
            kv_shape = (1, cfg.num_key_value_heads, self.windows.capacity if shifts else self.context, cfg.head_dim)
            for kv in ("key", "value"):
                buf = reserve(kv_shape, kv_dtype)
                value = self._ov(buf)
                self.binding.bind_ortvalue_input(f"past_key_values.{ly.index}.{kv}", value)
                self.binding.bind_ortvalue_output(f"present.{ly.index}.{kv}", value)
                self.kv.append((buf, value, shifts))
                if shifts:
                    self.windows.buffers.append(buf)
        self._seqlens = np.zeros(1, np.int32)     # [1]  past_len + S - 1
        self._total = np.zeros((), np.int32)      # []   past_len + S
        self.binding.bind_ortvalue_input("seqlens_k", self._ov(self._seqlens))
        self.binding.bind_ortvalue_input("total_sequence_length", self._ov(self._total))
        for name, array in (self.windows.inputs().items() if self.windows else ()):
            self.binding.bind_ortvalue_input(name, self._ov(array))
        # The decode step's own arrays: one token in, logits of that token out.
        self._step_ids = np.zeros((1, 1), np.int64)
        self._step_index = np.zeros(1, np.int64)
        self._step_logits = np.empty((1, 1, self.vocab), np.float32)
        self._step_values = tuple(self._ov(a) for a in (self._step_ids, self._step_index, self._step_logits))
        self._bound_step = False

    def _shifting_windows(self, bundle: Bundle) -> ShiftingWindows | None:
        """The window layers' shifting buffers when the graph takes their inputs (export.graph.decoder)."""
        names = {i.name for i in self.session.get_inputs()}
        if not names & set(WINDOW_INPUTS):
            return None
        shared = spec_for(bundle.config).shared_window()
        if shared is None or not names >= set(WINDOW_INPUTS):
            raise BundleError(f"bundle {bundle.root}: the graph's sliding-window inputs do not match its config")
        return ShiftingWindows(shared[0], shared[1], self.context, bundle.config.head_dim, self.kv_dtype)

    def _bind(self, ids, index, logits) -> None:
        self.binding.bind_ortvalue_input("input_ids", ids)
        self.binding.bind_ortvalue_input("logits_index", index)
        self.binding.bind_ortvalue_output("logits", logits)

    def forward(self, ids: np.ndarray, past_len: int, logits_index: np.ndarray) -> np.ndarray:
        """Run ids [S] at positions past_len.. and return float32 logits [len(logits_index), vocab]."""
        s = len(ids)
        if s == 0 or past_len < 0 or past_len + s > self.context:
            raise ContextOverflowError(f"{past_len} cached + {s} new tokens do not fit the context of {self.context}")
        if self.windows is None or s <= self.windows.stride:
            return self._pass(ids, past_len, logits_index)
        # Shifting window buffers take at most `stride` new positions a pass.
        index = np.asarray(logits_index, dtype=np.int64) % s                       # [L]
        out = np.empty((len(index), self.vocab), np.float32)                       # [L, V]
        for a in range(0, s, self.windows.stride):
            part = ids[a:a + self.windows.stride]
            picked = np.flatnonzero((index >= a) & (index < a + len(part)))
            rows = index[picked] - a if len(picked) else np.array([len(part) - 1])
            logits = self._pass(part, past_len + a, rows)
            out[picked] = logits[:len(picked)]
        return out

    def _pass(self, ids: np.ndarray, past_len: int, logits_index: np.ndarray) -> np.ndarray:
        s = len(ids)
        if self.windows is not None:
            self.windows.prepare(past_len, s)
        self._seqlens[0] = past_len + s - 1
        self._total[()] = past_len + s
        if s == 1 and len(logits_index) == 1:
            return self._decode_step(int(ids[0]), int(logits_index[0]))
        index = np.ascontiguousarray(logits_index, dtype=np.int64)
        logits = np.empty((1, len(index), self.vocab), np.float32)
        self._bind(self._ov(np.ascontiguousarray(ids, dtype=np.int64).reshape(1, s)), self._ov(index),
                   self._ov(logits))
        self._bound_step = False
        self.session.run_with_iobinding(self.binding)
        self.weight_pages.release()
        self._steps = 0
        return logits[0]

    def _decode_step(self, token: int, index: int) -> np.ndarray:
        self._step_ids[0, 0] = token
        self._step_index[0] = index
        if not self._bound_step:
            self._bind(*self._step_values)
            self._bound_step = True
        self.session.run_with_iobinding(self.binding)
        self._steps += 1
        if self._steps >= RELEASE_STEPS:
            self.weight_pages.release()
            self._steps = 0
        return self._step_logits[0].copy()  # the buffer is rewritten by the next step

    def resume_floor(self, end: int) -> int:
        """The first position a pass may start at, `end` positions written: a shifting window buffer may have
        dropped earlier keys (window.py); the other buffers hold the whole context."""
        return 0 if self.windows is None else self.windows.floor()

    def kv_arrays(self) -> list[np.ndarray]:
        """The bound buffers [1, kv_heads, context or window capacity, head_dim], per layer key then value."""
        return [buf for buf, _, _ in self.kv]

    def kv_held(self, n: int, base: int | None = None) -> tuple[int, list[np.ndarray]]:
        """(position in the first slot of the window buffers, views of the slots holding positions < n);
        `base` (from a session file) first sets where the window buffers start."""
        if base is not None and self.windows is not None:
            self.windows.set_base(base)
        first = self.windows.base if self.windows is not None else 0
        return first, [buf[..., :max(0, n - first) if shifts else n, :] for buf, _, shifts in self.kv]

    def kv_nbytes(self) -> int:
        return sum(buf.nbytes for buf, _, _ in self.kv)

    def describe(self) -> str:
        exact = " activations=float32 (exact graph)" if self.float_activations else ""
        return f"ort threads={self.threads} kv={self.kv_dtype}{exact}"
