"""The Llama-family decoder (Llama, Mistral, Qwen2) as an `edge-llama-v1` ONNX graph (docs/bundle-format.md).

One method per block; an architecture differs from Llama by overriding a hook (Qwen2: q/k/v bias).
Weights arrive by Hugging Face name, each a float32 array or an `edge_runtime.quant.BlockQuant`.

    input_ids [1,S] -> embedding -> [S,H] = h
      layer i:  x = norm(h) ; h += o_proj(GQA(qkv_proj(x)))        (residual adds fused into the next norm)
                x = norm(h) ; h += down_proj(silu(gate(x)) * up(x))
    h[logits_index] -> final norm -> lm_head -> logits [1,L,V]
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import onnx

from edge_runtime.config import ModelConfig
from edge_runtime.errors import UnsupportedModelError
from edge_runtime.quant import BlockQuant

from . import ops
from .builder import MS_DOMAIN, GraphBuilder

Weight = Union[np.ndarray, BlockQuant]
CONTRACT = "edge-llama-v1"
KV_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class GraphOptions:
    accuracy_level: int = 4          # MatMulNBits: 4 = int8 activations (VNNI), 0 = fp32 activations
    max_context: int | None = None  # rotary table length; default config.max_position_embeddings
    fuse_qkv: bool = True            # one matmul for q/k/v, packed into GroupQueryAttention
    fuse_gate_up: bool = True        # one matmul for gate/up
    kv_dtype: str = "float32"        # KV cache (and attention) precision: "float32" or "float16" (half the memory)

    def context(self, cfg: ModelConfig) -> int:
        return int(self.max_context or cfg.max_position_embeddings)


def _quant_signature(w: Weight):
    if isinstance(w, BlockQuant):
        return ("nbits", w.bits, w.block_size, w.zero_points is not None, w.offsets is not None)
    return ("float",)


class LlamaGraph:
    """Builds the decoder graph for one config and one set of weights."""

    def __init__(self, config: ModelConfig, weights: Mapping[str, Weight], options: GraphOptions = GraphOptions()):
        self.cfg = config
        self.weights = weights
        self.opt = options
        self.g = GraphBuilder(f"{config.model_type}-decoder")

    # -- hooks ------------------------------------------------------------------------------------------------

    def qkv_bias_names(self, i: int) -> list[str] | None:
        """HF names of the q/k/v biases of layer i, or None (Llama has none unless config.attention_bias)."""
        if not self.cfg.attention_bias:
            return None
        return [f"model.layers.{i}.self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]

    # -- whole graph ------------------------------------------------------------------------------------------

    def build(self) -> onnx.ModelProto:
        cfg, g = self.cfg, self.g
        ids = g.input("input_ids", np.int64, [1, "sequence"])
        logits_index = g.input("logits_index", np.int64, ["logits_count"])
        self.seqlens_k = g.input("seqlens_k", np.int32, [1])
        self.total_len = g.input("total_sequence_length", np.int32, [])
        if self.opt.kv_dtype not in KV_DTYPES:
            raise UnsupportedModelError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, not {self.opt.kv_dtype!r}")
        self.kv_dtype = np.dtype(self.opt.kv_dtype)
        cos, sin = (t.astype(self.kv_dtype) for t in ops.rotary_tables(self.opt.context(cfg), cfg.head_dim,
                                                                          cfg.rope_theta))
        # Named per dtype: a bundle's float32- and float16-KV graphs share one weights.bin (export.bundle_writer)
        suffix = "" if self.kv_dtype == np.float32 else f".{self.kv_dtype.name}"
        self.cos_cache = g.weight(f"rotary.cos_cache{suffix}", cos)
        self.sin_cache = g.weight(f"rotary.sin_cache{suffix}", sin)

        h = self.embedding(ids)                                                       # [S, H]
        x = ops.rms_norm(g, h, self._w("model.layers.0.input_layernorm.weight"), cfg.rms_norm_eps,
                         "/model/layers.0/input_layernorm")
        for i in range(cfg.num_hidden_layers):
            p = f"/model/layers.{i}"
            attn = self.attention(i, x)
            x, h = ops.skip_rms_norm(g, attn, h, self._w(f"model.layers.{i}.post_attention_layernorm.weight"),
                                     cfg.rms_norm_eps, f"{p}/post_attention_layernorm")
            mlp = self.mlp(i, x)
            if i + 1 < cfg.num_hidden_layers:
                x, h = ops.skip_rms_norm(g, mlp, h, self._w(f"model.layers.{i + 1}.input_layernorm.weight"),
                                         cfg.rms_norm_eps, f"/model/layers.{i + 1}/input_layernorm")
            else:
                h = ops.add(g, mlp, h, f"{p}/residual")
        # Only the requested positions reach the final norm and the vocab-sized lm_head.
        h = ops.gather_rows(g, h, logits_index, "/model/logits_index")                # [L, H]
        x = ops.rms_norm(g, h, self._w("model.norm.weight"), cfg.rms_norm_eps, "/model/norm")
        self.lm_head(x, "logits")                                                     # [1, L, V]
        g.output("logits", np.float32, [1, "logits_count", cfg.vocab_size])
        return g.to_model()

    # -- blocks -----------------------------------------------------------------------------------------------

    def embedding(self, ids: str) -> str:
        """input_ids [1, S] -> hidden [S, H]; a quantized table is gathered and dequantized row by row."""
        g, name = self.g, "model.embed_tokens.weight"
        flat = ops.reshape(g, ids, [-1], "/model/embed_tokens/ids")                    # [S]
        w = self.weights[name]
        if not isinstance(w, BlockQuant):
            return ops.gather_rows(g, self._w(name), flat, "/model/embed_tokens")
        inits = self._quant_inits(name, [name])
        v, k = w.shape
        # GatherBlockQuantized wants the codes as [V, K*bits/8]: the very bytes of MatMulNBits' B, re-shaped.
        data = g.alias(inits["qweight"], [v, k * w.bits // 8])
        h = g.op("GatherBlockQuantized", [data, flat, inits["scales"], inits.get("zero_points")],
                 "/model/embed_tokens/GatherBlockQuantized", domain=MS_DOMAIN, bits=w.bits,
                 block_size=w.block_size, gather_axis=0, quantize_axis=1)              # [S, H]
        if "offsets" in inits:
            offs = ops.gather_rows(g, inits["offsets"], flat, "/model/embed_tokens/offsets")   # [S, kb]
            offs = ops.reshape(g, offs, [-1, w.n_blocks, 1], "/model/embed_tokens/offsets")  # [S, kb, 1]
            h = ops.reshape(g, h, [-1, w.n_blocks, w.block_size], "/model/embed_tokens/blocks")
            h = ops.add(g, h, offs, "/model/embed_tokens/offsets")
            h = ops.reshape(g, h, [-1, k], "/model/embed_tokens/hidden")
        return h

    def attention(self, i: int, x: str) -> str:
        """x [S, H] -> o_proj(GQA(rotary(q), rotary(k), v)) [S, H]; writes this chunk into layer i's KV cache."""
        cfg, g = self.cfg, self.g
        p, path = f"model.layers.{i}.self_attn", f"/model/layers.{i}/attn"
        names = [f"{p}.{m}.weight" for m in ("q_proj", "k_proj", "v_proj")]
        sizes = [cfg.q_dim, cfg.kv_dim, cfg.kv_dim]
        qkv = self.linear(x, names, f"{p}.qkv_proj.weight", f"{path}/qkv_proj", self.qkv_bias_names(i),
                          fuse=self.opt.fuse_qkv)                                      # [S, Dq + 2 Dkv]
        qkv = ops.reshape(g, qkv, [1, -1, sum(sizes)], f"{path}/qkv")                  # [1, S, Dq + 2 Dkv]
        if self.kv_dtype != np.float32:  # attention runs in the cache's precision
            qkv = ops.cast(g, qkv, self.kv_dtype, f"{path}/qkv")
        past = self._kv_input(i)
        attn = ops.group_query_attention(
            g, qkv, past[0], past[1], self.seqlens_k, self.total_len, self.cos_cache, self.sin_cache,
            cfg.num_attention_heads, cfg.num_key_value_heads, (f"present.{i}.key", f"present.{i}.value"), path)
        if self.kv_dtype != np.float32:
            attn = ops.cast(g, attn, np.float32, f"{path}/output")
        attn = ops.reshape(g, attn, [-1, cfg.q_dim], f"{path}/output")                # [S, Dq]
        return self.linear(attn, [f"{p}.o_proj.weight"], None, f"{path}/o_proj")

    def mlp(self, i: int, x: str) -> str:
        """x [S, H] -> down(silu(gate(x)) * up(x)) [S, H]."""
        p, path = f"model.layers.{i}.mlp", f"/model/layers.{i}/mlp"
        gate_up = self.linear(x, [f"{p}.gate_proj.weight", f"{p}.up_proj.weight"], f"{p}.gate_up_proj.weight",
                              f"{path}/gate_up_proj", fuse=self.opt.fuse_gate_up)    # [S, 2 I]
        gate, up = ops.split_last(self.g, gate_up, [self.cfg.intermediate_size] * 2, f"{path}/gate_up")
        return self.linear(ops.silu_mul(self.g, gate, up, path), [f"{p}.down_proj.weight"], None,
                           f"{path}/down_proj")

    def lm_head(self, x: str, output: str) -> str:
        """x [L, H] -> `output` [1, L, V]; with tied embeddings it reads the embedding's own initializers."""
        g, name = self.g, "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
        w = self.weights[name]
        if isinstance(w, BlockQuant) and w.offsets is None:
            # MatMulNBits reads [1, L, H] and writes the bound logits buffer itself; a Reshape after it would
            # copy the [L, V] logits into that buffer (196 KB per decode token for a 49k vocabulary).
            x = ops.reshape(g, x, [1, -1, self.cfg.hidden_size], "/lm_head/input")    # [1, L, H]
            return self.linear(x, [name], None, "/lm_head", output=output)
        logits = self.linear(x, [name], None, "/lm_head")                             # [L, V]
        return g.op("Reshape", [logits, g.constant([1, -1, self.cfg.vocab_size])], "/lm_head/Reshape",
                    outputs=[output])

    # -- weights ----------------------------------------------------------------------------------------------

    def linear(self, x: str, names: Sequence[str], fused_name: str | None, path: str,
               bias_names: Sequence[str] | None = None, fuse: bool = True, output: str | None = None) -> str:
        """x [S, K] times the row-concatenation of the named [N_j, K] weights -> [S, sum N_j].

        Weights of one kind (float, or quantized alike) become one fused initializer and one matmul; mixed
        kinds fall back to one matmul per weight and a Concat. `output` names the result of a quantized matmul
        without offsets (which also takes x [..., K]).
        """
        ws = [self.weights[n] for n in names]
        if len(names) > 1 and (not fuse or len({_quant_signature(w) for w in ws}) > 1):
            biases = bias_names or [None] * len(names)
            outs = [self.linear(x, [n], None, f"{path}/{n.split('.')[-2]}", [b] if b else None)
                    for n, b in zip(names, biases)]
            return self.g.op("Concat", outs, f"{path}/Concat", axis=-1)
        bias = None
        if bias_names is not None:
            fused_bias = fused_name.removesuffix(".weight") + ".bias" if fused_name else bias_names[0]
            bias = self.g.fused_weight(fused_bias, [(b, self.weights[b]) for b in bias_names])
        if isinstance(ws[0], BlockQuant):
            inits = self._quant_inits(fused_name or names[0], names)
            n, k = sum(w.shape[0] for w in ws), ws[0].shape[1]
            return ops.nbits_linear(self.g, x, inits, bias, n=n, k=k, bits=ws[0].bits, block_size=ws[0].block_size,
                                    accuracy_level=self.opt.accuracy_level, name=path, output=output)
        weight = self.g.fused_weight(fused_name or names[0], [(n, self.weights[n]) for n in names])
        return ops.float_linear(self.g, x, weight, bias, path)

    def _quant_inits(self, base: str, names: Sequence[str]) -> dict[str, str]:
        """Initializer names of the quantized arrays of `names` (row-fused under `base`), keyed by suffix."""
        ws = [self.weights[n] for n in names]
        out = {}
        for suffix in ws[0].arrays():
            parts = [(f"{n}.{suffix}", w.arrays()[suffix]) for n, w in zip(names, ws)]
            out[suffix] = self.g.fused_weight(f"{base}.{suffix}", parts)
        return out

    def _w(self, name: str) -> str:
        return self.g.weight(name, np.asarray(self.weights[name], dtype=np.float32))

    def _kv_input(self, i: int) -> tuple[str, str]:
        shape = [1, self.cfg.num_key_value_heads, "context", self.cfg.head_dim]
        out = tuple(self.g.input(f"past_key_values.{i}.{kv}", self.kv_dtype, shape) for kv in ("key", "value"))
        for kv in ("key", "value"):
            self.g.output(f"present.{i}.{kv}", self.kv_dtype, shape)
        return out


class Qwen2Graph(LlamaGraph):
    """Qwen2: Llama with biases on q/k/v (whatever config.attention_bias says)."""

    def qkv_bias_names(self, i: int) -> list[str] | None:
        return [f"model.layers.{i}.self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]


ARCHITECTURES = {"llama": LlamaGraph, "mistral": LlamaGraph, "qwen2": Qwen2Graph}


def build_llama_graph(config: ModelConfig, weights: Mapping[str, Weight],
                      options: GraphOptions = GraphOptions()) -> onnx.ModelProto:
    """The `edge-llama-v1` decoder graph for `config`, initializers inline (see export.bundle_writer)."""
    try:
        cls = ARCHITECTURES[config.model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"the graph builder has no decoder for model_type {config.model_type!r} "
            f"(known: {', '.join(sorted(ARCHITECTURES))})") from None
    return cls(config, weights, options).build()
