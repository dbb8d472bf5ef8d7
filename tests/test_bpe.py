"""PurePythonTokenizer vs `tokenizers`: same ids and text on English, a unicode fuzz, and per code point."""
import argparse
import collections
import inspect
import json
import pydoc_data.topics
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from edge_runtime.errors import BundleError, UnsupportedModelError
from edge_runtime.tokenizer import pretokenize
from edge_runtime.tokenizer.bpe import (
    K_BARRIER_EXTRA,
    NFC_BARRIER,
    BpeModel,
    MergeTable,
    PurePythonTokenizer,
    is_word_char,
    merge_id_rows,
    unicode_form,
)
from edge_runtime.tokenizer.tokenizer import Tokenizer as RuntimeTokenizer
from edge_runtime.tokenizer.tokenizer import read_merge_ids
from export.bundle.assets import merge_ids_bytes
from export.sources.gguf_tokenizer import LLAMA3_REGEX, QWEN2_REGEX, tokenizer_from_gguf

GGUF = Path(__file__).resolve().parents[1] / "cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
CODE_POINTS = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
FUZZ_COUNT = 3000

# --- fuzz text -------------------------------------------------------------------------------------
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<mask>", "[SEP]",
            "hello world"]
SCRIPTS = [(0x41, 0x7A), (0xC0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF),
           (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
           (0xAC00, 0xD7A3),
           (0x20000, 0x2A6DF), (0x31350, 0x323AF), (0x1E4D0, 0x1E4F9), (0x10D40, 0x10D8F), (0x16D40, 0x16D79),
           (0x11F00, 0x11F5F)]  # the last five: letters/digits of Unicode 15-16 (unknown to Python 3.11)
MARKS = [(0x300, 0x36F), (0x483, 0x489), (0x591, 0x5BD), (0x93C, 0x94D), (0x1AB0, 0x1ACE), (0x20D0, 0x20F0),
         (0xFE00, 0xFE0F), (0x1611E, 0x1612F), (0x113B8, 0x113C9), (0x11930, 0x11938)]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🏳️‍🌈", "🧑🏿‍🚀", "✨", "🤖", "☕", "🫠", "🪿"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u2009", "\u3000", "\u200b",
          "\u2028", "\x1c", "\x1f", "\ufeff", "\u180e"]
NUMBERS = ["0", "7", "42", "1234567", "3.14159", "٣٤٥", "०१२", "１２３", "²³", "½", "Ⅻ", "〇", "𝟘𝟙", "𑁒", "𞋰",
           "\U00011de3", "\U00016ff5", "\U00010d40"]
WORDS = ["the", "The", "don't", "I'M", "we'LL", "it'ſ", "'re", "'", "''s", "hello", "naïve", "café",
         "cafe\u0301", "Åström", "ﬁne", "fi", "straße", "İstanbul", "Ω", "K", "x_y", "foo.bar()", "a+b=c",
         "#!@$%^&*", "...", "--", "—", "«»", "¿", "http://x.y/z?q=1", "\\n", "{}[]", "<|im_", "|>", "<|",
         "<<|im_start|>>", " yes", "yes ",
         "㋿", "\U00010781"]
CONTROL = [chr(c) for c in [*range(32), 127, *range(0x80, 0xA0)]] + ["\ufffe", "\uffff", "\ue000"]
CONTRACTIONS = ["'s", "'t", "'ll", "'S", "'D", "'ſ", "'ſt", "'VE", "'m"]


def _char_in(rng, ranges):
    lo, hi = rng.choice(ranges)
    return chr(rng.randint(lo, hi))


def _any_char(rng):
    c = rng.randint(0, 0x10FFFF) if rng.random() < 0.5 else rng.randint(0, 0xFFFF)
    return "x" if 0xD800 <= c <= 0xDFFF else chr(c)


def _fragment(rng):
    k = rng.random()
    if k < 0.18:
        return rng.choice(WORDS)
    if k < 0.30:
        return "".join(_char_in(rng, SCRIPTS) for _ in range(rng.randint(1, 8)))
    if k < 0.38:
        return _char_in(rng, MARKS) * rng.randint(1, 3)
    if k < 0.46:
        return rng.choice(EMOJI)
    if k < 0.58:  # sometimes a long whitespace run
        return rng.choice(SPACES) * (rng.randint(1, 40) if rng.random() < 0.2 else 1)
    if k < 0.68:
        return rng.choice(NUMBERS)
    if k < 0.74:
        return rng.choice(CONTROL)
    if k < 0.82:
        return rng.choice(SPECIALS)
    if k < 0.90:
        return "".join(_any_char(rng) for _ in range(rng.randint(1, 4)))
    return rng.choice(CONTRACTIONS)


def fuzz_strings(seed, count, max_fragments=12):
    rng = random.Random(seed)
    return ["".join(_fragment(rng) for _ in range(rng.randint(0, max_fragments))) for _ in range(count)]


# --- reference tokenizers ----------------------------------------------------------------------------


def _train(tok, vocab_size, specials, alphabet=True):
    corpus = [inspect.getsource(m) for m in (argparse, textwrap, collections)] + fuzz_strings(1, 2000)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet else [])
    tok.train_from_iterator(corpus, trainer)


def llama3_style() -> str:
    """Llama-3 / Qwen2 layout: NFC, Split regex + ByteLevel without regex, ignore_merges, BOS template."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    _train(tok, 3000, ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      special_tokens=[("<|begin_of_text|>", 0)])])
    return tok.to_str()


def gpt2_style() -> str:
    """GPT-2 layout (ByteLevel regex, add_prefix_space) plus NFKC, unk + fuse_unk, flagged added tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.Sequence([decoders.ByteLevel()])
    _train(tok, 2000, ["<unk>", "<|endoftext|>"], alphabet=False)  # no full alphabet: some chars are unk
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, single_word=True),
                            AddedToken("[SEP]", rstrip=True)])
    tok.add_tokens([AddedToken("hello world", normalized=False), AddedToken("ﬁ", normalized=True),
                    AddedToken(" yes", lstrip=True, rstrip=True)])
    tok.post_processor = processors.ByteLevel()
    return tok.to_str()


def byte_fallback_style() -> str:
    """A hand-made vocab with byte_fallback, unk without fusing, and merges written as "a b" strings."""
    merges = ["t h", "Ġ th", "Ġth e", "e r", "a n", "an d"]
    tokens = ["<unk>", *(f"<0x{b:02X}>" for b in range(0x80, 0x100)), *"abcdefghijklmnopqrstuvwxyzĠ",
              *(m.replace(" ", "") for m in merges)]  # bytes < 0x80 outside a-z have no fallback: unk
    vocab = {t: i for i, t in enumerate(tokens)}
    spec = json.loads(Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split()) for m in merges],
                                           unk_token="<unk>", byte_fallback=True)).to_str())
    spec["model"]["merges"] = merges
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                             "use_regex": True}
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return json.dumps(spec)


@pytest.fixture(scope="module")
def specs():
    smol, _ = tokenizer_from_gguf(_gguf_fields())
    return {"smollm2": smol, "llama3": llama3_style(), "gpt2": gpt2_style(),
            "byte_fallback": byte_fallback_style()}


def _gguf_fields():
    from gguf import GGUFReader
    return GGUFReader(str(GGUF)).fields


def _pair(specs, name):
    return Tokenizer.from_str(specs[name]), PurePythonTokenizer.from_json(specs[name])


# --- whole-tokenizer parity ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smollm2", "llama3", "gpt2"])
def test_pydoc_topics_identical(specs, name):
    ref, mine = _pair(specs, name)
    texts = list(pydoc_data.topics.topics.values())
    got = [mine.encode(t) for t in texts]
    want = [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
    assert got == want
    assert [mine.encode(t, add_special_tokens=True) for t in texts[:5]] == \
        [e.ids for e in ref.encode_batch(texts[:5], add_special_tokens=True)]
    assert [mine.decode(ids) for ids in want] == ref.decode_batch(want, skip_special_tokens=False)
    if name == "smollm2":
        assert [mine.decode(ids) for ids in want] == texts  # lossless round trip without a normalizer


@pytest.mark.parametrize("name", ["smollm2", "llama3", "gpt2", "byte_fallback"])
def test_fuzz_identical(specs, name):
    ref, mine = _pair(specs, name)
    texts = fuzz_strings(seed=1234, count=FUZZ_COUNT)
    for add in (False, True):
        want = [e.ids for e in ref.encode_batch(texts, add_special_tokens=add)]
        got = [mine.encode(t, add_special_tokens=add) for t in texts]
        bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
        assert not bad, f"{len(bad)} strings differ, first: {bad[0]!r}"
    for skip in (False, True):
        assert [mine.decode(ids, skip_special_tokens=skip) for ids in want] == \
            ref.decode_batch(want, skip_special_tokens=skip)
    rng = random.Random(5)  # arbitrary id runs: split UTF-8 sequences, specials, unknown ids
    size = ref.get_vocab_size(with_added_tokens=True)
    runs = [[rng.randrange(size + 5) for _ in range(rng.randint(0, 20))] for _ in range(FUZZ_COUNT)]
    assert [mine.decode(ids) for ids in runs] == ref.decode_batch(runs, skip_special_tokens=False)


@pytest.mark.parametrize("name", ["smollm2", "llama3", "gpt2"])
def test_vocab_lookups(specs, name):
    ref, mine = _pair(specs, name)
    assert mine.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    for i in range(0, mine.vocab_size + 3, 7):
        assert mine.id_to_token(i) == ref.id_to_token(i)
    for token in ["<|im_start|>", "<mask>", "hello world", "Ġthe", "the", "zzz-not-a-token"]:
        assert mine.token_to_id(token) == ref.token_to_id(token)


def test_from_file_and_merge_forms(specs, tmp_path):
    path = tmp_path / "tokenizer.json"
    spec = json.loads(specs["llama3"])
    path.write_text(json.dumps(spec), encoding="utf-8")
    as_pairs = PurePythonTokenizer.from_file(path)
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    as_strings = PurePythonTokenizer.from_json(json.dumps(spec))
    text = pydoc_data.topics.topics["assert"]
    want = Tokenizer.from_str(specs["llama3"]).encode(text, add_special_tokens=False).ids
    assert as_pairs.encode(text) == as_strings.encode(text) == want


# --- Unicode classes, regex translation, normalizers ----------------------------------------------------


def _onig_class(pattern):
    """Code points `tokenizers` (Oniguruma) matches with a one-char pattern."""
    text = "".join(map(chr, CODE_POINTS))
    kept = bytearray(len(text))
    for _, (s, e) in pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(text):
        kept[s:e] = b"\x01" * (e - s)
    return {c for c, k in zip(CODE_POINTS, kept) if not k}


def _table(*tables):
    return {c for t in tables for lo, hi in pretokenize.parse_ranges(t) for c in range(lo, hi + 1)}


def test_unicode_tables_equal_oniguruma_on_every_code_point():
    assert _onig_class(r"\p{L}") == _table(pretokenize.ONIG_LETTER)
    assert _onig_class(r"\p{N}") == _table(pretokenize.ONIG_NUMBER)
    assert _onig_class(r"\s") == _table(pretokenize.WHITE_SPACE)


def _sampled_text(seed, count):
    rng = random.Random(seed)
    return "".join(chr(c) for c in rng.sample(CODE_POINTS, count))


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "qwen2", "digits", "digits_contiguous"])
def test_pre_tokenizers_on_random_code_points(kind):
    ref, mine = {
        "gpt2": (pre_tokenizers.ByteLevel(add_prefix_space=False), pretokenize.byte_level_pre(False, True)),
        "llama3": (pre_tokenizers.Split(Regex(LLAMA3_REGEX), "isolated"),
                   pretokenize.split_pre({"Regex": LLAMA3_REGEX}, "Isolated")),
        "qwen2": (pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"),
                  pretokenize.split_pre({"Regex": QWEN2_REGEX}, "Isolated")),
        "digits": (pre_tokenizers.Digits(individual_digits=True), pretokenize.digits_pre(True)),
        "digits_contiguous": (pre_tokenizers.Digits(individual_digits=False), pretokenize.digits_pre(False)),
    }[kind]
    text = _sampled_text(7, 60_000) + "".join(fuzz_strings(99, 300))
    for i in range(0, len(text), 4000):
        chunk = text[i:i + 4000]
        assert mine([chunk]) == [p for p, _ in ref.pre_tokenize_str(chunk)]


def test_numeric_table_equals_rust_is_numeric():
    text = "a".join(map(chr, CODE_POINTS))  # 'a' keeps each char apart; numeric ones come out alone
    pieces = pre_tokenizers.Digits(individual_digits=True).pre_tokenize_str(text)
    rust = {ord(p) for p, _ in pieces if len(p) == 1 and p != "a"}
    assert rust == _table(pretokenize.ONIG_NUMBER, pretokenize.RUST_NUMERIC_EXTRA)


@pytest.mark.parametrize("behavior",
                         ["removed", "isolated", "merged_with_previous", "merged_with_next", "contiguous"])
@pytest.mark.parametrize("invert", [False, True])
def test_split_behaviors(behavior, invert):
    name = "".join(w.capitalize() for w in behavior.split("_"))  # merged_with_next -> MergedWithNext
    texts = ["the-final--countdown-", "-a--b", "", "---", "no dash"] + fuzz_strings(3, 200)
    for pattern, ref_pattern in ((({"String": "-"}), "-"), ({"Regex": r"\s+|\p{N}"}, Regex(r"\s+|\p{N}"))):
        ref = pre_tokenizers.Split(ref_pattern, behavior, invert=invert)
        mine = pretokenize.split_pre(pattern, name, invert)
        for t in texts:
            assert mine([t]) == [p for p, _ in ref.pre_tokenize_str(t)], (t, pattern)


def test_normalizers_with_marks_newer_than_tokenizers_tables():
    rng = random.Random(11)
    barrier = sorted(_table(NFC_BARRIER, K_BARRIER_EXTRA))
    chars = [chr(c) for c in barrier + rng.sample(CODE_POINTS, 20_000)]
    probes = (lambda c: c, lambda c: "a" + c + "\u0334", lambda c: "a\u0301" + c, lambda c: "a\u0345" + c,
              lambda c: "\U00011935" + c)
    for form in ("NFC", "NFD", "NFKC", "NFKD"):
        ref, mine = getattr(normalizers, form)(), unicode_form(form)
        for probe in probes:
            text = "".join(probe(c) for c in chars)
            assert mine(text) == ref.normalize_str(text), form


def test_single_word_boundaries_match_rust_regex_word_class():
    tok = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    tok.add_special_tokens([AddedToken("<m>", single_word=True)])
    mask = tok.token_to_id("<m>")
    rng = random.Random(13)
    sample = rng.sample(CODE_POINTS, 30_000) + [0x24B6, 0x1F130, 0x200D, 0x113B8, 0x10D40, 0x5F]
    encodings = tok.encode_batch([chr(c) + "<m>" for c in sample])
    assert [mask not in e.ids for e in encodings] == [is_word_char(chr(c)) for c in sample]


# --- what is refused -----------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [
    {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}},
    {"pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"\d+"}, "behavior": "Isolated"}},
    {"pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"\p{Lu}"}, "behavior": "Isolated"}},
    {"normalizer": {"type": "Lowercase"}},
    {"decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True}},
    {"truncation": {"max_length": 8, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}},
])
def test_unsupported_parts_fail_at_load(specs, patch):
    spec = dict(json.loads(specs["byte_fallback"]), **patch)
    with pytest.raises(UnsupportedModelError):
        PurePythonTokenizer(spec)


@pytest.mark.parametrize("seed", [0, 1])
def test_merge_table_holds_the_last_rank_of_every_pair(seed):
    # dense ids and repeated pairs: the last rank wins, as a dict filled in rank order (the Rust HashMap collect)
    rng = random.Random(seed)
    shift, n = 9, 3000
    merges = [(rng.randrange(40), rng.randrange(40), rng.randrange(1 << shift)) for _ in range(n)]
    in_order = {}
    for rank, (a, b, m) in enumerate(merges):
        in_order[a, b] = (rank, m)
    table = MergeTable.from_arrays(shift, *zip(*merges))
    assert len(table) == len(in_order)
    for a in range(45):
        for b in range(45):
            assert table.get(a, b) == in_order.get((a, b))
    assert MergeTable.from_arrays(shift, [], [], []).get(1, 2) is None


def test_merges_that_are_not_pairs_are_refused():
    vocab = {"a": 0, "b": 1, "ab": 2, "c": 3}
    assert BpeModel(vocab, ["a b"]).merges.get(0, 1) == (0, 2)
    assert BpeModel(vocab, [["a", "b"]]).merges.get(0, 1) == (0, 2)
    for merges in (["ab"], ["a b c"], ["a  b"], [["a", "b", "c"]], ["a b", ["a"]]):
        with pytest.raises(UnsupportedModelError, match="is not a pair"):
            BpeModel(vocab, merges)
    with pytest.raises(UnsupportedModelError, match="uses 'x', not in the vocab"):
        BpeModel(vocab, ["a x"])


@pytest.mark.parametrize("name", ["smollm2", "llama3", "byte_fallback"])
def test_merge_ids_build_the_table_the_merge_strings_build(specs, name):
    # what the exporter writes as tokenizer.merges.bin, read back as the runtime reads it
    ids = np.frombuffer(merge_ids_bytes(specs[name]), "<i4").reshape(-1, 3)
    from_strings = PurePythonTokenizer.from_json(specs[name])
    from_ids = PurePythonTokenizer.from_json(specs[name], ids)
    assert len(ids) == len(json.loads(specs[name])["model"]["merges"])
    assert from_ids.model.merges.keys == from_strings.model.merges.keys
    assert from_ids.model.merges.values == from_strings.model.merges.values
    text = pydoc_data.topics.topics["assert"]
    assert from_ids.encode(text) == from_strings.encode(text)


def test_merge_ids_that_do_not_fit_the_vocabulary_are_refused(specs, tmp_path):
    model = json.loads(specs["llama3"])["model"]
    ids = merge_id_rows(model["vocab"], model["merges"])
    for bad in (ids[:, :2], np.where(ids == ids.max(), len(model["vocab"]) + 5, ids), ids - ids.max() - 1):
        with pytest.raises(BundleError, match="merge ids"):
            RuntimeTokenizer.from_json(specs["llama3"], "python", np.ascontiguousarray(bad))
    (tmp_path / "m.bin").write_bytes(ids.astype("<i4").tobytes()[:-4])
    with pytest.raises(BundleError, match="not whole"):
        read_merge_ids(tmp_path / "m.bin")
