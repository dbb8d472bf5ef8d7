"""ONNX Runtime backend for the `optimum-kv-v1` contract: past KV held as NumPy arrays, presents fed back.

Used for architectures exported through optimum (export/optimum/fallback.py). Each step's `present.*` outputs
([1, kv_heads, past_len + S, head_dim]) become the next step's `past_key_values.*` inputs, so the cache grows by
concatenation inside the graph; rewinding slices it.
"""
from __future__ import annotations

import numpy as np

from ...errors import BundleError, ContextOverflowError, UnsupportedModelError
from ...format.contracts import OPTIMUM_KV as CONTRACT
from .llama import inference_session


class OptimumOrtBackend:
    name = "ort-optimum"
    kv_ring = None  # the past grows with the sequence: every position is kept

    def __init__(self, bundle, context: int, threads: int = 2):
        import onnxruntime as ort

        if bundle.contract != CONTRACT:
            raise UnsupportedModelError(f"OptimumOrtBackend runs {CONTRACT} graphs, bundle has {bundle.contract}")
        self.context = bundle.check_context(context)
        graph = bundle.manifest["graph"]
        self.threads = threads
        self.session = inference_session(bundle, graph["file"], session_options(ort, threads))
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.num_layers, self.kv_heads, self.head_dim = graph["num_layers"], graph["kv_heads"], graph["head_dim"]
        self.kv_dtype = np.dtype(graph.get("kv_dtype", "float32"))
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        missing = [n for n in self.past_names + ["input_ids", "attention_mask"] if n not in self.input_names]
        if missing:
            raise BundleError(f"bundle {bundle.root}: model.onnx lacks inputs {missing[:3]} of {CONTRACT}")
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype)  # [1, kv_heads, 0, head_dim]
        self.pasts = [empty] * len(self.past_names)

    @property
    def cached_len(self) -> int:
        return self.pasts[0].shape[2]

    def forward(self, ids: np.ndarray, past_len: int, logits_index: np.ndarray) -> np.ndarray:
        """Run ids [S] at positions past_len..past_len+S-1; logits [len(logits_index), vocab] (see Backend)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)  # [1, S]
        logits_index = np.asarray(logits_index, dtype=np.int64).reshape(-1)  # [L]
        total = past_len + ids.shape[1]
        if total > self.context:
            raise ContextOverflowError(f"{total} tokens do not fit the context of {self.context}")
        if past_len > self.cached_len:
            raise ValueError(f"past_len {past_len} is beyond the {self.cached_len} cached positions")
        if past_len < self.cached_len:
            # Rewind: drop cached positions >= past_len (a view, copied by the graph's Concat).
            self.pasts = [p[:, :, :past_len] for p in self.pasts]
        outputs = dict(zip(self.output_names, self.session.run(None, self.feed(ids, past_len, logits_index))))
        self.pasts = [outputs[n.replace("past_key_values", "present")] for n in self.past_names]
        logits = outputs["logits"][0]  # [L or S, vocab]
        if "logits_index" not in self.input_names:
            logits = logits[logits_index]
        return np.ascontiguousarray(logits, dtype=np.float32)

    def feed(self, ids: np.ndarray, past_len: int, logits_index: np.ndarray) -> dict:
        total = past_len + ids.shape[1]
        feed = dict(zip(self.past_names, self.pasts))
        feed["input_ids"] = ids
        feed["attention_mask"] = np.ones((1, total), np.int64)  # [1, past_len + S]: batch 1, no padding
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.arange(past_len, total, dtype=np.int64)[None]  # [1, S]
        if "logits_index" in self.input_names:
            feed["logits_index"] = logits_index
        return feed

    def kv_nbytes(self) -> int:
        """Bytes of the KV cache at full context (it grows by concatenation up to that)."""
        per_token = 2 * self.num_layers * self.kv_heads * self.head_dim * self.kv_dtype.itemsize
        return per_token * self.context

    def describe(self) -> str:
        return f"{CONTRACT}, {self.threads} threads, kv {self.kv_dtype.name} grown by concat"


def session_options(ort, threads: int):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts
