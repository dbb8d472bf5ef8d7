"""Qwen2: Llama with biases on the q/k/v projections."""
from __future__ import annotations

from .base import DecoderSpec


class Qwen2Spec(DecoderSpec):
    family = "qwen2"
    hf_classes = ("Qwen2Config", "Qwen2ForCausalLM")
    gguf_arch = "qwen2"
    always_qkv_bias = True

    def hf_config_extra(self) -> dict:
        return {"hidden_act": "silu", "use_sliding_window": False, "sliding_window": self.config.sliding_window}


SPEC = Qwen2Spec
