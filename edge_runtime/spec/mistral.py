"""Mistral: Llama whose every layer attends to the last `sliding_window` positions (when the config sets one)."""
from __future__ import annotations

from typing import Optional

from .base import DecoderSpec


class MistralSpec(DecoderSpec):
    family = "mistral"
    hf_classes = ("MistralConfig", "MistralForCausalLM")

    def window(self, i: int) -> Optional[int]:
        return self.config.sliding_window

    def hf_config_extra(self) -> dict:
        return {"hidden_act": "silu", "sliding_window": self.config.sliding_window}


SPEC = MistralSpec
