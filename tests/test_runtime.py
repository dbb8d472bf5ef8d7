"""Runtime core: loading, chat template, generation loop (stop strings, UTF-8, EOS, context policies), stats.

Runs on a fake in-memory backend (a deterministic "script" model) and a tiny byte-level BPE tokenizer built
here, so it needs no exported model. test_cli.py reuses these helpers (FakeBackend, write_bundle).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edge_runtime
from edge_runtime import backends
from edge_runtime.errors import BundleError, ContextOverflowError, EdgeError, UnsupportedModelError
from edge_runtime.format.bundle import FORMAT_VERSION, Bundle, write_manifest
from edge_runtime.generation.generate import fit_prompt, held_back, split_stop
from edge_runtime.generation.stats import GenerationStats, parse_size, peak_rss_bytes
from edge_runtime.threads import default_threads
from edge_runtime.tokenizer.tokenizer import StreamDecoder, Tokenizer

REPO = Path(__file__).resolve().parents[1]
FAKE_HOOK = "fake=test_runtime:FakeBackend"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
EOS = 2
# SmolLM2-135M-Instruct's template, verbatim from the GGUF metadata.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
          "trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["the cat sat on the mat. the dog sat on the log.", "hello world, hello there",
          "stop here END of story", "a b c d e f g h i j k l m n o p"] * 4


# ---------------------------------------------------------------- fakes shared with test_cli.py

class FakeBackend:
    """A deterministic stand-in model: the logits at absolute position p are 10 for
    script[(p + 1) % len(script)], 5 for the id after it (a runner-up for the repetition penalty to promote)
    and 0 elsewhere, so a prompt of n tokens greedily continues with script[n], script[n+1], ...
    It checks the Backend contract on every call (dtype, no gaps in the cache, capacity) and records calls."""

    name = "fake"

    def __init__(self, bundle, context, threads=1, **opts):
        graph = bundle.manifest["graph"]
        self.script = list(graph["script"])
        self.delay_s = float(graph.get("delay_s", 0.0))
        self.vocab = bundle.config.vocab_size
        self.context, self.threads, self.opts = context, threads, opts
        self.cache = np.full(context, -1, dtype=np.int64)  # the ids whose "keys/values" are cached
        self.filled = 0
        self.calls: list[tuple[int, list[int], list[int]]] = []

    def forward(self, ids, past_len, logits_index):
        assert ids.dtype == np.int64 and ids.ndim == 1 and ids.size >= 1
        assert 0 <= past_len <= self.filled, "forward would leave a gap in the cache"
        assert past_len + ids.size <= self.context, "forward past the cache capacity"
        assert all(0 <= j < ids.size for j in logits_index)
        if self.delay_s:
            import time
            time.sleep(self.delay_s)
        self.cache[past_len:past_len + ids.size] = ids
        self.filled = past_len + ids.size
        self.calls.append((past_len, ids.tolist(), [int(j) for j in logits_index]))
        logits = np.zeros((len(logits_index), self.vocab), dtype=np.float32)  # [L, V]
        for row, j in enumerate(logits_index):
            target = self.script[(past_len + int(j) + 1) % len(self.script)]
            logits[row, target] = 10.0
            logits[row, (target + 1) % self.vocab] = 5.0
        return logits

    def kv_nbytes(self):
        return self.context * 8

    def describe(self):
        return f"{self.threads} threads"


def tokenizer_json() -> str:
    """A ~300-token byte-level BPE (multi-byte characters stay split into byte tokens)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


_TOKENIZER_JSON: list[str] = []  # built once per process


def tiny_tokenizer_json() -> str:
    if not _TOKENIZER_JSON:
        _TOKENIZER_JSON.append(tokenizer_json())
    return _TOKENIZER_JSON[0]


def tiny_tokenizer(**special) -> Tokenizer:
    return Tokenizer.from_json(tiny_tokenizer_json(), **special)


def write_bundle(root: Path, script: list[int], max_context: int = 64, chat_template=CHATML,
                 add_bos_token=False, delay_s=0.0, contract="test-fake-v1") -> Path:
    """A bundle folder for the fake backend: manifest, tokenizer.json, a tiny weights.bin, checksums."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    (root / "weights.bin").write_bytes(bytes(4096))
    files = {}
    for name in ("tokenizer.json", "weights.bin"):
        data = (root / name).read_bytes()
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    spec = json.loads(tiny_tokenizer_json())
    vocab = len(spec["model"]["vocab"])  # the special tokens are in it too (trained in)
    manifest = {
        "format": "edge-bundle", "format_version": FORMAT_VERSION, "architecture": "llama",
        "config": {"model_type": "llama", "vocab_size": vocab, "hidden_size": 8, "intermediate_size": 16,
                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4},
        "graph": {"contract": contract, "file": "model.onnx", "script": [int(t) for t in script],
                  "delay_s": delay_s},
        "weights": {"file": "weights.bin", "tensors": {}},
        "tokenizer": {"file": "tokenizer.json", "bos_token_id": 1, "eos_token_ids": [EOS],
                      "pad_token_id": EOS,
                      "special_tokens": {}, "chat_template": chat_template, "add_bos_token": add_bos_token},
        "max_context": max_context,
        "files": files,
    }
    write_manifest(root, manifest)
    return root


# ---------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def fake_hook(monkeypatch):
    monkeypatch.setenv(backends.EXTRA_BACKENDS_ENV, FAKE_HOOK)


def make_model(tmp_path, script, prompt_ids=None, **load_kw):
    """A Model on the fake backend; `script` may start with the prompt ids so the continuation is known."""
    bundle_kw = {k: load_kw.pop(k) for k in ("max_context", "chat_template", "add_bos_token") if k in load_kw}
    root = write_bundle(tmp_path / "bundle", script, **bundle_kw)
    return edge_runtime.load(root, backend="fake", **load_kw)


def ids_of(text: str) -> list[int]:
    return tiny_tokenizer().encode(text)


# ---------------------------------------------------------------- import hygiene, loading

def test_import_loads_no_heavy_packages():
    code = ("import sys, edge_runtime; "
            "heavy = {'onnxruntime', 'tokenizers', 'jinja2', 'torch', 'transformers', 'onnx'}; "
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_load_defaults_and_context_checks(tmp_path):
    model = make_model(tmp_path, ids_of("the cat"), max_context=4096)
    assert model.context == 2048 and model.backend.threads >= 1
    model = edge_runtime.load(tmp_path / "bundle", backend="fake", context=100, threads=1)
    assert model.context == 100 and model.backend.threads == 1
    with pytest.raises(ContextOverflowError, match="exceeds this bundle's max_context 4096"):
        edge_runtime.load(tmp_path / "bundle", backend="fake", context=5000)
    with pytest.raises(EdgeError, match="context must be a positive"):
        edge_runtime.load(tmp_path / "bundle", backend="fake", context=0)
    with pytest.raises(EdgeError, match="overflow must be one of"):
        edge_runtime.load(tmp_path / "bundle", backend="fake", overflow="wrap")


def test_load_rejects_tampered_and_missing_bundles(tmp_path):
    make_model(tmp_path, ids_of("the cat"))
    with pytest.raises(BundleError, match="bundle not found"):
        edge_runtime.load(tmp_path / "nope", backend="fake")
    weights = tmp_path / "bundle" / "weights.bin"
    weights.write_bytes(b"\x01" + weights.read_bytes()[1:])
    with pytest.raises(BundleError, match="checksum mismatch for weights.bin"):
        edge_runtime.load(tmp_path / "bundle", backend="fake")
    edge_runtime.load(tmp_path / "bundle", backend="fake", verify=False)  # sizes still match: loads
    tok = tmp_path / "bundle" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"the"', '"teh"'))
    with pytest.raises(EdgeError, match="tokenizer"):  # each implementation words it its own way
        edge_runtime.load(tmp_path / "bundle", backend="fake", verify=False)


def test_background_verification_gates_each_file(tmp_path):
    # load() checksums in a thread: a file is handed out only once its checksum matched, and load waits for all
    root = write_bundle(tmp_path / "bundle", ids_of("the cat"))
    weights = root / "weights.bin"
    weights.write_bytes(b"\x01" + weights.read_bytes()[1:])
    bundle = Bundle.open(root, background=True)  # sizes match: the open itself succeeds
    assert bundle.path("tokenizer.json") == root / "tokenizer.json"
    with pytest.raises(BundleError, match="checksum mismatch for weights.bin"):
        bundle.path("weights.bin")
    with pytest.raises(BundleError, match="checksum mismatch for weights.bin"):
        bundle.wait_verified()
    with pytest.raises(BundleError, match="checksum mismatch for weights.bin"):
        Bundle.open(root)  # the default: every checksum before open returns
    Bundle.open(root, verify=False, background=True).path("weights.bin")  # nothing to wait for
    # a file gone after the open is an error of its own, never a wait that does not end
    from edge_runtime.format.verification import Verification

    check = Verification(root, {"gone.bin": (root / "gone.bin", "0" * 64),
                                "tokenizer.json": (root / "tokenizer.json", "0" * 64)})
    with pytest.raises(BundleError, match="cannot read gone.bin"):
        check.wait("gone.bin")
    with pytest.raises(BundleError, match="checksum mismatch for tokenizer.json"):
        check.wait("tokenizer.json")


def test_backend_resolution(monkeypatch):
    assert backends.resolve("numpy", "edge-llama-v1") == "numpy"
    assert backends.resolve("ort", "optimum-kv-v1") == "ort-optimum"
    assert backends.resolve("auto", "optimum-kv-v1") == "ort-optimum"
    assert backends.resolve("auto", "edge-llama-v1") == "ort"  # onnxruntime is installed here
    assert backends.resolve("fake", "anything") == "fake"
    with pytest.raises(UnsupportedModelError, match=r"cannot run graph contract optimum-kv-v1 \(use ort\)"):
        backends.resolve("numpy", "optimum-kv-v1")
    with pytest.raises(UnsupportedModelError, match="'gpt9-v1' is not one this runtime runs"):
        backends.resolve("auto", "gpt9-v1")
    monkeypatch.setattr(backends, "has_onnxruntime", lambda: False)
    assert backends.resolve("auto", "edge-llama-v1") == "numpy"
    with pytest.raises(EdgeError, match="needs onnxruntime"):
        backends.resolve("ort", "edge-llama-v1")


def test_make_backend_passes_only_accepted_options(tmp_path):
    model = make_model(tmp_path, ids_of("the cat"), kv_dtype="float16")
    assert model.backend.opts == {"kv_dtype": "float16"}  # FakeBackend takes **opts
    with pytest.raises(EdgeError, match="unknown backend 'tpu'"):
        backends.make_backend("tpu", model.bundle, 8, 1)


# ---------------------------------------------------------------- generation

def test_greedy_continues_the_script_and_reports_length(tmp_path):
    prompt = ids_of("the cat")
    script = prompt + ids_of(" sat on the mat.")
    model = make_model(tmp_path, script)
    out = model.generate("the cat", max_new_tokens=5)
    assert out.token_ids == script[len(prompt):len(prompt) + 5]
    assert out.text == tiny_tokenizer().decode(out.token_ids)
    assert out.finish_reason == "length"
    s = out.stats
    assert (s.prompt_tokens, s.new_tokens) == (len(prompt), 5)
    assert s.prefill_s > 0 and s.decode_s > 0 and s.peak_rss_mb > 10
    assert s.backend == f"fake, {default_threads()} threads, context 64"


def test_eos_stops_and_is_not_emitted(tmp_path):
    prompt = ids_of("hello")
    script = prompt + ids_of(" world") + [EOS] + ids_of(" never")
    model = make_model(tmp_path, script)
    out = model.generate("hello", max_new_tokens=50)
    assert (out.text, out.finish_reason) == (" world", "eos")
    assert out.token_ids[-1] == EOS
    assert len(model.backend.calls) == len(out.token_ids)  # prefill + one step per token before EOS: no extra


def test_stop_string_across_pieces_is_never_emitted(tmp_path):
    prompt = ids_of("stop")
    script = prompt + ids_of(" here END of story")
    model = make_model(tmp_path, script)
    # " E" / "ND" style splits: the stop string spans several tokens and starts mid-token.
    stream = model.stream("stop", max_new_tokens=40, stop=["D of", "xyz"])
    pieces = [r.text for r in stream]
    assert "".join(pieces) == " here EN" and stream.finish_reason == "stop"
    assert not any("D" in p for p in pieces)
    assert tiny_tokenizer().decode(stream.token_ids).startswith(" here END of")


def test_partial_stop_prefix_is_released(tmp_path):
    prompt = ids_of("the")
    script = prompt + ids_of(" cat sat on the mat.") + [EOS]
    model = make_model(tmp_path, script)
    stream = model.stream("the", max_new_tokens=40, stop=" cat dog")
    pieces = [r.text for r in stream]
    assert "".join(pieces) == " cat sat on the mat." and stream.finish_reason == "eos"
    # held back text is released at EOS too
    out = model.generate("the", max_new_tokens=40, stop="mat.!")
    assert out.text == " cat sat on the mat." and out.finish_reason == "eos"


def test_stop_token_ids(tmp_path):
    prompt = ids_of("hello")
    script = prompt + ids_of(" world, hello there")
    model = make_model(tmp_path, script)
    comma = tiny_tokenizer().token_to_id(",")
    out = model.generate("hello", max_new_tokens=40, stop=[comma])
    assert (out.text, out.finish_reason, out.token_ids[-1]) == (" world", "stop", comma)
    assert split_stop(["a", 3, np.int64(4)]) == (("a",), frozenset({3, 4}))
    with pytest.raises(EdgeError, match="must not be empty"):
        split_stop([""])
    assert held_back("abc EN", ["END"]) == 2 and held_back("abc", ["END"]) == 0


def test_streaming_never_emits_broken_utf8(tmp_path):
    text = " café 日本 🙂 ok"
    prompt = ids_of("hello")
    script = prompt + ids_of(text) + [EOS]
    tok = tiny_tokenizer()
    assert sum(tok.decode([t]).endswith("\ufffd") for t in ids_of(text)) >= 6  # really split into bytes
    model = make_model(tmp_path, script)
    stream = model.stream("hello", max_new_tokens=60)
    pieces = [r.text for r in stream]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    # Cut inside the emoji: the held-back bytes are flushed (as U+FFFD) at the end, like a full decode.
    n = len(ids_of(" café 日本 ")) + 2
    out = model.generate("hello", max_new_tokens=n)
    assert out.finish_reason == "length" and out.text.endswith("\ufffd")
    assert out.text == tok.decode(out.token_ids)


def test_stream_decoder_matches_full_decode():
    tok = tiny_tokenizer()
    ids = ids_of("a b 日本 the cat 🙂🙂 mat.")
    dec = StreamDecoder(tok)
    text = "".join(dec.push(t) for t in ids) + dec.flush()
    assert text == tok.decode(ids)


def test_stream_is_lazy_and_can_be_closed(tmp_path):
    prompt = ids_of("a")
    script = prompt + ids_of(" b c d e f g h i j k l m n o p")
    model = make_model(tmp_path, script)
    stream = model.stream("a", max_new_tokens=40)
    assert model.backend.calls == []  # nothing runs before iteration
    first = next(stream)
    stream.close()
    assert first.text == " b" and len(model.backend.calls) == 1  # just the prefill


def test_prefill_runs_in_chunks_with_last_position_logits(tmp_path):
    text = "a b c d e f g h i j k l m n o p"
    prompt = ids_of(text)
    model = make_model(tmp_path, prompt + ids_of(" h"))
    model.prefill_chunk = 4
    model.generate(text, max_new_tokens=2)
    chunks = model.backend.calls[:-1]
    assert len(prompt) > 8 and [c[0] for c in chunks] == list(range(0, len(prompt), 4))
    assert [t for c in chunks for t in c[1]] == prompt and all(len(c[1]) == 4 for c in chunks[:-1])
    assert all(c[2] == [len(c[1]) - 1] for c in chunks)
    assert model.backend.calls[-1][0] == len(prompt) and len(model.backend.calls[-1][1]) == 1


def test_repetition_penalty_and_seed_reach_the_sampler(tmp_path):
    prompt = ids_of("the cat")
    model = make_model(tmp_path, prompt + ids_of(" sat on the mat. the dog sat on the log."))
    a = model.generate("the cat", max_new_tokens=12, temperature=5.0, seed=7)
    b = model.generate("the cat", max_new_tokens=12, temperature=5.0, seed=7)
    assert a.token_ids == b.token_ids
    # Penalty 4 takes a seen scripted token from 10 to 2.5, under its unseen runner-up (5).
    out = model.generate("the cat", max_new_tokens=12, repetition_penalty=4.0)
    seq, expected = list(prompt), []
    for _ in range(12):
        target = model.backend.script[len(seq) % len(model.backend.script)]
        scores = {target: 10.0, target + 1: 5.0}
        scores = {t: v / 4.0 if t in seq else v for t, v in scores.items()}
        expected.append(max(scores, key=scores.get))
        seq.append(expected[-1])
    assert out.token_ids == expected and expected != model.backend.script[len(prompt):len(prompt) + 12]


# ---------------------------------------------------------------- context policies

def test_overflow_error_raises_before_any_work(tmp_path):
    prompt = ids_of("a b c d e f g")
    model = make_model(tmp_path, prompt + ids_of(" h i"), context=len(prompt) + 4)
    model.generate("a b c d e f g", max_new_tokens=5)  # P + N - 1 == context: fits exactly
    model.backend.calls.clear()
    with pytest.raises(ContextOverflowError, match=rf"prompt of {len(prompt)} tokens \+ 6 new tokens needs a "
                       rf"context of {len(prompt) + 5}, the model has {len(prompt) + 4}"):
        model.generate("a b c d e f g", max_new_tokens=6)
    assert model.backend.calls == []


def test_overflow_truncate_keeps_prompt_tail_and_stops_at_context_end(tmp_path):
    text = "a b c d e f g h i j k l m n o p"
    prompt = ids_of(text)
    model = make_model(tmp_path, list(range(3, 40)), context=12, overflow="truncate")
    out = model.generate(text, max_new_tokens=4)
    assert model.backend.calls[0][1] == prompt[-8:]  # room left for the 4 new tokens
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    # prompt fits but the answer does not: stops when the cache is full (P + N - 1 == context)
    out = model.generate("a b c d e", max_new_tokens=40)
    assert out.finish_reason == "length" and len(out.token_ids) == 12 - len(ids_of("a b c d e")) + 1
    assert fit_prompt([1, 5, 6, 7, 8, 9], 4, 10, "truncate", n_keep=1) == [1, 9]  # BOS kept, half the context


def slide_reference(prompt, script, context, n_new):
    """What the fake must produce under overflow="slide": (new ids, windows re-prefilled at each slide)."""
    window, out, slides = list(prompt), [], []
    for _ in range(n_new):
        token = script[len(window) % len(script)]  # the fake's rule, from the last cached position
        out.append(token)
        window.append(token)
        if len(window) > context and len(out) < n_new:
            window = window[-(context // 2):]
            slides.append(list(window))
    return out, slides


def test_overflow_slide_keeps_last_half_and_restarts_positions(tmp_path):
    script = list(range(3, 23))  # 20 distinct ids: the output follows absolute positions
    model = make_model(tmp_path, script, context=8, overflow="slide")
    prompt = ids_of("a b")
    stream = model.stream("a b", max_new_tokens=20)
    list(stream)
    expected, windows = slide_reference(prompt, script, 8, 20)
    assert stream.token_ids == expected and stream.finish_reason == "length"
    assert stream.stats.slides == len(windows) >= 3
    # A window the cache already holds (the script repeats) is reused, not run again from position 0.
    refills = [c[1] for c in model.backend.calls[1:] if c[0] == 0]
    assert refills and all(r in windows for r in refills) and all(len(w) == 4 for w in windows)
    held = model._cache.ids
    assert held == model.backend.cache[:len(held)].tolist() == windows[-1] + expected[-1 - (len(held) - 4):-1]


def test_slide_keeps_bos(tmp_path):
    model = make_model(tmp_path, list(range(3, 23)), context=8, overflow="slide", add_bos_token=True)
    out = model.generate("a b", max_new_tokens=16)
    slides = [c for c in model.backend.calls[1:] if c[0] <= 1 and len(c[1]) > 1]  # BOS is reused
    assert slides and all(c[0] == 1 for c in slides) and model.backend.cache[0] == 1 == model._cache.ids[0]
    assert model.backend.calls[0][1][0] == 1 and len(out.token_ids) == 16


# ---------------------------------------------------------------- chat template and tokenizer

def test_chat_template_renders_chatml(tmp_path):
    model = make_model(tmp_path, ids_of("the cat"))
    msgs = [{"role": "user", "content": "Hi!"}]
    assert model.apply_chat_template(msgs) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}] + msgs
    assert model.apply_chat_template(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    ids = model.encode_prompt(msgs)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> and <|im_end|> are single special ids


def test_chat_template_errors_are_edge_errors(tmp_path):
    model = make_model(tmp_path, ids_of("the cat"))
    msgs = [{"role": "user", "content": "Hi"}]
    for template, match in [
        ("{% for m in messages %}{{ m.content }", "does not compile"),
        ("{{ raise_exception('only user/assistant roles') }}", "only user/assistant roles"),
        ("{% set _ = messages.append(1) %}", "chat template failed"),   # immutable sandbox
        ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "chat template failed"),
    ]:
        model.chat_template = template
        with pytest.raises(EdgeError, match=match):
            model.generate(msgs, max_new_tokens=1)
    model.chat_template = None
    with pytest.raises(EdgeError, match="no chat template"):
        model.generate(msgs, max_new_tokens=1)
    model.chat_template = CHATML
    with pytest.raises(EdgeError, match="string 'role' and 'content'"):
        model.generate([{"role": "user"}], max_new_tokens=1)


def test_tokenizer_bos_policy():
    tok = tiny_tokenizer(bos_token_id=1, eos_token_ids=[2], add_bos_token=True)
    assert tok.encode("the cat")[0] == 1 and tok.encode("the cat", add_bos=False)[0] != 1
    assert tiny_tokenizer().encode("the cat")[0] != 1


def test_pure_python_tokenizer_agrees():
    hf = Tokenizer.from_json(tiny_tokenizer_json(), impl="tokenizers")
    py = Tokenizer.from_json(tiny_tokenizer_json(), impl="python")
    assert (hf.kind, py.kind) == ("tokenizers", "python")
    for text in ["the cat sat", "<|im_start|>user\nhi 日本 🙂<|im_end|>\n", "  spaces\tand\nlines END"]:
        assert py.encode(text) == hf.encode(text)
        assert py.decode(hf.encode(text)) == hf.decode(hf.encode(text)) == text


def test_empty_prompt_is_rejected(tmp_path):
    model = make_model(tmp_path, ids_of("the cat"))
    with pytest.raises(EdgeError, match="prompt is empty"):
        model.generate("", max_new_tokens=3)


# ---------------------------------------------------------------- stats

def test_stats_line_and_sizes():
    s = GenerationStats(prompt_tokens=31, new_tokens=65, prefill_s=0.5, decode_s=2.0, load_s=0.25,
                        peak_rss_mb=171.24, backend="ort (2 threads)")
    assert s.line() == ("prompt 31 tok, prefill 62.0 tok/s | 65 new tok, decode 32.0 tok/s | "
                        "peak RSS 171.2 MB | load 0.25 s | ort (2 threads)")
    assert "decode - tok/s" in GenerationStats(new_tokens=1).line()
    assert parse_size("200MB") == 200 << 20 and parse_size("1.5G") == 3 << 29 and parse_size(4096) == 4096
    with pytest.raises(EdgeError, match="cannot read size"):
        parse_size("lots")
    def hwm_kb():
        status = open("/proc/self/status", encoding="ascii").read()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])

    before = hwm_kb()  # the high-water mark only grows (another test's thread may still be allocating)
    assert before * 1024 <= peak_rss_bytes() <= hwm_kb() * 1024


def test_invalid_bytes_are_not_held_back_forever():
    tok = tiny_tokenizer()
    lone = [i for i in range(3, 300) if tok.decode([i]) == "\ufffd" and tok.decode([i, i]) == "\ufffd\ufffd"]
    assert lone  # a byte that never starts a valid character (e.g. 0xFF)
    dec = StreamDecoder(tok)
    pieces = [dec.push(lone[0]) for _ in range(40)]
    assert "".join(pieces) and all(p == "" for p in pieces[:15])  # held for 15 ids, then let through
    assert "".join(pieces) + dec.flush() == tok.decode([lone[0]] * 40)


def test_prefix_reuse_runs_only_the_new_tokens(tmp_path):
    script = ids_of("the cat sat on the mat. the dog sat on the log.")
    model = make_model(tmp_path, script)
    prompt = ids_of("the cat sat on the mat.")
    n_first = len(ids_of("the cat sat"))
    for reuse_decoded in (False, True):
        model.clear_cache()
        model.reuse_decoded = reuse_decoded
        first = model.generate("the cat sat", max_new_tokens=3)
        assert (first.stats.cached_tokens, first.stats.prefilled_tokens) == (0, n_first)
        held = list(model._cache.ids)
        assert held == ids_of("the cat sat") + first.token_ids[:-1]  # the last sampled id is never fed
        model.backend.calls.clear()
        out = model.generate("the cat sat on the mat.", max_new_tokens=2)
        shared = next(i for i, (a, b) in enumerate(zip(held + [-1], prompt)) if a != b)
        assert shared > n_first  # the first answer matched the new prompt too
        # By default the answer's decoded keys/values are run again (exact logits); else reused.
        reused = shared if reuse_decoded else n_first
        assert model.backend.calls[0][0] == reused and model.backend.calls[0][1] == prompt[reused:]
        assert (out.stats.cached_tokens, out.stats.prefilled_tokens) == (reused, len(prompt) - reused)
        assert "cached)" in out.stats.line()
    model.clear_cache()
    again = model.generate("the cat sat on the mat.", max_new_tokens=2)
    assert again.stats.cached_tokens == 0 and again.token_ids == out.token_ids
