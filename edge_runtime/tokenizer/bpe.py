"""Pure-Python reader of a bundle's tokenizer.json (byte-level BPE) for when `tokenizers` cannot be imported.

Gives the same ids and decoded text as `tokenizers` 0.22 for what Llama-family and SentencePiece-style (Gemma)
files use: model BPE (with byte fallback), normalizer null/NFC/NFD/NFKC/NFKD/Replace/Prepend/Sequence,
pre-tokenizers ByteLevel/Split/Digits/Sequence (see `pretokenize.py`), added tokens, post-processor
TemplateProcessing/ByteLevel/Sequence, decoder ByteLevel/Replace/ByteFallback/Fuse/Strip/Sequence. Anything
else raises UnsupportedModelError when the file is loaded, never later.
"""
from __future__ import annotations

import array
import heapq
import json
import re
import unicodedata
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Callable

from ..errors import UnsupportedModelError
from .pretokenize import CHAR_BYTES, ONIG_LETTER, WHITE_SPACE, build_pre_tokenizer, class_body, parse_ranges

CACHE_SIZE = 50_000  # words; like `tokenizers`, a full cache stops taking new words (no eviction)
CACHE_MAX_WORD = 256  # longer words are not cached (tokenizers' bpe MAX_LENGTH): without a pre-tokenizer a
# "word" is a whole text piece


class TokenTable:
    """id -> token string, stored as one UTF-8 blob and its offsets rather than 49k Python strings (~0.6 MB
    instead of ~6 MB resident: the runtime's memory budget counts every MB)."""

    def __init__(self, tokens: list[str | None]):
        encoded = [(t or "").encode("utf-8") for t in tokens]
        self.present = bytearray(t is not None for t in tokens)
        self.blob = b"".join(encoded)
        self.offsets = array.array("q", [0]) * (len(encoded) + 1)
        pos = 0
        for i, e in enumerate(encoded):
            pos += len(e)
            self.offsets[i + 1] = pos

    def __len__(self) -> int:
        return len(self.present)

    def get(self, token_id: int) -> str | None:
        if not 0 <= token_id < len(self.present) or not self.present[token_id]:
            return None
        return self.blob[self.offsets[token_id]:self.offsets[token_id + 1]].decode("utf-8")

    def to_dict(self) -> dict[str, int]:
        """token -> id, built on demand (lookups by string are rare at run time); a repeated string keeps its
        last id, as the JSON object it came from did."""
        return {self.get(i): i for i in range(len(self)) if self.present[i]}


class MergeTable:
    """(left id, right id) -> (rank, merged id): every pair's key left << shift | right in one sorted int64
    array, its value rank << shift | merged at the same index, found by binary search (bisect, in C).

    16 bytes a merge (Gemma 3's 513k merges: 8 MB), built with one NumPy sort; a dict of tuples costs ~300
    bytes a merge in Python objects, and an open-addressing hash at load factor 1/2 twice these bytes.
    """

    def __init__(self, shift: int, keys: array.array, values: array.array):
        self.shift = shift
        self.keys, self.values = keys, values  # int64 [n] each, keys ascending and unique
        self._n, self._low = len(keys), (1 << shift) - 1

    @classmethod
    def from_arrays(cls, shift: int, left, right, merged) -> MergeTable:
        """The table of merges ranked by position; a repeated pair keeps its last rank."""
        import numpy as np

        keys = np.asarray(left, np.int64) << shift | np.asarray(right, np.int64)                 # [n]
        values = np.arange(len(keys), dtype=np.int64) << shift | np.asarray(merged, np.int64)     # [n]
        unique, first = np.unique(keys[::-1], return_index=True)                                # ascending
        last = len(keys) - 1 - first                                                            # last rank per pair
        return cls(shift, array.array("q", unique.tobytes()), array.array("q", values[last].tobytes()))

    def __len__(self) -> int:
        return self._n

    def get(self, left: int, right: int) -> tuple[int, int] | None:
        key = left << self.shift | right
        i = bisect_left(self.keys, key)
        if i == self._n or self.keys[i] != key:
            return None
        v = self.values[i]
        return v >> self.shift, v & self._low


def merge_id_rows(vocab: dict[str, int], merges, prefix_len: int = 0):
    """The merges as ids, int32 [n, 3]: (left, right, merged) per merge in rank order, the merged token being
    left + right without its continuing-subword prefix (prefix_len characters)."""
    import numpy as np

    merges = merges if isinstance(merges, list) else list(merges)
    pairs = BpeModel.pairs(merges)
    get = vocab.get
    left = [get(a) for a, _ in pairs]
    right = [get(b) for _, b in pairs]
    merged = [get(a + b[prefix_len:]) for a, b in pairs]
    if None in left or None in right or None in merged:
        for merge, (a, b) in zip(merges, pairs):
            for token in (a, b, a + b[prefix_len:]):
                if token not in vocab:
                    raise UnsupportedModelError(f"tokenizer merge {merge!r} uses {token!r}, not in the vocab")
    return np.array([left, right, merged], np.int32).T                                # [n, 3]


def merge_table(merge_ids, size: int) -> MergeTable:
    """The MergeTable of [n, 3] merge ids over a vocabulary of `size` ids; ValueError for another shape or ids
    outside the vocabulary (a damaged bundle's merges file). A repeated pair keeps its last rank, as the Rust
    HashMap collect does."""
    import numpy as np

    ids = np.asarray(merge_ids)
    if ids.ndim != 2 or ids.shape[1] != 3:
        raise ValueError(f"tokenizer merge ids must be [n, 3], got shape {list(ids.shape)}")
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise ValueError(f"tokenizer merge ids fall outside the vocabulary of {size} ids")
    return MergeTable.from_arrays(max(1, size - 1).bit_length(), ids[:, 0], ids[:, 1], ids[:, 2])


class BpeModel:
    """The `model` section: vocab + ranked merges, merging one word at a time (tokenizers' models/bpe).

    The vocab dict is only needed while building; what stays is compact: the id -> token table, the merge
    table, and the few short tokens words start from (single characters, with the subword prefix/suffix).
    """

    def __init__(self, vocab: dict[str, int], merges: Iterable, unk_token: str | None = None,
                 continuing_subword_prefix: str | None = None, end_of_word_suffix: str | None = None,
                 fuse_unk: bool = False, byte_fallback: bool = False, ignore_merges: bool = False,
                 merge_ids=None):
        """merge_ids: the merges as ids, [n, 3] (left, right, merged) in rank order (merge_id_rows of the same
        vocab and merges, as a bundle's tokenizer merges file holds them): the table is built from them instead
        of looking every merge's strings up, which is most of a large vocabulary's load."""
        self.unk_token = unk_token
        self.prefix = continuing_subword_prefix
        self.suffix = end_of_word_suffix
        self.fuse_unk = fuse_unk
        self.byte_fallback = byte_fallback
        self.ignore_merges = ignore_merges
        size = max(vocab.values(), default=-1) + 1
        tokens: list[str | None] = [None] * size
        for token, token_id in vocab.items():
            tokens[token_id] = token
        self.tokens = TokenTable(tokens)
        if merge_ids is None:
            merge_ids = merge_id_rows(vocab, merges, len(self.prefix or ""))
        self.merges = merge_table(merge_ids, size)
        short = 1 + len(self.prefix or "") + len(self.suffix or "")
        # the short tokens a word starts from: characters (with the subword prefix/suffix), byte fallbacks, unk
        self.symbols = {t: i for t, i in vocab.items() if len(t) <= short or t.startswith("<0x") or t == unk_token}
        # ignore_merges looks whole words up, and two strings sharing an id cannot be rebuilt from the table:
        # only then is the full dict worth keeping
        shared_ids = len(vocab) != sum(self.tokens.present)
        self._vocab: dict[str, int] | None = dict(vocab) if ignore_merges or shared_ids else None
        self.cache: dict[str, tuple[int, ...]] = {}

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = self.tokens.to_dict()
        return self._vocab

    @classmethod
    def from_spec(cls, spec: dict, merge_ids=None) -> BpeModel:
        if spec.get("type", "BPE") != "BPE":
            raise UnsupportedModelError(f"tokenizer model {spec.get('type')!r} is not supported (only BPE)")
        if spec.get("dropout") not in (None, 0, 0.0):
            raise UnsupportedModelError("tokenizer BPE dropout is random; it is not supported")
        return cls(spec["vocab"], spec["merges"], spec.get("unk_token"),
                   spec.get("continuing_subword_prefix"), spec.get("end_of_word_suffix"),
                   bool(spec.get("fuse_unk")), bool(spec.get("byte_fallback")),
                   bool(spec.get("ignore_merges")), merge_ids)

    @staticmethod
    def pairs(merges: list) -> list:
        """(left, right) of every merge: "a b" strings (partitioned at their one space: a 262k vocabulary has
        half a million merges, and partition is the cheapest split) or [a, b] lists."""
        if all(isinstance(merge, str) for merge in merges):
            parts = [merge.partition(" ") for merge in merges]
            bad = next((r for r, (_, sep, b) in enumerate(parts) if not sep or " " in b), None)
            pairs = [(a, b) for a, _, b in parts]
        else:
            pairs = [merge.split(" ") if isinstance(merge, str) else list(merge) for merge in merges]
            bad = next((r for r, pair in enumerate(pairs) if len(pair) != 2), None)
        if bad is not None:
            raise UnsupportedModelError(f"tokenizer merge #{bad + 1} {merges[bad]!r} is not a pair")
        return pairs

    def token_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokens.get(token_id)

    def tokenize(self, word: str) -> tuple[int, ...]:
        if not word:
            return ()
        if self.ignore_merges and word in self.vocab:
            return (self.vocab[word],)
        ids = self.cache.get(word)
        if ids is None:
            ids = tuple(self._merge_all(self._initial_symbols(word)))
            if len(self.cache) < CACHE_SIZE and len(word) < CACHE_MAX_WORD:
                self.cache[word] = ids
        return ids

    def _initial_symbols(self, word: str) -> list[int]:
        """One symbol per char (BPE::merge_word), with byte fallback and (fused) unknowns."""
        out: list[int] = []
        unk: int | None = None  # a pending unk id, flushed before the next known char
        last = len(word) - 1
        for i, ch in enumerate(word):
            piece = ch
            if i and self.prefix:
                piece = self.prefix + piece
            if i == last and self.suffix:
                piece = piece + self.suffix
            known = self.symbols.get(piece)
            if known is not None:
                if unk is not None:
                    out.append(unk)
                    unk = None
                out.append(known)
                continue
            if self.byte_fallback:
                byte_ids = [self.symbols.get(f"<0x{b:02X}>") for b in piece.encode("utf-8")]
                if None not in byte_ids:
                    out.extend(byte_ids)  # a pending unk stays pending here, as in tokenizers
                    continue
            if self.unk_token is not None:
                unk_id = self.symbols.get(self.unk_token)
                if unk_id is None:
                    raise UnsupportedModelError(f"tokenizer unk_token {self.unk_token!r} is not in the vocab")
                if unk is not None and not self.fuse_unk:
                    out.append(unk)
                unk = unk_id
        if unk is not None:
            out.append(unk)
        return out

    def _merge_all(self, symbols: list[int]) -> list[int]:
        """Word::merge_all: apply the lowest-rank merge first (leftmost on ties) until none applies."""
        merges = self.merges
        n = len(symbols)
        nxt = list(range(1, n + 1))  # linked list over positions; a merged-away position is dead
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for pos in range(n - 1):
            hit = merges.get(symbols[pos], symbols[pos + 1])
            if hit is not None:
                heap.append((hit[0], pos, hit[1]))
        heapq.heapify(heap)
        while heap:
            _, pos, new_id = heapq.heappop(heap)
            right = nxt[pos]
            if not alive[pos] or right >= n:
                continue
            hit = merges.get(symbols[pos], symbols[right])
            if hit is None or hit[1] != new_id:  # stale entry: a neighbour changed since it was queued
                continue
            symbols[pos] = new_id
            alive[right] = False
            nxt[pos] = nxt[right]
            if nxt[pos] < n:
                prv[nxt[pos]] = pos
            if prv[pos] >= 0:
                hit = merges.get(symbols[prv[pos]], new_id)
                if hit is not None:
                    heapq.heappush(heap, (hit[0], prv[pos], hit[1]))
            if nxt[pos] < n:
                hit = merges.get(new_id, symbols[nxt[pos]])
                if hit is not None:
                    heapq.heappush(heap, (hit[0], pos, hit[1]))
        return [s for s, keep in zip(symbols, alive) if keep]


# --- Normalizers -----------------------------------------------------------------------------------
Normalizer = Callable[[str], str]


def build_normalizer(spec) -> Normalizer:
    """The `normalizer` entry (None = identity)."""
    if spec is None:
        return lambda text: text
    kind = spec.get("type")
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return unicode_form(kind)
    if kind == "Replace":
        old, new = _string_pattern(spec, "normalizer"), spec["content"]
        return lambda text: text.replace(old, new)
    if kind == "Prepend":
        prepend = spec["prepend"]
        return lambda text: prepend + text if text else text  # tokenizers leaves an empty text empty
    if kind == "Sequence":
        steps = [build_normalizer(s) for s in spec["normalizers"]]

        def run(text: str) -> str:
            for step in steps:
                text = step(text)
            return text

        return run
    raise UnsupportedModelError(f"tokenizer normalizer {kind!r} is not supported without `tokenizers`")


def _string_pattern(spec: dict, where: str) -> str:
    """The literal of a Replace's {"String": ...} pattern (regex patterns are not supported here)."""
    pattern = spec.get("pattern") or {}
    if "String" not in pattern:
        raise UnsupportedModelError(f"tokenizer {where} Replace with a {sorted(pattern)} pattern is not supported "
                                    "without `tokenizers`")
    return pattern["String"]


def unicode_form(form: str) -> Normalizer:
    """unicodedata.normalize(form) as `tokenizers` computes it.

    `tokenizers` normalizes with Unicode 9.0 tables (crate unicode-normalization-alignments), Python
    with its own newer ones. A character 9.0 lacks is inert there: a starter that neither decomposes,
    composes nor reorders. So the text is cut at each such character that newer tables would move,
    split or merge (NFC_BARRIER), and only the pieces between are normalized.
    """
    barrier = _barrier(form in ("NFKC", "NFKD"))

    def run(text: str) -> str:
        if barrier.search(text) is None:
            return unicodedata.normalize(form, text)
        parts = barrier.split(text)  # odd indices are the barrier chars themselves
        return "".join(p if i % 2 else unicodedata.normalize(form, p) for i, p in enumerate(parts))

    return run


@cache
def _barrier(compat: bool) -> re.Pattern[str]:
    ranges = parse_ranges(NFC_BARRIER + (K_BARRIER_EXTRA if compat else ""))
    return re.compile(f"([{class_body(ranges)}])")


# --- Added tokens ----------------------------------------------------------------------------------
_WHITE_SPACE = frozenset(chr(c) for lo, hi in parse_ranges(WHITE_SPACE) for c in range(lo, hi + 1))


def is_word_char(ch: str) -> bool:
    """Rust regex `\\w` (Alphabetic, M, Nd, Pc, Join_Control; Unicode 16), which single_word tests."""
    cat = unicodedata.category(ch)
    if cat[0] == "M" or cat in ("Nd", "Nl", "Pc") or ch in "\u200c\u200d":
        return True
    return _word_regex().match(ch) is not None


@cache
def _word_regex() -> re.Pattern[str]:
    return re.compile(f"[{class_body(sorted(parse_ranges(ONIG_LETTER) + parse_ranges(WORD_EXTRA)))}]")


class AddedToken:
    __slots__ = ("content", "id", "lstrip", "normalized", "rstrip", "single_word", "special")

    def __init__(self, token_id: int, spec: dict):
        self.id = token_id
        self.content = spec["content"]
        self.special = bool(spec.get("special", False))
        self.single_word = bool(spec.get("single_word", False))
        self.lstrip = bool(spec.get("lstrip", False))
        self.rstrip = bool(spec.get("rstrip", False))
        self.normalized = bool(spec.get("normalized", not self.special))


class AddedVocabulary:
    """Tokens matched in the text before pre-tokenization (tokenizer/added_vocabulary.rs)."""

    def __init__(self, specs: list[dict], vocab: Mapping[str, int], normalize: Normalizer):
        self.by_content: dict[str, AddedToken] = {}
        self.by_id: dict[int, AddedToken] = {}
        self.special: set = set()
        for spec in specs:
            self._add(spec, vocab)
        tokens = list(self.by_content.values())
        self.raw_matcher = self._matcher([t for t in tokens if not t.normalized], lambda s: s)
        self.normalized_matcher = self._matcher([t for t in tokens if t.normalized], normalize)

    def _add(self, spec: dict, vocab: Mapping[str, int]) -> None:
        content = spec["content"]
        if not content:
            return
        if spec.get("special"):
            self.special.add(content)
        # Ids as AddedVocabulary::add_tokens assigns them (equal to the file's ids in a sane file).
        token_id = self.by_content[content].id if content in self.by_content else vocab.get(content)
        if token_id is None:
            top = max(self.by_id, default=None)
            size = len(vocab)
            token_id = size if top is None or (top < size and size) else top + 1
        old = self.by_content.get(content)
        if old is not None:
            del self.by_id[old.id]
        token = AddedToken(token_id, spec)
        self.by_content[content] = token
        self.by_id[token_id] = token

    def _matcher(self, tokens: list[AddedToken], normalize: Normalizer):
        """Leftmost-longest literal matcher (aho-corasick MatchKind::LeftmostLongest) -> (regex, lookup)."""
        patterns: dict[str, AddedToken] = {}
        for token in tokens:
            patterns.setdefault(normalize(token.content), token)
        patterns.pop("", None)
        if not patterns:
            return None
        # At a given start, `re` tries alternatives in order, so longest-first gives leftmost-longest.
        ordered = sorted(patterns, key=len, reverse=True)
        return re.compile("|".join(re.escape(p) for p in ordered)), patterns

    def split(self, text: str, normalized: bool) -> list[tuple[str, int | None]]:
        """AddedVocabulary::find_matches: cut `text` into (piece, added id or None)."""
        matcher = self.normalized_matcher if normalized else self.raw_matcher
        if matcher is None or not text:
            return [(text, None)] if text else []
        regex, lookup = matcher
        out: list[tuple[str, int | None]] = []
        done = 0
        for m in regex.finditer(text):
            start, stop = m.span()
            token = lookup[m.group()]
            if token.single_word and not _is_single_word(text, start, stop):
                continue  # the match is still consumed, as in aho-corasick's find_iter
            if token.lstrip:
                while start > done and text[start - 1] in _WHITE_SPACE:
                    start -= 1
            if token.rstrip:
                while stop < len(text) and text[stop] in _WHITE_SPACE:
                    stop += 1
            if done < start:
                out.append((text[done:start], None))
            out.append((text[start:stop], token.id))
            done = stop
        if done < len(text):
            out.append((text[done:], None))
        return out


def _is_single_word(text: str, start: int, stop: int) -> bool:
    word_before = start > 0 and is_word_char(text[start - 1])
    word_after = stop < len(text) and is_word_char(text[stop])
    return not word_before and not word_after


# --- Post-processor and decoder ----------------------------------------------------------------------
PostProcessor = Callable[[list[int]], list[int]]


def chain(steps: list):
    """One step that applies `steps` in order (a Sequence post-processor or decoder)."""
    def run(x):
        for step in steps:
            x = step(x)
        return x

    return run


def build_post_processor(spec) -> PostProcessor:
    """What `add_special_tokens=True` adds around one sequence."""
    if spec is None or spec.get("type") == "ByteLevel":  # ByteLevel only trims offsets
        return lambda ids: ids
    kind = spec.get("type")
    if kind == "TemplateProcessing":
        return _template(spec)
    if kind == "Sequence":
        return chain([build_post_processor(s) for s in spec["processors"]])
    raise UnsupportedModelError(f"tokenizer post_processor {kind!r} is not supported without `tokenizers`")


def _template(spec: dict) -> PostProcessor:
    before: list[int] = []
    after: list[int] = []
    seen_sequence = False
    for piece in spec["single"]:
        if "Sequence" in piece:
            if piece["Sequence"]["id"] != "A" or seen_sequence:
                raise UnsupportedModelError("tokenizer TemplateProcessing: single template must hold $A once")
            seen_sequence = True
        else:
            name = piece["SpecialToken"]["id"]
            (after if seen_sequence else before).extend(spec["special_tokens"][name]["ids"])
    return lambda ids: before + ids + after


Decoder = Callable[[list[str]], list[str]]


def byte_level_decode(tokens: list[str]) -> list[str]:
    """decoders::ByteLevel: map byte-level chars back to bytes; a token with any other char is taken
    as its own UTF-8 (e.g. an added token "a b"). Invalid UTF-8 becomes U+FFFD as String::from_utf8_lossy."""
    data = bytearray()
    for token in tokens:
        try:
            data.extend(bytes([CHAR_BYTES[c] for c in token]))
        except KeyError:
            data.extend(token.encode("utf-8"))
    return [data.decode("utf-8", errors="replace")]


def byte_fallback_decode(tokens: list[str]) -> list[str]:
    """decoders::ByteFallback: runs of <0xXX> tokens become their UTF-8 text, or one U+FFFD per byte when the
    run is not valid UTF-8; other tokens pass unchanged."""
    out: list[str] = []
    run = bytearray()
    for token in tokens + [None]:
        byte = _fallback_byte(token)
        if byte is not None:
            run.append(byte)
            continue
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" * len(run))
            run.clear()
        if token is not None:
            out.append(token)
    return out


def _fallback_byte(token: str | None) -> int | None:
    if token is None or len(token) != 6 or not token.startswith("<0x") or not token.endswith(">"):
        return None
    try:
        return int(token[3:5], 16)
    except ValueError:
        return None


def strip_decoder(content: str, start: int, stop: int) -> Decoder:
    """decoders::Strip: up to `start` leading and `stop` trailing `content` chars off each token."""
    def strip(token: str) -> str:
        lo, hi = 0, len(token)
        while lo < min(start, hi) and token[lo] == content:
            lo += 1
        for _ in range(stop):
            if hi > lo and token[hi - 1] == content:
                hi -= 1
        return token[lo:hi]

    return lambda tokens: [strip(t) for t in tokens]


def build_decoder(spec) -> Decoder:
    if spec is None:
        return lambda tokens: [" ".join(tokens)]  # Tokenizer::decode joins with spaces without a decoder
    kind = spec.get("type")
    if kind == "ByteLevel":
        return byte_level_decode
    if kind == "Replace":
        old, new = _string_pattern(spec, "decoder"), spec["content"]
        return lambda tokens: [t.replace(old, new) for t in tokens]
    if kind == "ByteFallback":
        return byte_fallback_decode
    if kind == "Fuse":
        return lambda tokens: ["".join(tokens)]
    if kind == "Strip":
        return strip_decoder(spec["content"], int(spec.get("start", 0)), int(spec.get("stop", 0)))
    if kind == "Sequence":
        return chain([build_decoder(s) for s in spec["decoders"]])
    raise UnsupportedModelError(f"tokenizer decoder {kind!r} is not supported without `tokenizers`")


# --- Tokenizer -------------------------------------------------------------------------------------


class PurePythonTokenizer:
    """tokenizer.json without the Rust wheel: `encode`/`decode` give the ids and text `tokenizers` gives."""

    def __init__(self, spec: dict, merge_ids=None):
        """spec: the parsed tokenizer.json; its merges list is consumed (emptied once the merge table holds it).
        merge_ids: its merges as ids (BpeModel), when the bundle has them."""
        for key in ("truncation", "padding"):
            if spec.get(key) is not None:
                raise UnsupportedModelError(f"tokenizer.json sets {key}; the runtime expects it null")
        self.model = BpeModel.from_spec(spec["model"], merge_ids)
        spec["model"]["merges"] = []  # half a million strings for a 262k vocabulary: not kept past the table
        vocab = spec["model"]["vocab"]  # the parsed dict: used while building, then dropped with `spec`
        self.normalize = build_normalizer(spec.get("normalizer"))
        self.pre_tokenize = build_pre_tokenizer(spec.get("pre_tokenizer"))
        self.post_process = build_post_processor(spec.get("post_processor"))
        self.decoder = build_decoder(spec.get("decoder"))
        self.added = AddedVocabulary(spec.get("added_tokens") or [], vocab, self.normalize)
        self._vocab_size = len(vocab.keys() | self.added.by_content.keys())

    @classmethod
    def from_json(cls, json_str: str, merge_ids=None) -> PurePythonTokenizer:
        return cls(json.loads(json_str), merge_ids)

    @classmethod
    def from_file(cls, path) -> PurePythonTokenizer:
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    @property
    def vocab_size(self) -> int:
        """Distinct tokens, added ones included (Tokenizer::get_vocab_size(true))."""
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        added = self.added.by_content.get(token)
        return added.id if added is not None else self.model.token_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        added = self.added.by_id.get(token_id)
        return added.content if added is not None else self.model.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (Tokenizer::encode for one sequence, ids only)."""
        ids: list[int] = []
        for piece, added_id in self.added.split(text, normalized=False):
            if added_id is not None:
                ids.append(added_id)
                continue
            for part, part_id in self.added.split(self.normalize(piece), normalized=True):
                if part_id is not None:
                    ids.append(part_id)
                    continue
                for word in self.pre_tokenize([part]):
                    ids.extend(self.model.tokenize(word))
        return self.post_process(ids) if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; unknown ids are dropped, as `tokenizers` does."""
        tokens = []
        for token_id in ids:
            token = self.id_to_token(int(token_id))
            if token is None or (skip_special_tokens and token in self.added.special):
                continue
            tokens.append(token)
        return "".join(self.decoder(tokens))


# --- Tables ----------------------------------------------------------------------------------------
# Measured with tokenizers 0.22.2 against Python 3.11 (Unicode 14.0) over every code point: chars with
# a combining class or decomposition in Python that tokenizers' Unicode 9.0 tables lack (98 marks such
# as U+1AC1-1ACE, plus U+11938 and its second half U+11930), and the 93 marks Unicode 15.0-16.0 added
# (inert for tokenizers, combining for Python >= 3.12).
NFC_BARRIER = (
    "7fd 897-89f 8ca-8d3 9fe c3c cf3 d3b-d3c eba ece 1715 1abf-1ace 1df6-1dfa a82c 10d24-10d27 "
    "10d69-10d6d 10eab-10eac 10efc-10eff 10f46-10f50 10f82-10f85 11070 11241 1133b 113b8-113c0 113c2 "
    "113c5 113c7-113ca 113cc-113d0 113d2 113e1-113e2 1145e 11839-1183a 11930 11938 1193d-1193e 11943 "
    "119e0 11a34 11a47 11a99 11d42 11d44-11d45 11d97 11f00-11f01 11f03 11f34-11f3a 11f3e-11f42 11f5a "
    "13440 13447-13455 1611e-1612f 16ff0-16ff1 1e08f 1e130-1e136 1e2ae 1e2ec-1e2ef 1e4ec-1e4ef "
    "1e5ee-1e5ef "
)
# For NFKC/NFKD also: compatibility decompositions tokenizers lacks (72 on Python 3.11, e.g. U+32FF,
# U+10781-107BA) and the letters/digits Unicode 15.0-16.0 added (some decompose on newer Pythons).
K_BARRIER_EXTRA = (
    "1c89-1c8a 32ff a7cb-a7cd a7da-a7dc a7f2-a7f4 ab69 105c0-105f3 10781-10785 10787-107b0 "
    "107b2-107ba 10d40-10d65 10d6f-10d85 10ec2-10ec4 1123f-11240 11380-11389 1138b 1138e 11390-113b5 "
    "113b7 113d1 113d3 116d0-116e3 11bc0-11be0 11bf0-11bf9 11f02 11f04-11f10 11f12-11f33 11f50-11f59 "
    "1342f 13441-13446 13460-143fa 16100-1611d 16130-16139 16d40-16d6c 16d70-16d79 18cff 1b132 1b155 "
    "1ccf0-1ccf9 1d2c0-1d2d3 1df25-1df2a 1e030-1e06d 1e4d0-1e4eb 1e4f0-1e4f9 1e5d0-1e5ed 1e5f0-1e5fa "
    "1f16c 1fbf0-1fbf9 2b739 2ebf0-2ee5d 31350-323af "
)
# Rust regex \\w beyond letters and what unicodedata (14.0) calls M/Nd/Nl/Pc: Other_Alphabetic symbols
# (circled and squared Latin letters) and the marks and digits Unicode 15.0-16.0 added.
WORD_EXTRA = (
    "897 cf3 ece 24b6-24e9 10d40-10d49 10d69-10d6d 10efc-10eff 11241 113b8-113c0 113c2 113c5 "
    "113c7-113ca 113cc-113d0 113d2 113e1-113e2 116d0-116e3 11bf0-11bf9 11f00-11f01 11f03 11f34-11f3a "
    "11f3e-11f42 11f50-11f5a 13440 13447-13455 1611e-16139 16d70-16d79 1ccf0-1ccf9 1e08f 1e4ec-1e4f9 "
    "1e5ee-1e5ef 1e5f1-1e5fa 1f130-1f149 1f150-1f169 1f170-1f189 "
)
