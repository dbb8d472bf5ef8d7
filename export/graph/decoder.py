"""The decoder of every edge_runtime.spec family as an `edge-llama-v1` ONNX graph (docs/bundle-format.md).

One method per block; what differs between families (norms around attention and MLP, q/k norms, activation,
embedding scale, attention scale/window/softcap, rope per layer) is read from the DecoderSpec.
Weights arrive by Hugging Face name, each a float32 array or an `edge_runtime.format.quant.BlockQuant`.

    input_ids [1,S] -> embedding (* embed_scale) -> [S,H] = h
      layer i:  x = norm(h) ; a = o_proj(GQA(qkv_proj(x))) ; h += attn_out_norm(a)   (residual adds fused
                x = norm(h) ; m = down(act(gate(x)) * up(x)) ; h += mlp_out_norm(m)     into the next norm)
    h[logits_index] -> final norm -> lm_head (-> softcap) -> logits [1,L,V]
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import onnx

from edge_runtime.errors import UnsupportedModelError
from edge_runtime.format.config import ModelConfig
from edge_runtime.format.contracts import WINDOW_INPUTS
from edge_runtime.format.quant import BlockQuant
from edge_runtime.spec import EMBED, FINAL_NORM, Layer, spec_for
from edge_runtime.spec.rope import half_tables

from . import ops
from .builder import MS_DOMAIN, GraphBuilder

Weight = Union[np.ndarray, BlockQuant]
KV_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class GraphOptions:
    accuracy_level: int = 4          # MatMulNBits: 4 = int8 activations (VNNI), 0 = fp32 activations
    max_context: int | None = None  # rotary table length; default config.max_position_embeddings
    fuse_qkv: bool = True            # one matmul for q/k/v, packed into GroupQueryAttention
    fuse_gate_up: bool = True        # one matmul for gate/up
    kv_dtype: str = "float32"        # KV cache (and attention) precision: "float32" or "float16" (half the memory)
    # sliding-window layers get KV buffers of spec.kv_capacity positions, with their own seqlens and rotary
    # rows as inputs (the runtime shifts them: docs/bundle-format.md); off: every layer's buffer is the context
    shift_windows: bool = True

    def context(self, cfg: ModelConfig) -> int:
        return int(self.max_context or cfg.max_position_embeddings)


def _quant_signature(w: Weight):
    if isinstance(w, BlockQuant):
        return ("nbits", w.bits, w.block_size, w.zero_points is not None, w.offsets is not None)
    return ("float",)


class DecoderGraph:
    """Builds the decoder graph for one config and one set of weights."""

    def __init__(self, config: ModelConfig, weights: Mapping[str, Weight], options: GraphOptions = GraphOptions()):
        self.cfg = config
        self.spec = spec_for(config)
        self.weights = weights
        self.opt = options
        self.g = GraphBuilder(f"{config.model_type}-decoder")
        self.norm_names = set(self.spec.norm_names())

    # -- whole graph ------------------------------------------------------------------------------------------

    def build(self) -> onnx.ModelProto:
        cfg, g, layers = self.cfg, self.g, self.spec.layers
        ids = g.input("input_ids", np.int64, [1, "sequence"])
        logits_index = g.input("logits_index", np.int64, ["logits_count"])
        self.seqlens_k = g.input("seqlens_k", np.int32, [1])
        self.total_len = g.input("total_sequence_length", np.int32, [])
        if self.opt.kv_dtype not in KV_DTYPES:
            raise UnsupportedModelError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, not {self.opt.kv_dtype!r}")
        self.kv_dtype = np.dtype(self.opt.kv_dtype)
        self.shared = self.spec.shared_window() if self.opt.shift_windows else None
        if self.shared:
            self.window_inputs = self.shifted_window_inputs()
        self.rotary = self.rotary_caches()

        h = self.embedding(ids)                                                       # [S, H]
        x = self.norm(h, layers[0].attn_norm)
        for ly in layers:
            a = self.out_norm(self.attention(ly, x), ly.attn_out_norm)
            x, h = ops.skip_rms_norm(g, a, h, self._w(ly.mlp_norm), cfg.rms_norm_eps, self._path(ly.mlp_norm))
            m = self.out_norm(self.mlp(ly, x), ly.mlp_out_norm)
            if ly.index + 1 < len(layers):
                nxt = layers[ly.index + 1].attn_norm
                x, h = ops.skip_rms_norm(g, m, h, self._w(nxt), cfg.rms_norm_eps, self._path(nxt))
            else:
                h = ops.add(g, m, h, f"/model/layers.{ly.index}/residual")
        # Only the requested positions reach the final norm and the vocab-sized lm_head.
        h = ops.gather_rows(g, h, logits_index, "/model/logits_index")                # [L, H]
        x = self.norm(h, FINAL_NORM, "/model/norm")
        self.logits(x, "logits")                                                      # [1, L, V]
        g.output("logits", np.float32, [1, "logits_count", cfg.vocab_size])
        return g.to_model()

    def rotary_caches(self) -> dict:
        """Rope -> (cos, sin) initializers [max_context, D/2]: one pair per distinct rope of the spec, in the
        KV dtype. Named per dtype: a bundle's float32- and float16-KV graphs share one weights.bin."""
        suffix = "" if self.kv_dtype == np.float32 else f".{self.kv_dtype.name}"
        used = {ly.rope for ly in self.spec.layers if not self.shifted(ly)}
        out = {}
        for k, rope in enumerate(self.spec.ropes):
            if rope not in used:
                continue
            prefix = "rotary." if k == 0 else f"rotary.{k}."
            cos, sin = (t.astype(self.kv_dtype) for t in half_tables(self.opt.context(self.cfg), self.cfg.head_dim,
                                                                       rope))
            out[rope] = (self.g.weight(f"{prefix}cos_cache{suffix}", cos), self.g.weight(f"{prefix}sin_cache{suffix}",
                                                                                          sin))
        return out

    def shifted_window_inputs(self) -> tuple[str, str, str, str]:
        """(seqlens_k, total_sequence_length, cos, sin) of the sliding-window layers' shifting buffers: counted
        from the buffer's first slot, and the rotary rows of the positions from that slot on [rows, D/2]."""
        g, half = self.g, self.cfg.head_dim // 2
        seqlens, total, cos, sin = WINDOW_INPUTS
        return (g.input(seqlens, np.int32, [1]), g.input(total, np.int32, []),
                g.input(cos, self.kv_dtype, ["window_rows", half]), g.input(sin, self.kv_dtype, ["window_rows", half]))

    def shifted(self, ly: Layer) -> bool:
        return bool(self.shared) and ly.window is not None

    # -- blocks -----------------------------------------------------------------------------------------------

    def norm(self, x: str, name: str, path: str | None = None) -> str:
        return ops.rms_norm(self.g, x, self._w(name), self.cfg.rms_norm_eps, path or self._path(name))

    def out_norm(self, x: str, name: str | None) -> str:
        """A block output's own norm before the residual add (Gemma), or x itself."""
        return self.norm(x, name) if name else x

    def embedding(self, ids: str) -> str:
        """input_ids [1, S] -> hidden [S, H], times the family's embedding scale."""
        h = self.lookup(ids)                                                          # [S, H]
        scale = self.spec.embed_scale()
        if scale is None:
            return h
        # HF multiplies by the scale rounded to the table's dtype (float32)
        return self.g.op("Mul", [h, self.g.constant(np.float32(scale), np.float32)], "/model/embed_tokens/scale/Mul")

    def lookup(self, ids: str) -> str:
        """input_ids [1, S] -> the embedding table's rows [S, H]; a quantized table is dequantized row by row."""
        g, name = self.g, EMBED
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

    def attention(self, ly: Layer, x: str) -> str:
        """x [S, H] -> o_proj(GQA(rotary(q), rotary(k), v)) [S, H]; writes this chunk into the layer's KV cache.

            x -> qkv_proj -> [S, Dq + 2 Dkv] -(q/k norms: split, per-head RMSNorm)-> GQA -> o_proj
        """
        cfg, g, i = self.cfg, self.g, ly.index
        p, path = f"model.layers.{i}.self_attn", f"/model/layers.{i}/attn"
        sizes = [cfg.q_dim, cfg.kv_dim, cfg.kv_dim]
        qkv = self.linear(x, [ly.q, ly.k, ly.v], f"{p}.qkv_proj.weight", f"{path}/qkv_proj", ly.qkv_bias,
                          fuse=self.opt.fuse_qkv)                                      # [S, Dq + 2 Dkv]
        if ly.q_norm:
            q, k, v = ops.split_last(g, qkv, sizes, f"{path}/qkv")
            q = self.head_norm(q, ly.q_norm, cfg.q_dim, f"{path}/q_norm")             # [S, Dq]
            k = self.head_norm(k, ly.k_norm, cfg.kv_dim, f"{path}/k_norm")            # [S, Dkv]
            qkv = g.op("Concat", [q, k, v], f"{path}/qkv/Concat", axis=-1)
        qkv = ops.reshape(g, qkv, [1, -1, sum(sizes)], f"{path}/qkv")                  # [1, S, Dq + 2 Dkv]
        if self.kv_dtype != np.float32:  # attention runs in the cache's precision
            qkv = ops.cast(g, qkv, self.kv_dtype, f"{path}/qkv")
        past = self._kv_input(ly)
        if self.shifted(ly):
            seqlens, total, cos, sin = self.window_inputs
        else:
            (cos, sin), seqlens, total = self.rotary[ly.rope], self.seqlens_k, self.total_len
        scale = self.spec.attn_scale()
        attn = ops.group_query_attention(
            g, qkv, past[0], past[1], seqlens, total, cos, sin,
            cfg.num_attention_heads, cfg.num_key_value_heads, (f"present.{i}.key", f"present.{i}.value"), path,
            scale=None if math.isclose(scale, cfg.head_dim ** -0.5, rel_tol=1e-12) else scale,
            window=ly.window, softcap=self.spec.attn_softcap())
        if self.kv_dtype != np.float32:
            attn = ops.cast(g, attn, np.float32, f"{path}/output")
        attn = ops.reshape(g, attn, [-1, cfg.q_dim], f"{path}/output")                # [S, Dq]
        return self.linear(attn, [ly.o], None, f"{path}/o_proj")

    def head_norm(self, x: str, name: str, width: int, path: str) -> str:
        """x [S, heads*D] -> RMSNorm over each head's D values -> [S, heads*D]."""
        d = self.cfg.head_dim
        y = ops.reshape(self.g, x, [-1, d], f"{path}/heads")                          # [S*heads, D]
        y = ops.rms_norm(self.g, y, self._w(name), self.cfg.rms_norm_eps, path)
        return ops.reshape(self.g, y, [-1, width], f"{path}/rows")                    # [S, heads*D]

    def mlp(self, ly: Layer, x: str) -> str:
        """x [S, H] -> down(act(gate(x)) * up(x)) [S, H]."""
        i = ly.index
        p, path = f"model.layers.{i}.mlp", f"/model/layers.{i}/mlp"
        gate_up = self.linear(x, [ly.gate, ly.up], f"{p}.gate_up_proj.weight", f"{path}/gate_up_proj",
                              fuse=self.opt.fuse_gate_up)                             # [S, 2 I]
        gate, up = ops.split_last(self.g, gate_up, [self.cfg.intermediate_size] * 2, f"{path}/gate_up")
        act = ops.ACTIVATION_MUL[self.spec.activation]
        return self.linear(act(self.g, gate, up, path), [ly.down], None, f"{path}/down_proj")

    def logits(self, x: str, output: str) -> str:
        """x [L, H] -> `output` [1, L, V]: the lm_head, then the final softcap when the config sets one."""
        cap = self.cfg.final_logit_softcapping
        if not cap:
            return self.lm_head(x, output)
        g = self.g
        y = self.lm_head(x, "/lm_head/logits")                                        # [1, L, V]
        y = g.op("Div", [y, g.constant(np.float32(cap), np.float32)], "/lm_head/softcap/Div")
        y = g.op("Tanh", [y], "/lm_head/softcap/Tanh")
        return g.op("Mul", [y, g.constant(np.float32(cap), np.float32)], "/lm_head/softcap/Mul", outputs=[output])

    def lm_head(self, x: str, output: str) -> str:
        """x [L, H] -> `output` [1, L, V]; with tied embeddings it reads the embedding's own initializers."""
        g, name = self.g, self.spec.head
        w = self.weights[name]
        if isinstance(w, BlockQuant) and w.offsets is None:
            # MatMulNBits reads [1, L, H] and writes the bound logits buffer itself; a Reshape after it would
            # copy the [L, V] logits into that buffer (4 x vocab bytes per decode token).
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
        """A float initializer; a norm weight carries the family's norm_offset folded in (Gemma's 1 + w)."""
        w = np.asarray(self.weights[name], dtype=np.float32)
        if name in self.norm_names and self.spec.norm_offset:
            w = w + np.float32(self.spec.norm_offset)
        return self.g.weight(name, w)

    @staticmethod
    def _path(name: str) -> str:
        """Node path of a norm: model.layers.3.input_layernorm.weight -> /model/layers.3/input_layernorm."""
        parts = name.removesuffix(".weight").split(".")
        if parts[1] == "layers":
            parts = [parts[0], f"layers.{parts[2]}", *(["attn"] if parts[3] == "self_attn" else []),
                     *parts[3 + (parts[3] == "self_attn"):]]
        return "/" + "/".join(parts)

    def _kv_input(self, ly: Layer) -> tuple[str, str]:
        i = ly.index
        shape = [1, self.cfg.num_key_value_heads, "window_capacity" if self.shifted(ly) else "context",
                 self.cfg.head_dim]
        out = tuple(self.g.input(f"past_key_values.{i}.{kv}", self.kv_dtype, shape) for kv in ("key", "value"))
        for kv in ("key", "value"):
            self.g.output(f"present.{i}.{kv}", self.kv_dtype, shape)
        return out


def build_decoder_graph(config: ModelConfig, weights: Mapping[str, Weight],
                        options: GraphOptions = GraphOptions()) -> onnx.ModelProto:
    """The `edge-llama-v1` decoder graph for `config`, initializers inline (see export.bundle.writer)."""
    return DecoderGraph(config, weights, options).build()
