"""SmoothQuant-style per-input-channel scaling, folded into the preceding op, for MatMulNBits' int8 activations.

At accuracy_level 4 MatMulNBits rounds its input to int8 per block of block_size values with scale absmax/127,
so one large channel makes every other channel of its block coarse. Scaling input channel k down by s_k and
the weight's column k up by s_k leaves the product unchanged and flattens the blocks; 1/s_k is folded into the
op that makes the input, so the graph stays the same:

    q/k/v     input = RMSNorm(h) * attn_norm (Layer roles of edge_runtime.spec)  -> attn_norm / s
    gate/up   input = RMSNorm(h) * mlp_norm                        -> mlp_norm / s
    down      input = act(gate) * up                               -> up_proj rows / s
    o         input = attention(q, k, v) per head                  -> v_proj rows (and bias) / s, where the
              query heads that read one KV head share its scales (grouped-query attention)

s_k = act_k^alpha / wmax_k^(1 - alpha) (act: the channel's RMS on calibration text, wmax: the largest |W[:, k]|
over the weights the input feeds), normalized to geometric mean 1. A family whose norms scale by
(offset + weight) (Gemma) gets weight' = (offset + weight) / s - offset. The lm_head (tied to the embedding, whose
columns cannot be rescaled without also rescaling the embedding lookup) is left alone.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edge_runtime.format.config import ModelConfig
from edge_runtime.spec import spec_for

KINDS = ("qkv", "gate_up", "down", "o")
# Inside the range of strengths that work about equally well; much weaker or much stronger smoothing leaves a
# larger held-out KLD (`edge-export --recipe q8 --smooth-alpha A` reports it).
DEFAULT_ALPHA = 0.5
_FLOOR = 1e-6        # keeps channels that calibration never excited (or all-zero columns) finite


def smoothing_scales(act: np.ndarray, wmax: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Per-channel s = act^alpha / wmax^(1-alpha), float32 [K], geometric mean 1 (so weights keep their size)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    a = np.maximum(np.asarray(act, np.float64), _FLOOR)
    w = np.maximum(np.asarray(wmax, np.float64), _FLOOR)
    log_s = alpha * np.log(a) - (1.0 - alpha) * np.log(w)
    return np.exp(log_s - log_s.mean()).astype(np.float32)


def _col_absmax(tensors: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """max over the named [N_j, K] weights of |W[:, k]|: [K]."""
    return np.max([np.abs(tensors[n]).max(axis=0) for n in names], axis=0)


def _scale_inputs(t: dict, names: Sequence[str], s: np.ndarray) -> None:
    """Weights [N, K] that read the smoothed input: columns times s."""
    for n in names:
        t[n] = (t[n] * s[None, :]).astype(np.float32)


def _scale_rows(t: dict, name: str, inv: np.ndarray) -> None:
    """The producer's output channels (weight rows, and the bias when there is one) times inv."""
    t[name] = (t[name] * inv[:, None]).astype(np.float32)
    bias = name.removesuffix(".weight") + ".bias"
    if bias in t:
        t[bias] = (t[bias] * inv).astype(np.float32)


def _smooth_norm_fed(t: dict, norm: str, names: Sequence[str], act: np.ndarray, alpha: float,
                     offset: float) -> None:
    s = smoothing_scales(act, _col_absmax(t, names), alpha)        # [hidden]
    t[norm] = ((t[norm] + np.float32(offset)) / s - np.float32(offset)).astype(np.float32)
    _scale_inputs(t, names, s)


def _smooth_down(t: dict, up: str, down: str, act: np.ndarray, alpha: float) -> None:
    s = smoothing_scales(act, _col_absmax(t, [down]), alpha)       # [intermediate]
    _scale_rows(t, up, 1.0 / s)                                    # act(gate) * (up / s)
    _scale_inputs(t, [down], s)


def _smooth_o(t: dict, cfg: ModelConfig, v: str, o: str, act: np.ndarray, alpha: float) -> None:
    kvh, group, d = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    # o_proj input channel h*D + j comes from v channel (h // group)*D + j: one scale per KV channel.
    a = np.asarray(act).reshape(kvh, group, d).max(axis=1)                     # [KVH, D]
    w = _col_absmax(t, [o]).reshape(kvh, group, d).max(axis=1)                 # [KVH, D]
    s = smoothing_scales(a.reshape(-1), w.reshape(-1), alpha).reshape(kvh, d)  # [KVH, D]
    _scale_rows(t, v, 1.0 / s.reshape(-1))
    _scale_inputs(t, [o], np.repeat(s[:, None, :], group, axis=1).reshape(-1))  # [H*D]


def smooth_decoder(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, act_rms: Mapping[str, np.ndarray],
                   alpha: float = DEFAULT_ALPHA, kinds: Sequence[str] = KINDS) -> dict[str, np.ndarray]:
    """A copy of `tensors` (HF names, fp32) with the smoothing of `kinds` folded in; the float model it
    describes computes the same function (up to float rounding).

    act_rms: HF weight name -> RMS of that matmul's input channels on calibration text, [K] (as returned by
    export.quant.sensitivity.activation_scales); q_proj's stands for q/k/v, gate_proj's for gate/up.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown smoothing kinds {sorted(unknown)} (choose from {', '.join(KINDS)})")
    spec = spec_for(cfg)
    t = dict(tensors)
    for ly in spec.layers:
        if "qkv" in kinds:
            _smooth_norm_fed(t, ly.attn_norm, [ly.q, ly.k, ly.v], act_rms[ly.q], alpha, spec.norm_offset)
        if "gate_up" in kinds:
            _smooth_norm_fed(t, ly.mlp_norm, [ly.gate, ly.up], act_rms[ly.gate], alpha, spec.norm_offset)
        if "down" in kinds:
            _smooth_down(t, ly.up, ly.down, act_rms[ly.down], alpha)
        if "o" in kinds:
            _smooth_o(t, cfg, ly.v, ly.o, act_rms[ly.o], alpha)
    return t


def changed(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> list[str]:
    """Names whose arrays smoothing replaced (they can no longer be transcoded from the source's blocks)."""
    return [n for n in after if after[n] is not before.get(n)]
