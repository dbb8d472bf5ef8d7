"""Model sources: one in-memory float model (HF names, fp32) read from a GGUF, a HF folder, or a tiny config."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.config import ModelConfig
from edge_runtime.errors import UnsupportedModelError

from .gguf_blocks import GGUF_TYPES, GGUFBlocks  # noqa: F401 - re-exported: HF name -> blocks below


@dataclass
class SourceModel:
    """A float model in Hugging Face layout: what every exporter step and the float reference start from."""

    config: ModelConfig
    tensors: dict[str, np.ndarray]  # float32, names/layouts of edge_runtime.config.tensor_names, linear [out, in]
    tokenizer_json: str  # Hugging Face `tokenizers` JSON
    tokenizer_meta: dict  # bos_token_id, eos_token_ids, pad_token_id, special_tokens, chat_template, add_bos_token
    origin: dict  # format, path, sha256 (of the file; of config.json + weights for a folder; none for tiny)
    gguf_blocks: dict[str, GGUFBlocks] = field(default_factory=dict)  # HF name -> blocks, GGUF sources only
    hf_dir: Path | None = None  # a HF folder holding this model, when there is one


def load_source(spec: str) -> SourceModel:
    """Load `spec`: a .gguf file, a HF folder (config.json + *.safetensors + tokenizer.json), or tiny:<arch>.

    tiny specs: tiny:llama, tiny:qwen2, tiny:mistral, optionally suffixed -tied / -untied.
    """
    spec = str(spec)
    if spec.startswith("tiny:"):
        from .tiny import tiny_source

        return tiny_source(spec[len("tiny:"):])
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf import read_gguf

        return read_gguf(path)
    if path.is_dir():
        from .hf import read_hf_folder

        return read_hf_folder(path)
    if not path.exists():
        raise UnsupportedModelError(f"model not found: {spec} (expected a .gguf file, a HF folder or tiny:<arch>)")
    raise UnsupportedModelError(f"cannot read {spec}: expected a .gguf file, a HF folder or tiny:<arch>")


def check_tensors(config: ModelConfig, tensors: dict[str, np.ndarray], where: str) -> None:
    """Raise unless `tensors` holds exactly the float32 tensors tensor_names(config) lists, with HF shapes."""
    from edge_runtime.config import tensor_names

    missing = [n for n in tensor_names(config) if n not in tensors]
    if missing:
        raise UnsupportedModelError(f"{where}: missing tensor {missing[0]} ({len(missing)} missing)")
    for name, want in expected_shapes(config).items():
        got = tuple(tensors[name].shape)
        if got != want:
            raise UnsupportedModelError(f"{where}: tensor {name} has shape {got}, config implies {want}")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """HF shape of every tensor in tensor_names(cfg)."""
    from edge_runtime.config import tensor_names

    h, f = cfg.hidden_size, cfg.intermediate_size
    by_suffix = {
        "embed_tokens.weight": (cfg.vocab_size, h), "lm_head.weight": (cfg.vocab_size, h),
        "norm.weight": (h,), "layernorm.weight": (h,),
        "q_proj.weight": (cfg.q_dim, h), "k_proj.weight": (cfg.kv_dim, h), "v_proj.weight": (cfg.kv_dim, h),
        "q_proj.bias": (cfg.q_dim,), "k_proj.bias": (cfg.kv_dim,), "v_proj.bias": (cfg.kv_dim,),
        "o_proj.weight": (h, cfg.q_dim),
        "gate_proj.weight": (f, h), "up_proj.weight": (f, h), "down_proj.weight": (h, f),
    }
    out = {}
    for name in tensor_names(cfg):
        suffix = next(s for s in by_suffix if name.endswith(s))
        out[name] = by_suffix[suffix]
    return out


def render_chat(tokenizer_meta: dict, user_text: str, system: str | None = None) -> str:
    """One user turn rendered with the model's chat template, ready for generation (like HF apply_chat_template).

    The runtime's sandboxed renderer (edge_runtime.chat) is the one implementation; this only builds the turn.
    """
    from edge_runtime.chat import render

    if not tokenizer_meta.get("chat_template"):
        raise UnsupportedModelError("this model has no chat template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    return render(tokenizer_meta["chat_template"], messages, tokenizer_meta.get("special_tokens", {}))
