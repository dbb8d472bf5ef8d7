"""SentencePiece-style GGUF vocabularies ("llama" tokenizer model: Gemma 3) as tokenizer.json: llama.cpp's
merge order on a hand-made vocabulary, and llama.cpp's own ids for the real Gemma 3 file (recorded by
bench/llamacpp_tokenize.py) from both tokenizer paths."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from edge_runtime.tokenizer.bpe import PurePythonTokenizer, byte_fallback_decode, strip_decoder
from export.sources.gguf_tokenizer import CONTROL, NORMAL, USER_DEFINED, tokenizer_from_gguf

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests/data/gemma3_llamacpp_ids.json"
BYTE = 6


def spm_gguf(path: Path, pieces: list[tuple[str, float, int]], add_space_prefix: bool = False) -> Path:
    """A GGUF holding only a "llama" vocabulary: <unk> <s> </s>, the 256 byte pieces, then `pieces`."""
    w = gguf.GGUFWriter(path, "llama")
    vocab = [("<unk>", 0.0, CONTROL), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    vocab += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)] + pieces
    w.add_tokenizer_model("llama")
    w.add_token_list([t for t, _, _ in vocab])
    w.add_token_scores([s for _, s, _ in vocab])
    w.add_token_types([k for _, _, k in vocab])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def both(path: Path):
    """(tokenizers, pure Python) built from the GGUF's tokenizer.json, and the id of each piece."""
    spec, meta = tokenizer_from_gguf(gguf.GGUFReader(path).fields)
    ids = {t: i for i, t in enumerate(json.loads(spec)["model"]["vocab"])}
    return Tokenizer.from_str(spec), PurePythonTokenizer.from_json(spec), ids, meta


def encode_both(pair, text):
    ref, mine = pair[0], pair[1]
    a, b = ref.encode(text, add_special_tokens=False).ids, mine.encode(text)
    assert a == b, text
    assert ref.decode(a, skip_special_tokens=False) == mine.decode(b), text
    return a


@pytest.mark.parametrize("ab_first", [True, False])
def test_highest_scoring_merge_wins(tmp_path, ab_first):
    # "abc": llama.cpp joins whichever of "ab" / "bc" scores higher, and there is no "abc" to finish.
    s_ab, s_bc = (-1.0, -2.0) if ab_first else (-2.0, -1.0)
    pieces = [("a", -10.0, NORMAL), ("b", -11.0, NORMAL), ("c", -12.0, NORMAL), ("ab", s_ab, NORMAL),
              ("bc", s_bc, NORMAL), ("\u2581", -13.0, NORMAL), ("\u2581a", -3.0, NORMAL)]
    pair = both(spm_gguf(tmp_path / "v.gguf", pieces))
    ids = pair[2]
    want = [ids["ab"], ids["c"]] if ab_first else [ids["a"], ids["bc"]]
    assert encode_both(pair, "abc") == want
    # spaces become U+2581 and merge like any character; no space is prepended (add_space_prefix false)
    assert encode_both(pair, "b a") == [ids["b"], ids["\u2581a"]]


def test_byte_fallback_and_user_defined_pieces(tmp_path):
    pieces = [("a", -1.0, NORMAL), ("\u2581", -2.0, NORMAL), ("  ", 0.0, USER_DEFINED),
              ("<turn>", 0.0, CONTROL)]
    pair = both(spm_gguf(tmp_path / "v.gguf", pieces))
    ids = pair[2]
    # é is not a piece: its UTF-8 bytes; a double space is a user-defined piece matched before the model
    assert encode_both(pair, "aé  a") == [ids["a"], ids["<0xC3>"], ids["<0xA9>"], ids["  "], ids["a"]]
    assert encode_both(pair, "<turn>a") == [ids["<turn>"], ids["a"]]  # control pieces written in the text
    assert pair[1].decode([ids["a"], ids["<0xC3>"]]) == "a\ufffd"  # half a character: one U+FFFD per byte


def test_space_prefix(tmp_path):
    pieces = [("a", -1.0, NORMAL), ("\u2581", -2.0, NORMAL), ("\u2581a", -0.5, NORMAL)]
    pair = both(spm_gguf(tmp_path / "v.gguf", pieces, add_space_prefix=True))
    ids = pair[2]
    assert encode_both(pair, "a a") == [ids["\u2581a"], ids["\u2581a"]]
    assert pair[1].decode([ids["\u2581a"], ids["\u2581a"]]) == "a a"  # the prepended space is stripped again
    assert pair[3]["add_bos_token"] is True  # SentencePiece vocabularies default to BOS, as in llama.cpp


def test_decoder_pieces():
    assert byte_fallback_decode(["<0xE2>", "<0x82>", "<0xAC>", "x", "<0xFF>", "<0x41>"]) == \
        ["€", "x", "\ufffd", "\ufffd"]
    assert strip_decoder(" ", 1, 0)(["  a ", "b"]) == [" a ", "b"]


# --- the real Gemma 3 vocabulary against llama.cpp ------------------------------------------------------


@pytest.fixture(scope="module")
def llamacpp_ids() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_fixture_covers_domains(llamacpp_ids):
    domains = {c["domain"] for c in llamacpp_ids["cases"]}
    assert {"pydoc", "python", "multilingual", "fuzz"} <= domains
    assert llamacpp_ids["with_bos"]["ids"] == [2, 818, 5279, 529, 7001, 563]  # <bos> The capital of France is


@pytest.mark.parametrize("impl", ["tokenizers", "python"])
def test_gemma3_ids_match_llamacpp(gemma_tokenizer_json, llamacpp_ids, impl):
    from edge_runtime.tokenizer.tokenizer import Tokenizer as EdgeTokenizer

    tok = EdgeTokenizer.from_json(gemma_tokenizer_json, impl, bos_token_id=2, add_bos_token=True)
    assert tok.encode(llamacpp_ids["with_bos"]["text"]) == llamacpp_ids["with_bos"]["ids"]
    wrong = [c["text"] for c in llamacpp_ids["cases"] if tok.encode(c["text"], add_bos=False) != c["ids"]]
    assert wrong == [], f"{len(wrong)} of {len(llamacpp_ids['cases'])} texts differ, e.g. {wrong[:3]!r}"
    # decoding gives llama.cpp's text back: the input, except that a literal U+2581 reads as a space
    wrong = [c["text"] for c in llamacpp_ids["cases"] if tok.decode(c["ids"]) != c["decoded"]]
    assert wrong == [], f"{len(wrong)} decode differently, e.g. {wrong[:3]!r}"
    assert all(c["decoded"] == c["text"].replace("\u2581", " ") for c in llamacpp_ids["cases"])
