"""Hugging Face folders: read one (config.json + *.safetensors + tokenizer.json) and write a SourceModel as one."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from edge_runtime.errors import UnsupportedModelError
from edge_runtime.format.config import ModelConfig
from edge_runtime.spec import FAMILIES, spec_for, supported
from edge_runtime.spec.base import rope_factor

from .source import SourceModel, check_tensors

IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # old checkpoints saved this buffer; it is recomputed


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsupportedModelError(f"cannot read {path}: {e}") from None


def read_config(folder: Path) -> ModelConfig:
    d = read_json(folder / "config.json")
    if not supported(d.get("model_type")):
        raise UnsupportedModelError(
            f"{folder}: model_type '{d.get('model_type')}' is not supported (know {', '.join(sorted(FAMILIES))})")
    if d["model_type"] == "llama" and d.get("attention_bias"):
        raise UnsupportedModelError(f"{folder}: llama with attention_bias is not supported")
    cfg = ModelConfig.from_dict(d)
    rope_factor(cfg.rope_scaling)  # rejects an unsupported rope_scaling
    return cfg


def read_tensors(folder: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Every tensor of the *.safetensors files as float32 (bf16/fp16 upcast via torch)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{folder}: no *.safetensors weights")
    wanted, out = set(spec_for(cfg).tensor_names()), {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            names = st.keys()
            for name in names:
                if name in wanted:
                    out[name] = st.get_tensor(name).float().numpy()
                elif not (name == "lm_head.weight" and cfg.tie_word_embeddings or name.endswith(IGNORED_TENSORS)):
                    raise UnsupportedModelError(f"{folder}: unexpected tensor {name} for {cfg.model_type}")
    check_tensors(cfg, out, str(folder))
    return out


def token_str(value) -> str | None:
    """tokenizer_config.json spells a token either as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def strip_bos_template(doc: dict) -> dict:
    """Drop a TemplateProcessing post-processor (our runtime prepends BOS itself, by add_bos_token)."""
    post = doc.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":
        doc["post_processor"] = None
    elif post.get("type") == "Sequence":
        post["processors"] = [p for p in post["processors"] if p.get("type") != "TemplateProcessing"]
    return doc


def read_tokenizer(folder: Path) -> tuple[str, dict]:
    """(tokenizer.json text without a BOS-adding post-processor, tokenizer_meta)."""
    from tokenizers import Tokenizer

    if not (folder / "tokenizer.json").is_file():
        raise UnsupportedModelError(f"{folder}: no tokenizer.json")
    doc = read_json(folder / "tokenizer.json")
    original = Tokenizer.from_str(json.dumps(doc))
    tc = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    gen = read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    specials = {k: token_str(tc.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    specials = {k: v for k, v in specials.items() if v is not None}
    ids = {k: original.token_to_id(v) for k, v in specials.items()}
    bos = ids.get("bos_token", gen.get("bos_token_id"))
    eos = gen.get("eos_token_id", ids.get("eos_token"))
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    adds_bos = bos is not None and original.encode("a").ids[:1] == [bos]
    template = tc.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    meta = {
        "bos_token_id": bos, "eos_token_ids": eos_ids, "pad_token_id": ids.get("pad_token", gen.get("pad_token_id")),
        "special_tokens": specials, "chat_template": template,
        "add_bos_token": bool(tc.get("add_bos_token", adds_bos)),
    }
    return json.dumps(strip_bos_template(doc), ensure_ascii=False), meta


def folder_digest(folder: Path) -> str:
    """sha256 over config.json and the weight files, in name order."""
    h = hashlib.sha256()
    for f in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _model_type(folder: Path):
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None  # read_config reports the unreadable file


def read_hf_folder(folder) -> SourceModel:
    """An HF folder of a family of edge_runtime.spec as a SourceModel (fp32); others through optimum."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UnsupportedModelError(f"{folder}: not a Hugging Face model folder (no config.json)")
    if not supported(_model_type(folder)):
        # Architectures the graph builder does not know go through optimum's exporter (graph optimum-kv-v1).
        return read_fallback_source(folder)
    cfg = read_config(folder)
    tensors = read_tensors(folder, cfg)
    tok_json, meta = read_tokenizer(folder)
    origin = {"format": "hf", "path": str(folder), "sha256": folder_digest(folder)}
    return SourceModel(cfg, tensors, tok_json, meta, origin, hf_dir=folder)


def tokenizer_for_hf(source: SourceModel) -> str:
    """tokenizer.json for transformers: BOS prepended by the post-processor when add_bos_token is set."""
    doc = json.loads(source.tokenizer_json)
    meta = source.tokenizer_meta
    if meta.get("add_bos_token") and meta.get("bos_token_id") is not None:
        bos = meta["special_tokens"]["bos_token"]
        template = {"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bos: {"id": bos, "ids": [meta["bos_token_id"]], "tokens": [bos]}}}
        post = doc.get("post_processor")
        doc["post_processor"] = {"type": "Sequence", "processors": [p for p in (post, template) if p]}
    return json.dumps(doc, ensure_ascii=False)


def tokenizer_config(source: SourceModel) -> dict:
    meta = source.tokenizer_meta
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **meta["special_tokens"],
        "chat_template": meta.get("chat_template"),
        "add_bos_token": bool(meta.get("add_bos_token")),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": source.config.max_position_embeddings,
    }


def generation_config(source: SourceModel) -> dict:
    meta = source.tokenizer_meta
    eos = list(meta.get("eos_token_ids") or [])
    return {"bos_token_id": meta.get("bos_token_id"), "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
            "pad_token_id": meta.get("pad_token_id"), "do_sample": False}


def save_hf_folder(source: SourceModel, out_dir) -> Path:
    """Write `source` as a float32 HF folder that transformers / optimum load with from_pretrained."""
    from safetensors.numpy import save_file

    from ..quality.reference import hf_config_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = spec_for(source.config).tensor_names()
    save_file({n: np.ascontiguousarray(source.tensors[n], dtype=np.float32) for n in names},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    files = {
        "config.json": hf_config_dict(source.config, source.tokenizer_meta),
        "tokenizer_config.json": tokenizer_config(source),
        "generation_config.json": generation_config(source),
    }
    for name, doc in files.items():
        (out / name).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "tokenizer.json").write_text(tokenizer_for_hf(source), encoding="utf-8")
    return out


def any_model_config(hf_dir: Path) -> ModelConfig:
    """ModelConfig from any transformers config (their attribute maps give GPT-2's n_embd as hidden_size)."""
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except (KeyError, ValueError, OSError) as e:
        kind = _model_type(Path(hf_dir))
        raise UnsupportedModelError(
            f"{hf_dir}: unsupported architecture {kind!r}: neither our graph builder nor transformers/optimum "
            f"know it ({type(e).__name__})") from None
    heads = c.num_attention_heads
    return ModelConfig(
        model_type=c.model_type,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        rms_norm_eps=float(getattr(c, "rms_norm_eps", None) or getattr(c, "layer_norm_epsilon", 1e-5)),
        rope_theta=float(getattr(c, "rope_theta", None) or 10000.0),
        max_position_embeddings=int(getattr(c, "max_position_embeddings", 2048)),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
    )


def read_fallback_source(folder):
    """A HF folder of an architecture of no family of edge_runtime.spec as a SourceModel: config, tokenizer and the
    folder itself (no tensors: optimum reads the weights)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UnsupportedModelError(f"{folder}: not a Hugging Face model folder (no config.json)")
    tok_json, meta = read_tokenizer(folder)
    origin = {"format": "hf", "path": str(folder), "sha256": folder_digest(folder), "exporter": "optimum"}
    return SourceModel(any_model_config(folder), {}, tok_json, meta, origin, hf_dir=folder)
