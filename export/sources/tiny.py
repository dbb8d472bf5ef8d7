"""Tiny seeded random-init Llama / Qwen2 / Mistral / Gemma 3 models with a small trained byte-level BPE, for tests."""
from __future__ import annotations

import functools
import hashlib
import zlib

import numpy as np

from edge_runtime.errors import UnsupportedModelError
from edge_runtime.format.config import ModelConfig
from edge_runtime.spec import spec_for

from .source import SourceModel, check_tensors, expected_shapes

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
VOCAB_TARGET = 384
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma 3: two sliding-window layers then a global one, a window shorter than the tests' sequences (so it
# matters), head_dim * heads != hidden and a query_pre_attn_scalar != head_dim (so both scales are exercised)
GEMMA3 = {"model_type": "gemma3_text", "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
          "rms_norm_eps": 1e-6, "sliding_window": 8, "num_hidden_layers": 3, "num_key_value_heads": 1,
          "head_dim": 32, "query_pre_attn_scalar": 24.0,
          "layer_types": ("sliding_attention", "sliding_attention", "full_attention")}

# arch -> (ModelConfig fields beyond the shared shape, tied by default, tokenizer conventions of the family)
ARCHS = {
    "llama": ({"rope_theta": 10000.0, "rms_norm_eps": 1e-5}, True,
              {"bos_token_id": 1, "pad_token_id": 2, "add_bos_token": False}),
    "qwen2": ({"rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "attention_bias": True}, True,
              {"bos_token_id": None, "pad_token_id": 0, "add_bos_token": False}),
    "mistral": ({"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "sliding_window": 512}, False,
                {"bos_token_id": 1, "pad_token_id": 2, "add_bos_token": True}),
    "gemma3": (GEMMA3, True, {"bos_token_id": 1, "pad_token_id": 0, "add_bos_token": True}),
}
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512}


def training_text() -> str:
    """A few KB of English (CPython's pydoc topics ship with every interpreter)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in ("assignment", "if", "while", "for", "try"))


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_json() -> str:
    """A byte-level BPE of ~VOCAB_TARGET tokens trained on training_text(); deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_TARGET, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([training_text()], trainer=trainer)
    return tok.to_str()


def tiny_meta(conventions: dict) -> dict:
    bos, pad = conventions["bos_token_id"], conventions["pad_token_id"]
    specials = {"eos_token": SPECIAL_TOKENS[2], "pad_token": SPECIAL_TOKENS[pad]}
    if bos is not None:
        specials["bos_token"] = SPECIAL_TOKENS[bos]
    return {"bos_token_id": bos, "eos_token_ids": [2], "pad_token_id": pad, "special_tokens": specials,
            "chat_template": CHATML, "add_bos_token": conventions["add_bos_token"]}


def random_tensors(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded weights scaled so activations stay O(1) and logits are decisive (std ~ a few units)."""
    rng = np.random.default_rng(seed)
    out = {}
    offset = spec_for(cfg).norm_offset  # Gemma's norms scale by (1 + weight)
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            w = 1.0 - offset + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            w = 0.5 * rng.standard_normal(shape)
        else:  # linear [out, in]
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = w.astype(np.float32)
    return out


def parse_spec(spec: str) -> tuple[str, bool]:
    """'llama' / 'qwen2-untied' / 'mistral-tied' -> (arch, tied)."""
    arch, _, tie = spec.partition("-")
    if arch not in ARCHS or tie not in ("", "tied", "untied"):
        raise UnsupportedModelError(f"unknown tiny model 'tiny:{spec}' "
                                    "(use tiny:llama|qwen2|mistral|gemma3[-tied|-untied])")
    return arch, ARCHS[arch][1] if tie == "" else tie == "tied"


def tiny_source(spec: str) -> SourceModel:
    """The tiny model named by spec (see parse_spec); weights seeded by the spec text."""
    from tokenizers import Tokenizer

    arch, tied = parse_spec(spec)
    fields, _, conventions = ARCHS[arch]
    tok_json = tiny_tokenizer_json()
    vocab = Tokenizer.from_str(tok_json).get_vocab_size()
    cfg = ModelConfig(**{"model_type": arch, "vocab_size": vocab, "tie_word_embeddings": tied, **SHAPE, **fields})
    tensors = random_tensors(cfg, seed=zlib.crc32(spec.encode()))
    check_tensors(cfg, tensors, f"tiny:{spec}")
    digest = hashlib.sha256()
    for name in spec_for(cfg).tensor_names():
        digest.update(tensors[name].tobytes())
    origin = {"format": "tiny", "path": f"tiny:{spec}", "sha256": digest.hexdigest()}
    return SourceModel(cfg, tensors, tok_json, tiny_meta(conventions), origin)
