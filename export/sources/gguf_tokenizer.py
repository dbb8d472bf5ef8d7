"""A Hugging Face tokenizer.json rebuilt from a GGUF's tokenizer.ggml.* metadata: byte-level BPE ("gpt2") or
SentencePiece-style BPE over scored pieces ("llama": Gemma, Llama 2, Mistral)."""
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


def tokenizer_meta(fields: dict, tokens: list[str], pre: str, add_bos_default: bool = False) -> dict:
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
        # Without the key llama.cpp prepends BOS for SentencePiece and Llama-3 style vocabularies.
        "add_bos_token": bool(field(fields, "tokenizer.ggml.add_bos_token", add_bos_default or pre in IGNORE_MERGES)),
    }


SPACE = "\u2581"  # SentencePiece's visible space


def spm_merges(tokens: list[str], types: list[int], scores: list[float]) -> list:
    """Every pair of pieces whose concatenation is a normal piece, highest-scoring concatenation first.

    llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm) starts from characters and repeatedly joins the
    adjacent pair whose concatenation is the best-scoring piece in the vocabulary, leftmost on ties. A BPE over
    these merges, ranked by that score, makes the same choices (scores of normal pieces are distinct). Control
    and user-defined pieces are matched in the raw text before the model, so no merge needs to produce them.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []  # (-score of the merged piece, its id, left length, left, right)
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind != NORMAL or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                found.append((-scores[i], i, cut, left, right))
    found.sort()
    if any(" " in left or " " in right for *_, left, right in found):
        return [[left, right] for *_, left, right in found]
    # "left right" strings: the same file for `tokenizers`, and about a third less memory to parse
    return [f"{left} {right}" for *_, left, right in found]


def spm_tokenizer_json(fields: dict, tokens: list[str], types: list[int]) -> str:
    """tokenizer.json for a "llama" (SentencePiece) vocabulary: spaces become U+2581, BPE with the merges of
    spm_merges, unknown characters as their UTF-8 bytes (<0xXX> pieces); control and user-defined pieces are
    added tokens matched verbatim first, as llama.cpp does."""
    scores = [float(s) for s in field(fields, "tokenizer.ggml.scores", [0.0] * len(tokens))]
    unk = field(fields, "tokenizer.ggml.unknown_token_id")
    prefix = bool(field(fields, "tokenizer.ggml.add_space_prefix", True))
    replace_space = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    normalizer = replace_space
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if prefix:  # llama.cpp prepends the space to the text, and drops it again when decoding
        normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, replace_space]}
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    model = bpe_model(tokens, [], ignore_merges=False)
    model.update(byte_fallback=True, fuse_unk=True, merges=spm_merges(tokens, types, scores),
                 unk_token=None if unk is None else tokens[int(unk)])
    doc = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added_tokens(tokens, types),
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model,
    }
    return json.dumps(doc, ensure_ascii=False)


def tokenizer_from_gguf(fields: dict) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_meta) from a GGUFReader's fields."""
    model = field(fields, "tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise UnsupportedModelError(f"GGUF tokenizer model '{model}' is not supported (gpt2 byte-level BPE, "
                                    "llama SentencePiece)")
    tokens = field(fields, "tokenizer.ggml.tokens")
    types = [int(t) for t in field(fields, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    if model == "llama":
        meta = tokenizer_meta(fields, tokens, "llama", add_bos_default=True)
        return spm_tokenizer_json(fields, tokens, types), meta
    merges = field(fields, "tokenizer.ggml.merges", [])
    pre = field(fields, "tokenizer.ggml.pre", "gpt-2")
    return tokenizer_json(tokens, types, merges, pre), tokenizer_meta(fields, tokens, pre)
