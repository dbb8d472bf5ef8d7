"""The Llama-family decoder (Llama, Mistral, Qwen2): the NumPy forward pass over a preallocated KV cache.

It matches Hugging Face's LlamaForCausalLM in float32: RMSNorm, rotary embeddings in the `rotate_half`
convention, grouped-query attention, SwiGLU MLP. Weights come from a `Weights` lookup, so the same code runs
on a dict of float arrays (tests) or on a bundle's quantized matrices (the NumPy backend).

With a float16 KV cache the attention follows the `edge-llama-v1` graph's float16 GroupQueryAttention: q/k/v
and the rotary tables rounded to float16, the rotation and the softmax computed in float32 on those values,
the rotated q/k and the attention output rounded to float16 (what ONNX Runtime's CPU kernel returns, bit for
bit on the graph's own q/k/v).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from .config import ModelConfig
from .pages import reserve

KV_DTYPES = ("float32", "float16")


class Weights(Protocol):
    """Where the forward pass gets its parameters (Hugging Face tensor names)."""

    def vector(self, name: str) -> np.ndarray:
        """A float32 1-D parameter (norm weight, projection bias)."""
        ...

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        """x [S, K] @ W.T for the weight `name` ([N, K], e.g. `...q_proj.weight`) -> [S, N] float32."""
        ...

    def linears(self, names: Sequence[str], x: np.ndarray) -> list[np.ndarray]:
        """Products of several weights with one input (q/k/v, gate/up): one fused product when possible."""
        ...

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings [S, hidden] float32 of ids [S]."""
        ...

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        """x [L, hidden] -> logits [L, vocab] float32 (the embedding matrix when tied)."""
        ...


class DenseWeights:
    """Weights held as float arrays under Hugging Face names (a state dict, or float views of a bundle)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], cfg: ModelConfig):
        self.tensors = tensors
        self.head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"

    def vector(self, name: str) -> np.ndarray:
        return np.asarray(self.tensors[name], dtype=np.float32)

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        w = self.tensors[name]  # [N, K]
        return x @ (w if w.dtype == np.float32 else w.astype(np.float32)).T

    def linears(self, names: Sequence[str], x: np.ndarray) -> list[np.ndarray]:
        return [self.linear(n, x) for n in names]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.tensors["model.embed_tokens.weight"][ids], dtype=np.float32)

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        return self.linear(self.head_name, x)


# -- building blocks -------------------------------------------------------------------------------

def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [S, D] -> weight * x / sqrt(mean(x^2) + eps) (matches HF LlamaRMSNorm in float32)."""
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    return weight * (x / np.sqrt(var + np.float32(eps)))


def rope_tables(head_dim: int, theta: float, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n_positions, head_dim] float32: the default rope of HF LlamaRotaryEmbedding.

    inv_freq[j] = 1 / theta^(2j/head_dim) and the angles position * inv_freq are rounded to float32 as HF
    computes them (the same tables as the ONNX graph's, export/graph/ops.py); cos/sin are taken in float64.
    Angles are duplicated over both halves of head_dim: the `rotate_half` layout.
    """
    inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
    angles = np.outer(np.arange(n_positions, dtype=np.float32), inv_freq).astype(np.float32)  # [P, D/2]
    emb = np.concatenate([angles, angles], axis=-1).astype(np.float64)                        # [P, D]
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [heads, S, D] rotated by cos/sin [S, D]: x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # [heads, S, D]
    return x * cos + rotated * sin


def to_half(x: np.ndarray) -> np.ndarray:
    """x rounded to float16, returned as float32."""
    return x.astype(np.float16).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), with sigmoid written via tanh so that large |x| neither overflows nor warns."""
    return x * (0.5 + 0.5 * np.tanh(0.5 * x))


KEY_BLOCK = 512  # float16 cache positions converted to float32 at a time: the cache is never copied whole


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, past_len: int) -> np.ndarray:
    """Causal grouped-query attention of new queries over the cache.

    q [H, S, D] float32 at positions past_len..past_len+S-1; keys, values [KVH, T, D] (float32 or float16, the
    cache's own views) with T = past_len + S. Query head h reads KV head h // (H // KVH) (HF repeat_kv order).
    Returns [H, S, D]. Scores are computed in place; the cache is read in float32 blocks of KEY_BLOCK positions.
    """
    n_heads, s_len, d = q.shape
    kv_heads, t_len, _ = keys.shape
    group = n_heads // kv_heads
    qg = q.reshape(kv_heads, group * s_len, d)                        # [KVH, G*S, D]
    block = t_len if keys.dtype == np.float32 else KEY_BLOCK          # only a float16 cache is converted
    scores = np.empty((kv_heads, group * s_len, t_len), np.float32)   # [KVH, G*S, T]
    for t0 in range(0, t_len, block):
        kb = keys[:, t0:t0 + block].astype(np.float32, copy=False)
        np.matmul(qg, kb.transpose(0, 2, 1), out=scores[:, :, t0:t0 + block])
    scores *= np.float32(1.0 / math.sqrt(d))
    if s_len > 1:
        # Query j (position past_len + j) may not see keys after it.
        future = np.arange(t_len)[None, :] > (past_len + np.arange(s_len))[:, None]  # [S, T]
        scores.reshape(kv_heads, group, s_len, t_len)[:, :, future] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores, out=scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = probs[:, :, :block] @ values[:, :block].astype(np.float32, copy=False)      # [KVH, G*S, D]
    for t0 in range(block, t_len, block):
        out += probs[:, :, t0:t0 + block] @ values[:, t0:t0 + block].astype(np.float32, copy=False)
    return out.reshape(n_heads, s_len, d)                            # [H, S, D]


class KVCache:
    """Keys and values of every layer, preallocated for `context` positions: [layers, KVH, C, D] each."""

    def __init__(self, cfg: ModelConfig, context: int, dtype: str = "float32"):
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, context, cfg.head_dim)
        self.keys = reserve(shape, dtype)  # resident as positions fill; the memory plan counts all of it
        self.values = reserve(shape, dtype)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)

    def update(self, layer: int, k: np.ndarray, v: np.ndarray, past_len: int):
        """Write k, v [KVH, S, D] at past_len.. and return views of keys, values [KVH, past_len+S, D] in the
        cache's dtype (attention converts them block by block)."""
        end = past_len + k.shape[1]
        self.keys[layer, :, past_len:end] = k
        self.values[layer, :, past_len:end] = v
        return self.keys[layer, :, :end], self.values[layer, :, :end]


# -- the model -------------------------------------------------------------------------------------

class LlamaForward:
    """The decoder, step by step: `forward(ids, past_len, logits_index)` fills the cache, returns logits."""

    def __init__(self, cfg: ModelConfig, weights: Weights, context: int, kv_dtype: str = "float32"):
        self.cfg, self.w = cfg, weights
        self.cache = KVCache(cfg, context, kv_dtype)
        self.cos, self.sin = rope_tables(cfg.head_dim, cfg.rope_theta, context)  # [C, D] each
        # A float16 cache means half-precision attention, as the graph's GroupQueryAttention does it: q/k/v
        # and the rotary tables in float16, rotated q/k and the output rounded to float16 (module docstring).
        self.half = np.dtype(kv_dtype) == np.float16
        if self.half:
            self.cos, self.sin = to_half(self.cos), to_half(self.sin)
        self.eps = cfg.rms_norm_eps

    def forward(self, ids: np.ndarray, past_len: int, logits_index: np.ndarray) -> np.ndarray:
        """ids [S] int64 at positions past_len.. -> logits [len(logits_index), vocab] float32."""
        h = self.w.embed(ids)                                       # [S, hidden]
        for i in range(self.cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            h = h + self.self_attn(i, self.norm(h, p + "input_layernorm.weight"), past_len)
            h = h + self.mlp(i, self.norm(h, p + "post_attention_layernorm.weight"))
        h = self.norm(h[logits_index], "model.norm.weight")         # [L, hidden]: only the rows asked for
        return self.w.lm_head(h)                                    # [L, vocab]

    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return rms_norm(x, self.w.vector(name), self.eps)

    def heads(self, y: np.ndarray, bias_name: str, n_heads: int) -> np.ndarray:
        """A projection's output [S, heads*D] (+ its bias when the model has one) -> [heads, S, D]."""
        if self.cfg.attention_bias:
            y = y + self.w.vector(bias_name)
        return y.reshape(y.shape[0], n_heads, self.cfg.head_dim).transpose(1, 0, 2)

    def self_attn(self, layer: int, x: np.ndarray, past_len: int) -> np.ndarray:
        cfg, p = self.cfg, f"model.layers.{layer}.self_attn."
        s_len = x.shape[0]
        cos, sin = self.cos[past_len:past_len + s_len], self.sin[past_len:past_len + s_len]  # [S, D]
        q, k, v = self.w.linears([p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"], x)
        q = self.heads(q, p + "q_proj.bias", cfg.num_attention_heads)   # [H, S, D]
        k = self.heads(k, p + "k_proj.bias", cfg.num_key_value_heads)   # [KVH, S, D]
        v = self.heads(v, p + "v_proj.bias", cfg.num_key_value_heads)   # [KVH, S, D]
        if self.half:
            q, k, v = to_half(q), to_half(k), to_half(v)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.half:
            q = to_half(q)  # k is rounded by the float16 cache
        keys, values = self.cache.update(layer, k, v, past_len)     # [KVH, T, D] each
        o = attention(q, keys, values, past_len)                    # [H, S, D]
        if self.half:
            o = to_half(o)
        return self.w.linear(p + "o_proj.weight", o.transpose(1, 0, 2).reshape(s_len, cfg.q_dim))

    def mlp(self, layer: int, x: np.ndarray) -> np.ndarray:
        """SwiGLU: down(silu(gate(x)) * up(x)); x [S, hidden]."""
        p = f"model.layers.{layer}.mlp."
        g, u = self.w.linears([p + "gate_proj.weight", p + "up_proj.weight"], x)  # [S, intermediate] each
        g = silu(g) * u
        return self.w.linear(p + "down_proj.weight", g)             # [S, hidden]
