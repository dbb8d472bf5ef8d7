"""Text <-> token ids for a bundle: the compact pure-Python BPE by default (the `tokenizers` library on request);
plus a streaming decoder that never emits half a UTF-8 character."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import BundleError, EdgeError

REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 byte sequence produces
# A character is at most 4 bytes; this many ids still ending in U+FFFD means invalid bytes, not a character
# in progress, so they are let through rather than held back (and hiding the stream) until the end.
MAX_HELD_IDS = 16


class Tokenizer:
    """One interface over `tokenizers.Tokenizer` and `edge_runtime.tokenizer.bpe.PurePythonTokenizer`.

    Special tokens from the manifest are applied here, not by the tokenizer's post-processor, so that both
    implementations give the same ids: BOS is prepended to raw text when the manifest says `add_bos_token`,
    never to a rendered chat template (the template writes its own special tokens).
    """

    def __init__(self, impl, kind: str, bos_token_id: int | None = None, eos_token_ids: Sequence[int] = (),
                 add_bos_token: bool = False):
        self._impl = impl
        self.kind = kind  # "tokenizers" | "python"
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.add_bos_token = bool(add_bos_token and bos_token_id is not None)

    @classmethod
    def from_json(cls, json_str: str | bytes, impl: str = "auto", merge_ids=None, **special) -> Tokenizer:
        """impl: "auto", "python" or "tokenizers"; the environment variable EDGE_RUNTIME_TOKENIZER overrides "auto".

        "auto" is the pure-Python BPE: it gives the same ids and text (tests hold it to `tokenizers` on the
        held-out corpus and a unicode fuzz) in ~12 MB resident against ~45 MB for the Rust library, and a
        prompt of a few hundred tokens encodes in milliseconds either way. `tokenizers` is faster on bulk text.
        merge_ids: the merges as ids [n, 3] (bpe.merge_id_rows), which the pure-Python BPE builds from.
        """
        impl = resolve_impl(impl)
        if impl == "tokenizers":
            try:
                import tokenizers
            except ImportError:
                raise EdgeError("the tokenizers package is not installed") from None
            try:
                text = json_str.decode("utf-8") if isinstance(json_str, bytes) else json_str
                return cls(tokenizers.Tokenizer.from_str(text), "tokenizers", **special)
            except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception on a malformed file
                raise BundleError(f"cannot read tokenizer.json: {e}") from None
        from .bpe import PurePythonTokenizer

        try:
            return cls(PurePythonTokenizer.from_json(json_str, merge_ids), "python", **special)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise BundleError(f"cannot read tokenizer.json: {type(e).__name__}: {e}") from None

    @classmethod
    def from_file(cls, path, impl: str = "auto", merge_ids=None, **special) -> Tokenizer:
        """from_json of the file's bytes: the decoded text is then a temporary of the JSON parse, not held
        beside the parsed tree (Gemma 3's tokenizer.json decodes to 52 MB of text)."""
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise BundleError(f"cannot read the tokenizer {path} ({e})") from None
        return cls.from_json(raw, impl, merge_ids, **special)

    @classmethod
    def from_bundle(cls, bundle, impl: str = "auto") -> Tokenizer:
        """The bundle's tokenizer; the pure-Python one builds its merges from the bundle's merges file when the
        manifest names one (tokenizer.merges_file)."""
        meta = bundle.manifest.get("tokenizer") or {}
        impl = resolve_impl(impl)
        merges_file = meta.get("merges_file")
        merge_ids = read_merge_ids(bundle.path(merges_file)) if merges_file and impl == "python" else None
        return cls.from_file(bundle.path(meta.get("file", "tokenizer.json")), impl, merge_ids,
                             bos_token_id=meta.get("bos_token_id"), eos_token_ids=meta.get("eos_token_ids") or (),
                             add_bos_token=meta.get("add_bos_token", False))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. <|im_start|>) map to their ids."""
        ids = self._impl.encode(text, add_special_tokens=False)
        ids = list(ids.ids) if self.kind == "tokenizers" else list(ids)
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._impl.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._impl.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._impl.id_to_token(token_id)


def resolve_impl(impl: str) -> str:
    """"tokenizers" or "python" for an implementation name ("auto": EDGE_RUNTIME_TOKENIZER, else "python")."""
    if impl == "auto":
        impl = os.environ.get("EDGE_RUNTIME_TOKENIZER", "auto")
    if impl not in ("auto", "python", "tokenizers"):
        raise EdgeError(f"unknown tokenizer implementation {impl!r} (auto, tokenizers, python)")
    return "python" if impl == "auto" else impl


def read_merge_ids(path):
    """A tokenizer merges file: little-endian int32 (left, right, merged) ids per merge in rank order, as
    [n, 3]; BundleError when its size is not whole rows."""
    import numpy as np

    try:
        flat = np.fromfile(path, dtype="<i4")
    except OSError as e:
        raise BundleError(f"cannot read the tokenizer merges {path} ({e})") from None
    if flat.size % 3:
        raise BundleError(f"tokenizer merges {path}: {flat.size * 4} bytes is not whole (left, right, merged) rows")
    return flat.reshape(-1, 3)


class StreamDecoder:
    """Incremental detokenization: push ids one at a time, get back only text that is final.

    Decodes a short window (from `prefix` to the end) and returns what the newest ids added to it; text ending
    in U+FFFD is held back because the next id may complete the UTF-8 character (for up to MAX_HELD_IDS ids).
    Decoding a window rather than single tokens keeps decoders that strip or merge across tokens
    (SentencePiece spaces) right.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0    # ids up to here have been emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        waiting = len(self.ids) - self.read
        if len(text) <= len(done) or (text.endswith(REPLACEMENT) and waiting < MAX_HELD_IDS):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is still held back (possibly with replacement characters): call once at the end."""
        if self.read == len(self.ids):
            return ""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
