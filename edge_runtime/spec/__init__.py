"""One decoder spec per family (DecoderSpec subclasses, one module each), chosen by the config's model_type, and the
rotary tables derived from it (rope). Imports only edge_runtime.format and edge_runtime.errors: the graph builder,
the readers, the quantizers, both backends and the planner import it, so a family is declared once.
"""
from __future__ import annotations

import importlib

from ..errors import UnsupportedModelError
from ..format.config import ModelConfig
from .base import EMBED, FINAL_NORM, LM_HEAD, DecoderSpec, Layer, Rope, Unit, kv_capacity, shift_stride

# model_type -> module of this package
FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}

__all__ = ["EMBED", "FAMILIES", "FINAL_NORM", "LM_HEAD", "DecoderSpec", "Layer", "Rope", "Unit", "spec_for",
           "kv_capacity", "shift_stride", "supported"]


def supported(model_type: str) -> bool:
    return model_type in FAMILIES


def spec_for(config: ModelConfig) -> DecoderSpec:
    """The DecoderSpec of config.model_type; UnsupportedModelError for a family without one."""
    module = FAMILIES.get(config.model_type)
    if module is None:
        raise UnsupportedModelError(f"no decoder spec for model_type {config.model_type!r} "
                                    f"(known: {', '.join(sorted(FAMILIES))})")
    return importlib.import_module(f"{__name__}.{module}").SPEC(config)
