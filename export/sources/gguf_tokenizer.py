"""A Hugging Face tokenizer.json (byte-level BPE) rebuilt from a GGUF's tokenizer.ggml.* metadata."""
from __future__ import annotations

import json

from edge_runtime.errors import UnsupportedModelError

# llama.cpp llama_token_type values (gguf TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
BYTELEVEL_NO_REGEX = dict(GPT2_BYTELEVEL, use_regex=False)
# The split regexes of llama.cpp's llama-vocab.cpp, as the models' own tokenizer.json spell them.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def sequence(*steps: dict) -> dict:
    return {"type": "Sequence", "pretokenizers": list(steps)}


DIGITS_THEN_GPT2 = sequence({"type": "Digits", "individual_digits": True}, GPT2_BYTELEVEL)
# tokenizer.ggml.pre -> (normalizer, pre_tokenizer). SmolLM2's own tokenizer.json splits single digits first,
# which is what llama.cpp's "\p{N}" first regex does for smollm / starcoder.
PRE_TOKENIZERS = {
    "smollm": (None, DIGITS_THEN_GPT2),
    "starcoder": (None, DIGITS_THEN_GPT2),
    "refact": (None, DIGITS_THEN_GPT2),
    "codeshell": (None, DIGITS_THEN_GPT2),
    "gpt-2": (None, GPT2_BYTELEVEL),
    "gpt2": (None, GPT2_BYTELEVEL),
    "mpt": (None, GPT2_BYTELEVEL),
    "olmo": (None, GPT2_BYTELEVEL),
    "llama-bpe": (None, sequence(split(LLAMA3_REGEX), BYTELEVEL_NO_REGEX)),
    "llama3": (None, sequence(split(LLAMA3_REGEX), BYTELEVEL_NO_REGEX)),
    "dbrx": (None, sequence(split(LLAMA3_REGEX), BYTELEVEL_NO_REGEX)),
    "smaug-bpe": (None, sequence(split(LLAMA3_REGEX), BYTELEVEL_NO_REGEX)),
    "qwen2": ({"type": "NFC"}, sequence(split(QWEN2_REGEX), BYTELEVEL_NO_REGEX)),
    "stablelm2": (None, sequence(split(QWEN2_REGEX), BYTELEVEL_NO_REGEX)),
}


def field(fields: dict, key: str, default=None):
    f = fields.get(key)
    return default if f is None else f.contents()


def added_tokens(tokens: list[str], types: list[int]) -> list[dict]:
    """Control tokens become special added tokens; user-defined ones plain added tokens (matched verbatim)."""
    out = []
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, USER_DEFINED):
            out.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": kind == CONTROL})
    return out


# Pre-tokenizers whose words found whole in the vocabulary skip the merges (llama.cpp tokenizer_ignore_merges).
IGNORE_MERGES = ("llama-bpe", "llama3")


def bpe_model(tokens: list[str], merges: list[str], ignore_merges: bool) -> dict:
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a repeated string keeps its first id, as llama.cpp's token_to_id does
    return {
        "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
        "vocab": vocab, "merges": [m.split(" ", 1) for m in merges],
    }


def tokenizer_json(tokens: list[str], types: list[int], merges: list[str], pre: str) -> str:
    """tokenizer.json text for a byte-level BPE vocabulary with llama.cpp pre-tokenizer `pre`."""
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedModelError(f"GGUF pre-tokenizer '{pre}' is not supported (know {sorted(PRE_TOKENIZERS)})")
    normalizer, pre_tokenizer = PRE_TOKENIZERS[pre]
    doc = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added_tokens(tokens, types),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": dict(GPT2_BYTELEVEL, trim_offsets=False),
        "decoder": dict(GPT2_BYTELEVEL, add_prefix_space=True),
        "model": bpe_model(tokens, merges, ignore_merges=pre in IGNORE_MERGES),
    }
    return json.dumps(doc, ensure_ascii=False)


def tokenizer_meta(fields: dict, tokens: list[str], pre: str) -> dict:
    """bos / eos / pad ids, their strings, chat template and add_bos_token, from tokenizer.ggml.* keys."""
    def token_id(key):
        v = field(fields, f"tokenizer.ggml.{key}_token_id")
        return None if v is None else int(v)

    bos, eos, pad, unk = token_id("bos"), token_id("eos"), token_id("padding"), token_id("unknown")
    eos_ids = [i for i in (eos, token_id("eot"), token_id("eom")) if i is not None]
    specials = {name: tokens[i] for name, i in
                (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)) if i is not None}
    return {
        "bos_token_id": bos,
        "eos_token_ids": list(dict.fromkeys(eos_ids)),
        "pad_token_id": pad,
        "special_tokens": specials,
        "chat_template": field(fields, "tokenizer.chat_template"),
        # Without the key llama.cpp prepends BOS only for Llama-3 style vocabularies.
        "add_bos_token": bool(field(fields, "tokenizer.ggml.add_bos_token", pre in IGNORE_MERGES)),
    }


def tokenizer_from_gguf(fields: dict) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_meta) from a GGUFReader's fields."""
    model = field(fields, "tokenizer.ggml.model")
    if model != "gpt2":
        raise UnsupportedModelError(f"GGUF tokenizer model '{model}' is not supported (only gpt2 byte-level BPE)")
    tokens = field(fields, "tokenizer.ggml.tokens")
    types = [int(t) for t in field(fields, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    merges = field(fields, "tokenizer.ggml.merges", [])
    pre = field(fields, "tokenizer.ggml.pre", "gpt-2")
    return tokenizer_json(tokens, types, merges, pre), tokenizer_meta(fields, tokens, pre)
