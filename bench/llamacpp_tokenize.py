"""Record llama.cpp's token ids (and its detokenization of them) for held-out texts and a unicode fuzz set: the
tokenizer ground truth the tests compare both of our tokenizer paths to (ids and texts only, no model bytes).

Runs in the llama-cpp-python environment (not a dependency of this project), on the GGUF file itself:
    /work/peers/llama/bin/python bench/llamacpp_tokenize.py cache/models/gemma-3-270m-q4_k_m.gguf \\
        tests/data/gemma3_llamacpp_ids.json
Special tokens written in the text are parsed (special=True), as the runtime does for chat templates.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sysconfig
from pathlib import Path

PYDOC_TOPICS = 8          # held-out English prose: every n-th pydoc topic, an excerpt of each
EXCERPT_CHARS = 1500
FUZZ_CASES = 300
FUZZ_SEED = 19

MULTILINGUAL = [
    "La capitale de la France est Paris, une ville célèbre pour ses musées, ses cafés et la tour Eiffel.",
    "Die Größe eines Sprachmodells bestimmt, wie viel Speicher es auf einem Telefon braucht — übergroß ist schlecht.",
    "Москва — столица России; в ней живёт более двенадцати миллионов человек.",
    "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。",
    "北京是中国的首都，有着三千多年的历史。",
    "서울은 대한민국의 수도이며 한강이 도시를 가로질러 흐른다.",
    "القاهرة هي عاصمة مصر وأكبر مدنها، وتقع على ضفاف نهر النيل.",
    "नई दिल्ली भारत की राजधानी है और यह यमुना नदी के किनारे स्थित है।",
    "Ελληνικά: η Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "Tiếng Việt có dấu: Hà Nội là thủ đô của Việt Nam.",
    "Emoji 🙂👍🏽👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, maths ∑ᵢ xᵢ² ≤ ∞, arrows → ⇒ ↔.",
]

# Character pools the fuzz strings draw from: ASCII, whitespace runs, accents, scripts, emoji and modifiers,
# combining marks, controls, private use, noncharacters, and strings that look like special or byte pieces.
POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n\r\x0b\x0c",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßœŒÆØÅ",
    "日本語中文한국어русскийالعربيةहिन्दीελληνικάעברית",
    "🙂👍🏽👩‍👩‍👧‍👦🇫🇷❤️✨🔥",
    "\u0301\u0308\u0327\u200d\u200c\ufe0f",
    "\x00\x01\x07\x1b\x7f\u0085\u00a0\u2028\u3000",
    "\ue000\U000f0000\uffff\U0010fffd\ufffd",
    "\u2581",
]
PIECES = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<0x41>", "<unk>", "<b>", "</s>", "<table>",
          "  ", "\n\n", "\t\t", "▁▁", "<pad>", "[multimodal]", "<unused12>", "The", " the", "ing"]


def held_out_texts() -> list[tuple[str, str]]:
    """(domain, text): pydoc prose, standard-library Python source, multilingual sentences."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    prose = [topics[keys[i]][:EXCERPT_CHARS] for i in range(0, len(keys), len(keys) // PYDOC_TOPICS)][:PYDOC_TOPICS]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [(stdlib / name).read_text(encoding="utf-8")[:EXCERPT_CHARS]
            for name in ("json/decoder.py", "textwrap.py", "heapq.py")]
    return ([("pydoc", t) for t in prose] + [("python", t) for t in code]
            + [("multilingual", t) for t in MULTILINGUAL])


def fuzz_texts(n: int = FUZZ_CASES, seed: int = FUZZ_SEED) -> list[str]:
    """Random strings of 1-40 draws, each a char from a random pool or (1 in 6) a special-looking piece."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            parts.append(rng.choice(PIECES) if rng.random() < 1 / 6 else rng.choice(rng.choice(POOLS)))
        out.append("".join(parts))
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    import llama_cpp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    llm = llama_cpp.Llama(model_path=str(args.gguf), vocab_only=True, verbose=False)

    def ids(text: str, add_bos: bool = False) -> list[int]:
        return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def case(domain: str, text: str) -> dict:
        out = ids(text)
        decoded = llm.detokenize(out, special=True).decode("utf-8", errors="replace")
        return {"domain": domain, "text": text, "ids": out, "decoded": decoded}

    cases = [case(d, t) for d, t in held_out_texts()] + [case("fuzz", t) for t in fuzz_texts()]
    doc = {
        "model": args.gguf.name, "sha256": sha256(args.gguf), "llama_cpp_python": llama_cpp.__version__,
        "special": True,
        "with_bos": {"text": "The capital of France is", "ids": ids("The capital of France is", add_bos=True)},
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    n_ids = sum(len(c["ids"]) for c in cases)
    print(f"{args.out}: {len(cases)} texts, {n_ids} ids; with BOS: {doc['with_bos']['ids']}")


if __name__ == "__main__":
    main()
