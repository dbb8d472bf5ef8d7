"""Llama (and SmolLM2): RMSNorm, rotary in the rotate_half layout, grouped-query attention, SwiGLU MLP."""
from __future__ import annotations

from .base import DecoderSpec


class LlamaSpec(DecoderSpec):
    family = "llama"
    hf_classes = ("LlamaConfig", "LlamaForCausalLM")
    gguf_arch = "llama"
    gguf_permuted_qk = True

    def hf_config_extra(self) -> dict:
        # transformers' Llama puts attention_bias on o_proj too, which no tensor list here carries
        return {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


SPEC = LlamaSpec
