"""Gemma 3 (text): matches transformers' Gemma3ForCausalLM.

    h = embed(ids) * sqrt(hidden)                       (the scale rounded to the embedding's dtype)
    x = input_layernorm(h); q, k = q_norm(q(x)), k_norm(k(x)) per head; rope; attention scaled by
        query_pre_attn_scalar^-0.5 over the layer's window; h += post_attention_layernorm(o(...))
    x = pre_feedforward_layernorm(h); h += post_feedforward_layernorm(down(gelu_tanh(gate(x)) * up(x)))
    logits = tied_embedding(norm(h))

RMSNorm scales by (1 + weight). Layers are "sliding_attention" (a window of `sliding_window` keys, rope base
rope_local_base_freq, no scaling) or "full_attention" (rope_theta with rope_scaling), per config.layer_types
(default: every 6th layer full). Final logits are softcapped when final_logit_softcapping is set; the
attention scores never are (transformers ignores attn_logit_softcapping for Gemma 3). GGUF files store the norm
weights with the 1 already added.
"""
from __future__ import annotations

import math
from typing import Optional

from .base import DecoderSpec, Rope, rope_factor

SLIDING_PATTERN = 6  # transformers' default when a config has no layer_types
GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def layer_types(config) -> tuple:
    """'sliding_attention' | 'full_attention' per layer, as Gemma3TextConfig derives them."""
    if config.layer_types:
        return tuple(config.layer_types)
    return tuple("sliding_attention" if (i + 1) % SLIDING_PATTERN else "full_attention"
                 for i in range(config.num_hidden_layers))


class Gemma3Spec(DecoderSpec):
    family = "gemma3_text"
    hf_classes = ("Gemma3TextConfig", "Gemma3ForCausalLM")
    gguf_arch = "gemma3"
    gguf_block = GGUF_BLOCK
    activation = "gelu_tanh"
    norm_offset = 1.0

    def _sliding(self, i: int) -> bool:
        return layer_types(self.config)[i] == "sliding_attention"

    def window(self, i: int) -> Optional[int]:
        return self.config.sliding_window if self._sliding(i) else None

    def rope(self, i: int) -> Rope:
        c = self.config
        if self._sliding(i):
            return Rope(float(c.rope_local_base_freq or 10000.0))
        return Rope(float(c.rope_theta), rope_factor(c.rope_scaling))

    def embed_scale(self) -> Optional[float]:
        return math.sqrt(self.config.hidden_size)

    def attn_scale(self) -> float:
        return float(self.config.query_pre_attn_scalar or self.config.head_dim) ** -0.5

    def attn_softcap(self) -> Optional[float]:
        """None: transformers' Gemma3Attention keeps attn_logit_softcapping but never applies it."""
        return None

    def layer_norm_names(self, i: int) -> dict:
        p = f"model.layers.{i}."
        return {"attn_norm": p + "input_layernorm.weight", "q_norm": p + "self_attn.q_norm.weight",
                "k_norm": p + "self_attn.k_norm.weight", "attn_out_norm": p + "post_attention_layernorm.weight",
                "mlp_norm": p + "pre_feedforward_layernorm.weight",
                "mlp_out_norm": p + "post_feedforward_layernorm.weight"}

    def hf_config_extra(self) -> dict:
        c = self.config
        return {"hidden_activation": "gelu_pytorch_tanh", "layer_types": list(layer_types(c)),
                "sliding_window": c.sliding_window, "rope_local_base_freq": c.rope_local_base_freq or 10000.0,
                "query_pre_attn_scalar": c.query_pre_attn_scalar or c.head_dim,
                "attn_logit_softcapping": c.attn_logit_softcapping,
                "final_logit_softcapping": c.final_logit_softcapping, "rope_scaling": c.rope_scaling,
                "attention_bias": False}


SPEC = Gemma3Spec
