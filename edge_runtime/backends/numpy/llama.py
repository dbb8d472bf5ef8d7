"""The decoder of every edge_runtime.spec family: the NumPy forward pass over a preallocated KV cache.

It matches Hugging Face's causal LMs in float32 (LlamaForCausalLM and its kin, Gemma3ForCausalLM): RMSNorm,
rotary embeddings in the `rotate_half` convention, grouped-query attention (over a sliding window where the
spec says so), gated MLP; what differs between families (norms, activation, scales, attention pattern, rope)
is read from the DecoderSpec. Weights come from a `Weights` lookup, so the same code runs on a dict of float
arrays (tests) or on a bundle's quantized matrices (the NumPy backend).

With a float16 KV cache the attention follows the `edge-llama-v1` graph's float16 GroupQueryAttention: q/k/v
and the rotary tables rounded to float16, the rotation and the softmax computed in float32 on those values,
the rotated q/k and the attention output rounded to float16 (what ONNX Runtime's CPU kernel returns, bit for
bit on the graph's own q/k/v).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional, Protocol

import numpy as np

from ...format.config import ModelConfig
from ...memory.pages import reserve
from ...spec import EMBED, DecoderSpec, kv_capacity, spec_for
from ...spec.rope import full_tables

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
    """Weights held as float arrays under Hugging Face names (a state dict, or float views of a bundle).

    norms_folded: the norm weights already include the spec's norm_offset (a bundle's do; an HF state dict's
    Gemma norms do not, and get it added here).
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], cfg: ModelConfig, norms_folded: bool = False):
        spec = spec_for(cfg)
        self.tensors = tensors
        self.head_name = spec.head
        self.offsets = {} if norms_folded or not spec.norm_offset else dict.fromkeys(spec.norm_names(),
                                                                                     np.float32(spec.norm_offset))

    def vector(self, name: str) -> np.ndarray:
        v = np.asarray(self.tensors[name], dtype=np.float32)
        return v + self.offsets[name] if name in self.offsets else v

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        w = self.tensors[name]  # [N, K]
        return x @ (w if w.dtype == np.float32 else w.astype(np.float32)).T

    def linears(self, names: Sequence[str], x: np.ndarray) -> list[np.ndarray]:
        return [self.linear(n, x) for n in names]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.tensors[EMBED][ids], dtype=np.float32)

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        return self.linear(self.head_name, x)


# -- building blocks -------------------------------------------------------------------------------

def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [..., D] -> weight * x / sqrt(mean(x^2) + eps) (matches HF LlamaRMSNorm in float32; Gemma's
    (1 + weight) arrives with the 1 folded into weight)."""
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    return weight * (x / np.sqrt(var + np.float32(eps)))


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


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (HF gelu_pytorch_tanh): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    inner = np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x * x * x)
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}
KEY_BLOCK = 512  # cache positions converted to float64 at a time: the cache is never copied whole


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, past_len: int, key_start: int = 0,
              scale: Optional[float] = None, window: Optional[int] = None,
              softcap: Optional[float] = None) -> np.ndarray:
    """Causal grouped-query attention of new queries over the cache.

    q [H, S, D] float32 at positions past_len..past_len+S-1; keys, values [KVH, T, D] (float32 or float16, the
    cache's own views) at positions key_start..key_start+T-1 (T = past_len + S - key_start). A query sees the
    keys at or before it, and with `window` only the last `window` of them (itself included). Query head h
    reads KV head h // (H // KVH) (HF repeat_kv order). scale: default 1/sqrt(D); softcap c: scores become
    c * tanh(scores / c). Returns [H, S, D] float32. Scores are computed in place; the cache is read in
    blocks of KEY_BLOCK positions.

    Computed in float64 and rounded once at the end: BLAS sums a row in an order that depends on how many rows
    share the call, and the softmax's sum on how many masked keys a row carries. In float32 those differ by an
    ulp between a prompt prefilled at once and token by token, which the next matmul's int8 rounding can turn
    into another token; in float64 the rounded results agree.
    """
    n_heads, s_len, d = q.shape
    kv_heads, t_len, _ = keys.shape
    group = n_heads // kv_heads
    qg = q.reshape(kv_heads, group * s_len, d).astype(np.float64)     # [KVH, G*S, D]
    block = KEY_BLOCK
    scores = np.empty((kv_heads, group * s_len, t_len), np.float64)   # [KVH, G*S, T]
    for t0 in range(0, t_len, block):
        kb = keys[:, t0:t0 + block].astype(np.float64)
        np.matmul(qg, kb.transpose(0, 2, 1), out=scores[:, :, t0:t0 + block])
    scores *= np.float32(1.0 / math.sqrt(d) if scale is None else scale)
    if softcap:
        scores /= np.float32(softcap)
        np.tanh(scores, out=scores)
        scores *= np.float32(softcap)
    q_pos = past_len + np.arange(s_len)                                # [S]
    k_pos = key_start + np.arange(t_len)                               # [T]
    if s_len > 1 or (window and q_pos[-1] - k_pos[0] >= window):
        hidden = k_pos[None, :] > q_pos[:, None]                       # [S, T]: keys after the query
        if window:
            hidden |= q_pos[:, None] - k_pos[None, :] >= window        # keys older than the window
        scores.reshape(kv_heads, group, s_len, t_len)[:, :, hidden] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores, out=scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = probs[:, :, :block] @ values[:, :block].astype(np.float64)      # [KVH, G*S, D]
    for t0 in range(block, t_len, block):
        out += probs[:, :, t0:t0 + block] @ values[:, t0:t0 + block].astype(np.float64)
    return out.reshape(n_heads, s_len, d).astype(np.float32)                            # [H, S, D]


class KVCache:
    """Keys and values of every layer: [KVH, C, D] each, C = kv_capacity(layer window, context).

    A sliding-window layer of window W keeps a ring of C = W - 1 + W // 2 positions (position p in slot p % C):
    the last W - 1 keys every pass needs, and room for a reply of up to W // 2 tokens after which the next
    turn still resumes at the prompt's end (`floor`). A pass attends over the W - 1 positions before it, taken
    from the ring in position order, then its own. Rewinding (a forward at a past_len below the cache's end)
    is exact from position 0, at or after `floor(end)`, or within full-context layers.
    """

    def __init__(self, cfg: ModelConfig, context: int, dtype: str = "float32",
                 windows: Optional[Sequence] = None):
        windows = windows if windows is not None else spec_for(cfg).windows
        self.windows, self.context = tuple(windows), int(context)
        self.keys, self.values = [], []
        for w in self.windows:
            shape = (cfg.num_key_value_heads, kv_capacity(w, context), cfg.head_dim)
            self.keys.append(reserve(shape, dtype))  # resident as positions fill; the memory plan counts all
            self.values.append(reserve(shape, dtype))

    @property
    def nbytes(self) -> int:
        return int(sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values)))

    def _rings(self) -> list[tuple[int, int]]:
        """(window, capacity) of every layer whose ring holds fewer positions than the context."""
        return [(w, k.shape[1]) for w, k in zip(self.windows, self.keys) if k.shape[1] < self.context]

    @property
    def ring(self) -> Optional[int]:
        """The smallest window of a ring (as Backend.kv_ring), None without one."""
        return min((w for w, _ in self._rings()), default=None)

    def floor(self, end: int) -> int:
        """The first position a pass may start at once positions 0..end-1 are written: every ring still holds
        the window - 1 keys before it (Backend.resume_floor)."""
        return max((max(0, end - (cap - w + 1)) for w, cap in self._rings() if end > cap), default=0)

    def update(self, layer: int, k: np.ndarray, v: np.ndarray, past_len: int):
        """Write k, v [KVH, S, D] for positions past_len.. and return (keys, values, key_start): the views
        [KVH, T, D] in the cache's dtype the new queries attend over, the first at position key_start."""
        keys, values = self.keys[layer], self.values[layer]
        window, cap, s_len = self.windows[layer], keys.shape[1], k.shape[1]
        end = past_len + s_len
        if window is None or end <= cap:  # a full layer, or a ring not yet wrapped
            keys[:, past_len:end] = k
            values[:, past_len:end] = v
            return keys[:, :end], values[:, :end], 0
        # The pass's first query needs the window - 1 positions before it, which its own writes may overwrite
        # (and the ring holds older ones besides): attend over those, in position order, then the pass.
        start = max(0, past_len - window + 1)
        slots = np.arange(start, past_len) % cap
        keys_seen = np.concatenate([keys[:, slots], k.astype(keys.dtype)], axis=1)      # [KVH, T, D]
        values_seen = np.concatenate([values[:, slots], v.astype(values.dtype)], axis=1)
        last = np.arange(max(past_len, end - cap), end)                                  # positions kept
        keys[:, last % cap] = k[:, last - past_len]
        values[:, last % cap] = v[:, last - past_len]
        return keys_seen, values_seen, start


# -- the model -------------------------------------------------------------------------------------

class DecoderForward:
    """The decoder, step by step: `forward(ids, past_len, logits_index)` fills the cache, returns logits."""

    def __init__(self, cfg: ModelConfig, weights: Weights, context: int, kv_dtype: str = "float32",
                 spec: Optional[DecoderSpec] = None):
        self.cfg, self.w = cfg, weights
        self.spec = spec or spec_for(cfg)
        self.cache = KVCache(cfg, context, kv_dtype, self.spec.windows)
        # A float16 cache means half-precision attention, as the graph's GroupQueryAttention does it: q/k/v
        # and the rotary tables in float16, rotated q/k and the output rounded to float16 (module docstring).
        self.half = np.dtype(kv_dtype) == np.float16
        self.rope = {}  # Rope -> (cos, sin) [C, D] each
        for rope in self.spec.ropes:
            cos, sin = full_tables(context, cfg.head_dim, rope)
            self.rope[rope] = (to_half(cos), to_half(sin)) if self.half else (cos, sin)
        self.eps = cfg.rms_norm_eps
        self.act = ACTIVATIONS[self.spec.activation]
        scale = self.spec.embed_scale()
        self.embed_scale = None if scale is None else np.float32(scale)  # HF rounds it to the table's dtype

    def forward(self, ids: np.ndarray, past_len: int, logits_index: np.ndarray) -> np.ndarray:
        """ids [S] int64 at positions past_len.. -> logits [len(logits_index), vocab] float32."""
        h = self.w.embed(ids)                                       # [S, hidden]
        if self.embed_scale is not None:
            h = h * self.embed_scale
        for layer in self.spec.layers:
            a = self.self_attn(layer, self.norm(h, layer.attn_norm), past_len)
            h = h + (self.norm(a, layer.attn_out_norm) if layer.attn_out_norm else a)
            m = self.mlp(layer, self.norm(h, layer.mlp_norm))
            h = h + (self.norm(m, layer.mlp_out_norm) if layer.mlp_out_norm else m)
        h = self.norm(h[logits_index], "model.norm.weight")         # [L, hidden]: only the rows asked for
        logits = self.w.lm_head(h)                                  # [L, vocab]
        cap = self.cfg.final_logit_softcapping
        return logits if not cap else np.float32(cap) * np.tanh(logits / np.float32(cap))

    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return rms_norm(x, self.w.vector(name), self.eps)

    def heads(self, y: np.ndarray, bias_name: Optional[str], n_heads: int) -> np.ndarray:
        """A projection's output [S, heads*D] (+ its bias when the model has one) -> [heads, S, D]."""
        if bias_name:
            y = y + self.w.vector(bias_name)
        return y.reshape(y.shape[0], n_heads, self.cfg.head_dim).transpose(1, 0, 2)

    def self_attn(self, layer, x: np.ndarray, past_len: int) -> np.ndarray:
        cfg, s_len = self.cfg, x.shape[0]
        cos, sin = (t[past_len:past_len + s_len] for t in self.rope[layer.rope])   # [S, D]
        q, k, v = self.w.linears([layer.q, layer.k, layer.v], x)
        bias = layer.qkv_bias or (None, None, None)
        q = self.heads(q, bias[0], cfg.num_attention_heads)       # [H, S, D]
        k = self.heads(k, bias[1], cfg.num_key_value_heads)       # [KVH, S, D]
        v = self.heads(v, bias[2], cfg.num_key_value_heads)       # [KVH, S, D]
        if layer.q_norm:
            q, k = self.norm(q, layer.q_norm), self.norm(k, layer.k_norm)
        if self.half:
            q, k, v = to_half(q), to_half(k), to_half(v)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.half:
            q = to_half(q)  # k is rounded by the float16 cache
        keys, values, key_start = self.cache.update(layer.index, k, v, past_len)   # [KVH, T, D] each
        o = attention(q, keys, values, past_len, key_start, self.spec.attn_scale(), layer.window,
                      self.spec.attn_softcap())                     # [H, S, D]
        if self.half:
            o = to_half(o)
        return self.w.linear(layer.o, o.transpose(1, 0, 2).reshape(s_len, cfg.q_dim))

    def mlp(self, layer, x: np.ndarray) -> np.ndarray:
        """Gated MLP: down(act(gate(x)) * up(x)); x [S, hidden]."""
        g, u = self.w.linears([layer.gate, layer.up], x)           # [S, intermediate] each
        return self.w.linear(layer.down, self.act(g) * u)           # [S, hidden]
