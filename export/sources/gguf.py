"""GGUF reader: llama.cpp names, layouts and quant blocks -> a SourceModel in Hugging Face layout (fp32).

Tensor names, the Q/K permutation and the stored norm offset come from the family's DecoderSpec
(edge_runtime.spec); quantization blocks are read by export.sources.gguf_blocks.

Usage check on the real model (greedy answer of the float reference, must be coherent English):
    .venv/bin/python -m export.sources.gguf cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np

from edge_runtime.errors import UnsupportedModelError
from edge_runtime.format.config import ModelConfig
from edge_runtime.format.verification import sha256_file
from edge_runtime.spec import spec_for
from edge_runtime.spec.base import GGUF_GLOBAL, GGUF_LLAMA_BLOCK

from .gguf_blocks import GGUF_TYPES, GGUFBlocks, split_blocks
from .source import SourceModel, check_tensors

# GGUF general.architecture -> HF model_type (each spec's gguf_arch; its gguf_block names the block tensors).
# llama.cpp stores Mistral 7B-style models as "llama".
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}
# Gemma 3 facts llama.cpp's loader fixes instead of reading them (llama-model.cpp, LLM_ARCH_GEMMA3): the local
# (sliding-window) layers' rope base and one global layer in every six; these are HF Gemma3TextConfig's
# defaults too.
GEMMA3_ROPE_LOCAL_BASE = 10000.0
GEMMA3_GLOBAL_PERIOD = 6
BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str, block_names: dict = GGUF_LLAMA_BLOCK) -> str:
    """llama.cpp tensor name -> HF name (blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight);
    block_names: the family's DecoderSpec.gguf_block."""
    if gguf_name in GGUF_GLOBAL:
        return GGUF_GLOBAL[gguf_name]
    m = BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in block_names:
        raise UnsupportedModelError(f"GGUF tensor {gguf_name} has no Hugging Face equivalent")
    return f"model.layers.{m.group(1)}.{block_names[m.group(2)]}.{m.group(3)}"


def unpermute_order(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes convert_hf_to_gguf.py's permute(w, n_head) on a [rows, ...] Q or K weight.

    llama.cpp reshapes rows as (n_head, 2, head_dim/2) and swaps the last two axes so that rotary pairs
    (i, i + head_dim/2) sit next to each other; HF (rotate_half) keeps the halves apart.
    """
    half = rows // n_head // 2
    permuted = np.arange(rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(rows)
    return np.argsort(permuted)  # [rows]: HF row r lives at GGUF row order[r]


def read_blocks(data: np.ndarray, qtype) -> GGUFBlocks | None:
    """Raw bytes [N, K/block * type_size] of a type in GGUF_TYPES -> its sub-block scales, offsets and codes;
    None for other types (float, or quantizations the bundle cannot hold exactly)."""
    kind = qtype.name.lower()
    return split_blocks(kind, data) if kind in GGUF_TYPES else None


def float32_decimal(x: float) -> float:
    """GGUF stores floats as float32: 1e-5 comes back 9.9999997e-06; take its shortest decimal (1e-05)."""
    return float(str(np.float32(x)))


def config_dict(fields: dict, arch: str, n_vocab: int, tied: bool) -> dict:
    """The model's Hugging Face config.json keys from the {arch}.* metadata keys."""
    def get(key, default=None):
        f = fields.get(f"{arch}.{key}")
        return default if f is None else f.contents()

    n_head = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    if get("rope.scaling.type") not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling '{get('rope.scaling.type')}' is not supported")
    cfg = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": int(get("vocab_size", n_vocab)),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": int(get("attention.key_length", hidden // n_head)),
        "rms_norm_eps": float32_decimal(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float32_decimal(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": tied,
        "attention_bias": arch == "qwen2",
    }
    if arch == "gemma3":
        cfg.update(gemma3_config(get, cfg))
    return cfg


def gemma3_config(get, cfg: dict) -> dict:
    """Gemma 3's own keys: sliding window, which layers are global, their rope bases, the query scale."""
    period = int(get("attention.sliding_window_pattern", GEMMA3_GLOBAL_PERIOD))
    layer_types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                   for i in range(cfg["num_hidden_layers"])]
    return {
        "sliding_window": int(get("attention.sliding_window")),
        "sliding_window_pattern": period,
        "layer_types": layer_types,
        "rope_local_base_freq": GEMMA3_ROPE_LOCAL_BASE,
        "query_pre_attn_scalar": cfg["head_dim"],  # llama.cpp scales queries by 1/sqrt(head_dim) (below 27B)
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": get("final_logit_softcapping"),
        "attn_logit_softcapping": get("attn_logit_softcapping"),
    }


def read_config(fields: dict, arch: str, n_vocab: int, tied: bool) -> ModelConfig:
    """ModelConfig from the {arch}.* metadata keys."""
    return ModelConfig.from_dict(config_dict(fields, arch, n_vocab, tied))


def read_tensor(t) -> tuple[np.ndarray, GGUFBlocks | None]:
    """(float32 [rows, cols] or [n], blocks or None) for one ReaderTensor."""
    from gguf.quants import dequantize

    blocks = read_blocks(t.data, t.tensor_type)
    if blocks is not None:
        return blocks.dequantize(), blocks
    try:
        w = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise UnsupportedModelError(f"GGUF tensor {t.name} has unsupported type {t.tensor_type.name}") from None
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
    return np.array(w, dtype=np.float32).reshape(shape), None  # a copy: t.data is a read-only memmap view


def unpermute_qk(cfg: ModelConfig, tensors: dict, blocks: dict) -> None:
    """Put Q and K rows (weights, biases, quant blocks) back in HF order, in place."""
    for i in range(cfg.num_hidden_layers):
        for proj, n_head in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)):
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.self_attn.{proj}.{kind}"
                if name not in tensors:
                    continue
                order = unpermute_order(tensors[name].shape[0], n_head)
                tensors[name] = np.ascontiguousarray(tensors[name][order])
                if name in blocks:
                    blocks[name] = blocks[name].take_rows(order)


def open_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path, "r")
    except (ValueError, OSError, KeyError) as e:
        raise UnsupportedModelError(f"cannot read GGUF {path}: {e}") from None


def read_gguf(path) -> SourceModel:
    """Load every tensor of a GGUF (Llama family, Gemma 3), dequantized to fp32 in HF names/layouts, its
    quantization blocks, and its tokenizer."""
    from .gguf_tokenizer import tokenizer_from_gguf

    path = Path(path)
    reader = open_reader(path)
    fields = reader.fields
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"GGUF architecture '{arch}' is not supported (know {sorted(ARCHITECTURES)})")
    tokenizer_json, meta = tokenizer_from_gguf(fields)
    n_vocab = len(fields["tokenizer.ggml.tokens"].data)
    tied = "output.weight" not in {t.name for t in reader.tensors}
    spec = spec_for(read_config(fields, arch, n_vocab, tied=tied))
    cfg = spec.config
    tensors, blocks = {}, {}
    for t in reader.tensors:
        name = hf_name(t.name, spec.gguf_block)
        tensors[name], b = read_tensor(t)
        if b is not None:
            blocks[name] = b
    if spec.gguf_permuted_qk:
        unpermute_qk(cfg, tensors, blocks)
    for name in spec.norm_names():  # llama.cpp stores (offset + weight), HF the weight (Gemma: offset 1)
        if spec.norm_offset:
            tensors[name] = tensors[name] - np.float32(spec.norm_offset)
    check_tensors(cfg, tensors, str(path))
    origin = {"format": "gguf", "path": str(path), "sha256": sha256_file(path)}
    return SourceModel(cfg, tensors, tokenizer_json, meta, origin, gguf_blocks=blocks)


def main(argv: list[str]) -> None:
    """Load a GGUF, report the time, and print the float reference's greedy answer to a chat prompt."""
    from tokenizers import Tokenizer

    from ..quality.reference import FloatReference
    from .source import render_chat

    t0 = time.perf_counter()
    src = read_gguf(argv[0])
    print(f"load+dequantize: {time.perf_counter() - t0:.2f} s ({len(src.tensors)} tensors)")
    tok = Tokenizer.from_str(src.tokenizer_json)
    prompt = argv[1] if len(argv) > 1 else "What is the capital of France?"
    ids = tok.encode(render_chat(src.tokenizer_meta, prompt), add_special_tokens=False).ids
    t0 = time.perf_counter()
    ref = FloatReference(src)
    t1 = time.perf_counter()
    out = ref.greedy(ids, 16, eos_ids=src.tokenizer_meta["eos_token_ids"])
    print(f"float reference build: {t1 - t0:.2f} s, greedy 16 tokens: {time.perf_counter() - t1:.2f} s")
    print(repr(tok.decode(out)))


if __name__ == "__main__":
    main(sys.argv[1:])
