"""The in-memory float model every exporter step starts from (SourceModel), and the checks and chat rendering
the readers share."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.errors import UnsupportedModelError
from edge_runtime.format.config import ModelConfig

from .gguf_blocks import GGUFBlocks


@dataclass
class SourceModel:
    """A float model in Hugging Face layout: what every exporter step and the float reference start from."""

    config: ModelConfig
    tensors: dict[str, np.ndarray]  # float32, names/layouts of DecoderSpec.tensor_names, linear [out, in]
    tokenizer_json: str  # Hugging Face `tokenizers` JSON
    tokenizer_meta: dict  # bos_token_id, eos_token_ids, pad_token_id, special_tokens, chat_template, add_bos_token
    origin: dict  # format, path, sha256 (of the file; of config.json + weights for a folder; none for tiny)
    gguf_blocks: dict[str, GGUFBlocks] = field(default_factory=dict)  # HF name -> blocks, GGUF sources only
    hf_dir: Path | None = None  # a HF folder holding this model, when there is one


def check_tensors(config: ModelConfig, tensors: dict[str, np.ndarray], where: str) -> None:
    """Raise unless `tensors` holds every float32 tensor of the config's decoder spec, with HF shapes."""
    shapes = expected_shapes(config)
    missing = [n for n in shapes if n not in tensors]
    if missing:
        raise UnsupportedModelError(f"{where}: missing tensor {missing[0]} ({len(missing)} missing)")
    for name, want in shapes.items():
        got = tuple(tensors[name].shape)
        if got != want:
            raise UnsupportedModelError(f"{where}: tensor {name} has shape {got}, config implies {want}")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """HF shape of every tensor of the config's decoder spec, in file order."""
    from edge_runtime.spec import spec_for

    return spec_for(cfg).shapes()


def render_chat(tokenizer_meta: dict, user_text: str, system: str | None = None) -> str:
    """One user turn rendered with the model's chat template, ready for generation (like HF apply_chat_template).

    The runtime's sandboxed renderer (edge_runtime.tokenizer.chat_template) is the one implementation; this only
    builds the turn.
    """
    from edge_runtime.tokenizer.chat_template import render

    if not tokenizer_meta.get("chat_template"):
        raise UnsupportedModelError("this model has no chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    return render(tokenizer_meta["chat_template"], messages, tokenizer_meta.get("special_tokens", {}))
