"""Sessions, prefix reuse, scoring, custom samplers, session files and the threading contract, on tiny bundles
with both backends (each checked against the same model re-prefilled from scratch)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import edge_runtime
from edge_runtime.errors import ContextOverflowError, SessionFileError, StreamBusyError

BACKENDS = ["numpy", "ort"]
QUESTIONS = ["hello there", "what is a cat", "tell me more", "and the dog?", "why", "thanks"]


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle("tiny:llama", "int4")


def load(bundle, backend, **kw):
    return edge_runtime.load(bundle, backend=backend, threads=1, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_reuse_gives_the_fresh_prefill_logits(bundle, backend):
    model = load(bundle, backend)
    seen = []

    def capture(ids, logits):
        seen.append(logits.copy())
        return logits

    first = model.generate("the cat sat on", max_new_tokens=3)
    out = model.generate("the cat sat on the mat and", max_new_tokens=1, logits_processors=[capture])
    assert out.stats.cached_tokens >= 3 and out.stats.prefilled_tokens > 0
    assert out.stats.cached_tokens + out.stats.prefilled_tokens == out.stats.prompt_tokens
    assert first.stats.cached_tokens == 0
    ids = model.tokenizer.encode("the cat sat on the mat and")
    fresh = model.logits(ids)[-1]  # from position 0, nothing reused
    np.testing.assert_allclose(seen[0], fresh, rtol=0, atol=1e-4 * np.abs(fresh).max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_session_replies_equal_reprefilling_and_reuse_the_cache(bundle, backend):
    model, ref = load(bundle, backend), load(bundle, backend)
    session = model.session(system="be brief")
    messages = [{"role": "system", "content": "be brief"}]
    previous_prompt = 0
    for i, q in enumerate(QUESTIONS[:4]):
        got = session.generate(q, max_new_tokens=8)
        messages.append({"role": "user", "content": q})
        ref.clear_cache()
        want = ref.generate(messages, max_new_tokens=8)
        messages.append({"role": "assistant", "content": want.text})
        assert got.token_ids == want.token_ids and got.text == want.text
        assert want.stats.cached_tokens == 0
        # At least the previous prompt comes from the cache (the random model's answers need not re-tokenize
        # to the sampled ids, and then are prefilled again, as re-prefilling would).
        assert got.stats.cached_tokens >= previous_prompt > 0 or i == 0
        assert got.stats.cached_tokens + got.stats.prefilled_tokens == got.stats.prompt_tokens
        previous_prompt = got.stats.prompt_tokens
    assert session.messages == messages[1:]
    session.reset()
    assert session.messages == [] and session.system == "be brief"


@pytest.mark.parametrize("backend", BACKENDS)
def test_reuse_past_a_sliding_window_gives_the_fresh_prefill_logits(tiny_bundle, backend):
    """tiny:gemma3's window layers keep their last 8 keys (a ring on NumPy, a buffer that shifts under ONNX
    Runtime): once a turn has written more positions, a prompt that shares only part of it is prefilled from 0
    there, and every reply equals re-prefilling."""
    model = load(tiny_bundle("tiny:gemma3", "fp32"), backend)
    assert model.backend.kv_ring == 8
    seen = []

    def capture(ids, logits):
        seen.append(logits.copy())
        return logits

    prompt = "the cat sat on the mat and the dog sat on the log"
    first = model.generate(prompt, max_new_tokens=6)
    assert first.stats.prompt_tokens > 8
    out = model.generate(prompt + " and then", max_new_tokens=1, logits_processors=[capture])
    assert out.stats.cached_tokens == 0
    fresh = model.logits(model.encode_prompt(prompt + " and then"))[-1]
    np.testing.assert_allclose(seen[0], fresh, rtol=0, atol=1e-4 * np.abs(fresh).max())

    session, ref = model.session(), load(tiny_bundle("tiny:gemma3", "fp32"), backend)
    messages = []
    for q in QUESTIONS[:3]:
        got = session.generate(q, max_new_tokens=6)
        messages.append({"role": "user", "content": q})
        ref.clear_cache()
        want = ref.generate(messages, max_new_tokens=6)
        messages.append({"role": "assistant", "content": want.text})
        assert got.token_ids == want.token_ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_replies_past_a_sliding_window_resume_at_the_prompt_end(tiny_bundle, backend):
    """The window caches hold W - 1 + stride positions (spec.kv_capacity): under ONNX Runtime a buffer makes
    room for `stride` reply tokens before the first decode step (backends/ort/window.py), the NumPy ring keeps
    the last positions anyway. So after replies that short a turn resumes where the previous prompt ended, even
    past the window, and the replies equal re-prefilling."""
    model, ref = load(tiny_bundle("tiny:gemma3", "fp32"), backend), load(tiny_bundle("tiny:gemma3", "fp32"), backend)
    stride = 4  # window 8: its buffers hold 8 - 1 + 4 positions
    session, messages, previous = model.session(), [], 0
    for i, q in enumerate(QUESTIONS[:4]):
        got = session.generate(q, max_new_tokens=stride)
        messages.append({"role": "user", "content": q})
        ref.clear_cache()
        want = ref.generate(messages, max_new_tokens=stride)
        messages.append({"role": "assistant", "content": want.text})
        assert got.token_ids == want.token_ids
        if i > 0:
            assert got.stats.cached_tokens >= previous > 8
        previous = got.stats.prompt_tokens
    assert model.backend.kv_held(0)[0] > 0 or backend == "numpy"  # the buffers did shift


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_and_load_past_a_sliding_window(tiny_bundle, backend, tmp_path):
    """A session file of tiny:gemma3 written after its window buffers moved on continues identically."""
    path = tiny_bundle("tiny:gemma3", "fp32")
    model, other = load(path, backend), load(path, backend)
    model.reuse_decoded = other.reuse_decoded = True  # else the answer's positions are prefilled again, from 0
    session = model.session()
    session.generate("the cat sat on the mat and the dog sat on the log", max_new_tokens=9)
    saved = session.save(tmp_path / "chat.session")
    assert model.backend.kv_held(0)[0] > 0 or backend == "numpy"  # the window buffers have shifted
    want = session.generate("why", max_new_tokens=6)
    restored = other.load_session(saved)
    got = restored.generate("why", max_new_tokens=6)
    assert got.token_ids == want.token_ids and got.stats.cached_tokens > 8


def test_a_failed_pass_empties_a_ring_cache_and_keeps_a_full_one():
    from edge_runtime.sessions.state import CacheState

    for ring, kept in ((None, 5), (8, 0)):
        cache = CacheState(ring=ring)
        cache.append(list(range(20)), 0)
        cache.exact = 20
        cache.failed(5)
        assert len(cache.ids) == kept
    cache = CacheState(ring=8)
    cache.append(list(range(20)), 0)
    assert [cache.resume_at(n) for n in (0, 5, 18, 19, 20)] == [0, 0, 0, 19, 20]
    cache.truncate(0)
    cache.append(list(range(6)), 0)
    assert cache.resume_at(3) == 3  # a pass from 0 wrote 6 positions: the ring holds them all


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_logprobs_equal_scoring_the_same_tokens(bundle, backend):
    model = load(bundle, backend)
    prompt = model.tokenizer.encode("a dog and a cat")
    stream = model.stream("a dog and a cat", max_new_tokens=6, temperature=0.8, seed=3)
    responses = list(stream)
    assert responses[-1].finish_reason == stream.finish_reason and responses[-1].stats is stream.stats
    assert "".join(r.text for r in responses) == stream.text
    assert [r.token for r in responses if r.token is not None] == stream.token_ids
    scored = model.logprobs(prompt + stream.token_ids)[len(prompt) - 1:]
    np.testing.assert_allclose(stream.logprobs, scored, atol=2e-3)
    assert all(lp <= 0 for lp in stream.logprobs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_sampler_and_processor(bundle, backend):
    model = load(bundle, backend)
    second = model.generate("the cat", max_new_tokens=4, sampler=lambda z: int(np.argsort(z)[-2]))
    ids = model.tokenizer.encode("the cat")
    for t in second.token_ids:
        assert t == int(np.argsort(model.logits(ids)[-1])[-2])
        ids.append(t)
    banned = second.token_ids[0]

    def ban(_ids, z):
        z = z.copy()
        z[banned] = -np.inf
        return z

    assert banned not in model.generate("the cat", max_new_tokens=4, logits_processors=[ban]).token_ids
    with pytest.raises(edge_runtime.EdgeError):
        model.generate("the cat", sampler="greedy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_slide_drops_oldest_turns_and_keeps_the_system_prompt(bundle, backend):
    model = load(bundle, backend, context=96, overflow="slide")
    session = model.session(system="you are a terse assistant")
    system_ids = session._encode(session.head(), add_generation_prompt=False)
    for q in QUESTIONS:
        session.generate(q + " " + q, max_new_tokens=12)
        assert model._cache.ids[:len(system_ids)] == system_ids
    assert len(session.messages) < 2 * len(QUESTIONS)  # old turns were dropped
    assert session.messages[0]["role"] == "user" and session.messages[-2]["content"] == "thanks thanks"
    strict = load(bundle, backend, context=64).session(system="you are a terse assistant")
    with pytest.raises(ContextOverflowError):
        for q in QUESTIONS:
            strict.generate(q + " " + q, max_new_tokens=12)


@pytest.mark.parametrize("backend,kv_dtype", [("numpy", "float32"), ("ort", "float32"), ("ort", "float16")])
def test_save_and_load_continue_identically(bundle, backend, kv_dtype, tmp_path):
    model = load(bundle, backend, kv_dtype=kv_dtype)
    session = model.session(system="be brief")
    for q in QUESTIONS[:2]:
        session.generate(q, max_new_tokens=8)
    path = session.save(tmp_path / "chat.session")
    model.generate("something else entirely", max_new_tokens=4)  # the cache moves on
    want = session.generate(QUESTIONS[2], max_new_tokens=8)

    other = load(bundle, backend, kv_dtype=kv_dtype)
    restored = other.load_session(path)
    assert restored.messages == session.messages[:-2] and restored.system == "be brief"
    got = restored.generate(QUESTIONS[2], max_new_tokens=8)
    assert got.token_ids == want.token_ids
    # The restored cache is used (the original session had to re-prefill: its model's cache had moved on).
    assert got.stats.cached_tokens > 0 == want.stats.cached_tokens


def test_damaged_and_foreign_session_files_are_refused(bundle, tiny_bundle, tmp_path):
    model = load(bundle, "numpy")
    session = model.session()
    session.generate("hello", max_new_tokens=4)
    path = session.save(tmp_path / "a.session")
    data = bytearray(path.read_bytes())
    for name, bad in [("flip", data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]), ("cut", data[:-16]),
                      ("header", data[:80] + b"x" + data[81:]), ("empty", b""), ("magic", b"PK" + data[2:])]:
        (tmp_path / name).write_bytes(bytes(bad))
        with pytest.raises(SessionFileError, match="damaged|not an edge-runtime session"):
            model.load_session(tmp_path / name)
    with pytest.raises(SessionFileError, match="another bundle"):
        load(tiny_bundle("tiny:llama", "fp32"), "numpy").load_session(path)
    with pytest.raises(SessionFileError, match="float16 KV cache"):
        load(bundle, "numpy", kv_dtype="float32").load_session(
            load(bundle, "numpy", kv_dtype="float16").session().save(tmp_path / "h.session"))
    with pytest.raises(SessionFileError, match="cannot read"):
        model.load_session(tmp_path / "missing")
    assert model.load_session(path).generate("again", max_new_tokens=2).token_ids  # still works


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_model_across_threads_equals_single_threaded(bundle, backend):
    model = load(bundle, backend)
    prompts = ["the cat", "a dog ran", "hello world and", "why is the sky"]
    want = {p: model.generate(p, max_new_tokens=6).token_ids for p in prompts}
    got: dict[str, list] = {p: [] for p in prompts}
    errors = []

    def work(p):
        try:
            for i in range(20):
                if i % 2:
                    got[p].append(model.generate(p, max_new_tokens=6).token_ids)
                else:
                    got[p].append([r.token for r in model.stream(p, max_new_tokens=6) if r.token is not None])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for p in prompts:
        assert got[p] == [want[p]] * 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_open_stream_in_one_thread_is_refused(bundle, backend):
    model = load(bundle, backend)
    want = model.generate("the cat", max_new_tokens=6)
    first = model.stream("the cat", max_new_tokens=6)
    head = next(first)
    with pytest.raises(StreamBusyError):
        model.stream("a dog", max_new_tokens=6)
    with pytest.raises(StreamBusyError):
        model.logprobs("a dog")
    rest = list(first)
    assert [head.token] + [r.token for r in rest if r.token is not None] == want.token_ids
    abandoned = model.stream("a dog", max_new_tokens=6)
    next(abandoned)
    del abandoned  # dropping a stream closes it and frees the model
    assert model.generate("the cat", max_new_tokens=6).token_ids == want.token_ids
