"""Loading a bundle into a ready-to-run Model (tokenizer, backend, context policy) and its generate() call."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Union

import numpy as np

from . import backends
from .errors import EdgeError, SamplingError
from .format.bundle import Bundle
from .generation import scoring
from .generation.generate import (
    PREFILL_CHUNK,
    Generation,
    check_overflow,
    fit_prompt,
    generate_tokens,
    split_stop,
)
from .generation.sampling import (
    LogitsProcessor,
    Sampler,
    check_processors,
    make_logits_processors,
    make_sampler,
    validate,
)
from .generation.scoring import check_ids
from .generation.stats import GenerationStats, parse_size
from .generation.stream import ResponseStream
from .memory import budget, pages
from .sessions.session import Session
from .sessions.state import CacheState
from .threads import check_threads
from .tokenizer import chat_template as chat
from .tokenizer.tokenizer import Tokenizer

DEFAULT_CONTEXT = 2048  # until the memory planner chooses one from the budget

Prompt = Union[str, Sequence[Mapping[str, str]]]
Stop = Union[str, int, Iterable[Union[str, int]], None]


def _choose_context(bundle: Bundle, context: int | None, memory_budget, backend: str, kv_dtype):
    """(context, kv_dtype, prefill_chunk): from the memory planner when there is a budget, else as given."""
    if memory_budget is not None:
        plan = budget.plan(bundle, parse_size(memory_budget), context=context, backend=backend,
                           kv_dtype=kv_dtype)
        return int(plan.context), plan.kv_dtype, plan.prefill_chunk
    if context is None:
        return min(bundle.max_context, DEFAULT_CONTEXT), kv_dtype, PREFILL_CHUNK
    return bundle.check_context(context), kv_dtype, PREFILL_CHUNK


def load(bundle_path, backend: str = "auto", threads: int | None = None, context: int | None = None,
         memory_budget: int | str | None = None, kv_dtype: str | None = None, verify: bool = True,
         overflow: str = "error") -> Model:
    """Open a bundle (checking every file's checksum unless verify=False) and build a Model.

    backend: "auto" (ONNX Runtime when installed, else NumPy), "ort" or "numpy".
    context: KV-cache capacity in tokens (default min(max_context, 2048)); memory_budget (bytes or "200MB")
    lets the memory planner choose it instead. overflow: "error" | "truncate" | "slide" (see generate.py).
    """
    t0 = time.perf_counter()
    check_overflow(overflow)
    if not isinstance(backend, str):
        raise EdgeError(f"backend must be a name such as 'auto', got {backend!r:.40}")
    threads = check_threads(threads)
    # checksums in a thread: the weights are hashed while the tokenizer parses (Bundle.path awaits each file's)
    bundle = Bundle.open(bundle_path, verify=verify, background=True)
    try:
        tokenizer, engine, chunk = _assemble(bundle, backend, threads, context, memory_budget, kv_dtype)
        bundle.wait_verified()  # every file, the ones this load did not read included
    except BaseException:
        bundle.abandon()
        raise
    return Model(bundle, tokenizer, engine, overflow=overflow, load_s=time.perf_counter() - t0,
                 prefill_chunk=chunk)


def _assemble(bundle: Bundle, backend: str, threads: int, context, memory_budget, kv_dtype):
    """(tokenizer, backend engine, prefill chunk) of an opened bundle, planned before anything large exists."""
    limit = parse_size(memory_budget) if memory_budget is not None else None
    name = budget.resolve_backend(bundle, backend, limit, context, kv_dtype)  # "auto" under a budget: what fits
    context, kv_dtype, chunk = _choose_context(bundle, context, memory_budget, name, kv_dtype)
    opts = {"kv_dtype": kv_dtype} if kv_dtype is not None else {}
    # The tokenizer first: parsing tokenizer.json peaks at several times the file (a 262k vocabulary: ~150 MB)
    # while little else is resident, and its garbage goes before the backend's own load transient.
    tokenizer = Tokenizer.from_bundle(bundle)
    pages.trim_heap()
    engine = backends.make_backend(name, bundle, context, threads, **opts)
    pages.trim_heap()  # the prepacking buffers ONNX Runtime freed
    return tokenizer, engine, chunk


def check_text(text: str) -> str:
    """`text` itself; EdgeError if it cannot be UTF-8 (a lone surrogate, e.g. from undecodable bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EdgeError(f"the prompt is not valid Unicode text (a lone surrogate at character {e.start})") from None
    return text


def check_arguments(seed, **numbers) -> None:
    """SamplingError unless seed is None or an integer >= 0 and every other argument is a real number (the
    ranges are sampling.validate's), a finite temperature included."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise SamplingError(f"seed must be an integer >= 0, got {seed!r:.40}")
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise SamplingError(f"{name} must be a number, got {value!r:.40}")
        if isinstance(value, int) and abs(value) > 2**53:
            raise SamplingError(f"{name} is out of range (an integer of {value.bit_length()} bits)")
    if math.isinf(numbers.get("temperature", 0.0)):
        raise SamplingError("temperature must be finite")


class Model:
    """A loaded bundle: generate(prompt or messages) -> Generation, stream(...) -> Response objects,
    session() for a conversation that keeps its cache, logits()/logprobs() for scoring.

    Safe to share across threads: every use of the one backend and KV cache holds the model's lock (state.py),
    so concurrent callers take turns; a second stream opened in the thread of a still-open one raises
    StreamBusyError.
    """

    def __init__(self, bundle: Bundle, tokenizer: Tokenizer, backend, overflow: str = "error",
                 load_s: float = 0.0, prefill_chunk: int = PREFILL_CHUNK):
        self.bundle = bundle
        self.tokenizer = tokenizer
        self.backend = backend
        self.overflow = check_overflow(overflow)
        self.load_s = load_s
        self.prefill_chunk = prefill_chunk
        meta = bundle.manifest.get("tokenizer") or {}
        self.chat_template: str | None = meta.get("chat_template")
        self.eos_token_ids = frozenset(int(t) for t in meta.get("eos_token_ids") or ())
        self._special_tokens = self._template_tokens(meta)
        self._cache = CacheState(ring=getattr(backend, "kv_ring", None), floor=getattr(backend, "resume_floor", None))

    @property
    def context(self) -> int:
        return self.backend.context

    def _template_tokens(self, meta: Mapping) -> dict[str, str]:
        """bos_token, eos_token, ... strings for the chat template (Hugging Face passes these by name)."""
        tokens = {k: v for k, v in (meta.get("special_tokens") or {}).items() if isinstance(v, str)}
        first_eos = next(iter(meta.get("eos_token_ids") or ()), None)
        for key, token_id in (("bos_token", meta.get("bos_token_id")), ("eos_token", first_eos),
                              ("pad_token", meta.get("pad_token_id"))):
            if key not in tokens and token_id is not None:
                text = self.tokenizer.id_to_token(int(token_id))
                if text is not None:
                    tokens[key] = text
        return tokens

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return chat.render(self.chat_template, messages, self._special_tokens, add_generation_prompt)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Ids of a raw string (BOS added if the bundle asks) or of chat messages (template, no extra BOS)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(check_text(prompt))
        if isinstance(prompt, (bytes, bytearray)):
            raise EdgeError("the prompt must be text (str) or chat messages, not bytes: decode it first")
        return self.tokenizer.encode(check_text(self.apply_chat_template(prompt)), add_bos=False)

    def generate(self, prompt: Prompt, max_new_tokens: int = 256, **options) -> Generation:
        """Continue `prompt` (a string, or chat messages [{"role", "content"}, ...] rendered by the template)
        and return the whole Generation. Options as for stream()."""
        return self.stream(prompt, max_new_tokens, **options).collect()

    def stream(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
               seed: int | None = None, stop: Stop = (), sampler: Sampler | None = None,
               logits_processors: Sequence[LogitsProcessor] = ()) -> ResponseStream:
        """Continue `prompt`, yielding Response objects (text piece, token id, log-prob; the last one carries
        finish_reason and stats).

        Greedy when temperature == 0. `stop` holds strings (never emitted, matched across pieces) and/or token
        ids; the bundle's EOS ids always stop. `sampler` (logits [V] -> id) replaces the temperature/top-k/
        top-p/min-p sampler; `logits_processors` ((ids so far [T], logits [V]) -> logits [V]) run after the
        repetition penalty. The longest prefix shared with what the KV cache holds (the previous call's prompt
        and answer) is reused, not prefilled again (stats.cached_tokens).
        """
        ids = self.encode_prompt(prompt)
        room = self.context - min(max_new_tokens, self.context // 2)  # what fit_prompt keeps of a long prompt
        if not isinstance(prompt, str) and self.overflow != "error" and len(ids) > room:
            ids = chat.fit_messages(prompt, self.encode_prompt, room)  # whole old messages go first
        n_keep = int(self.tokenizer.bos_token_id is not None and ids[:1] == [self.tokenizer.bos_token_id])
        return self.stream_ids(ids, max_new_tokens, n_keep=n_keep, temperature=temperature, top_k=top_k,
                               top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                               stop=stop, sampler=sampler, logits_processors=logits_processors)

    def stream_ids(self, ids: Sequence[int], max_new_tokens: int = 256, n_keep: int = 0,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                   repetition_penalty: float = 1.0, seed: int | None = None, stop: Stop = (),
                   sampler: Sampler | None = None, logits_processors: Sequence[LogitsProcessor] = (),
                   on_end: Callable[[list[int], ResponseStream], None] | None = None) -> ResponseStream:
        """stream() over prompt ids; the first `n_keep` ids survive truncation and slides. on_end(prompt ids
        as run, the stream) is called once when the stream ends, the cache still claimed."""
        check_arguments(seed, temperature=temperature, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty)
        validate(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens)
        stop_strings, stop_ids = split_stop(stop)
        vocab = self.bundle.config.vocab_size
        if any(not 0 <= i < vocab for i in stop_ids):
            raise SamplingError(f"stop token ids must be in 0..{vocab - 1}, got {sorted(stop_ids)}")
        sample = sampler if sampler is not None else make_sampler(temperature, top_k, top_p, min_p, seed)
        processors = make_logits_processors(repetition_penalty) + check_processors(logits_processors)
        if not callable(sample):
            raise EdgeError(f"sampler must be a callable (logits -> token id), got {sampler!r}")
        ids = fit_prompt(ids, self.context, max_new_tokens, self.overflow, n_keep)
        ids = check_ids(ids, self.bundle.config.vocab_size)
        stats = GenerationStats(prompt_tokens=len(ids), load_s=self.load_s, backend=self._describe())
        claim = self._cache.claim()
        tokens = generate_tokens(self.backend, self._cache, ids, sample, processors, max_new_tokens,
                                 self.overflow, self.prefill_chunk, n_keep, stats,
                                 source=f"bundle {self.bundle.root}")

        def end(stream: ResponseStream) -> None:
            try:
                if on_end is not None:
                    on_end(ids, stream)
            finally:
                claim.release()

        stream = ResponseStream(tokens, self.tokenizer, stop_strings, stop_ids, self.eos_token_ids, stats, end)
        return stream

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [len(ids), vocab] float32 of every position: row i predicts the token after ids[:i+1]."""
        ids = check_ids(ids, self.bundle.config.vocab_size, self.context)
        with self._cache.claim():
            return scoring.logits(self.backend, self._cache, ids, self.prefill_chunk)

    def logprobs(self, text_or_ids: str | Sequence[int]) -> np.ndarray:
        """Per-token log-probs [n - 1] of a text (encoded as generate would, BOS included) or of token ids:
        entry i is log p(ids[i+1] | ids[:i+1])."""
        ids = self.tokenizer.encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
        ids = check_ids(ids, self.bundle.config.vocab_size, self.context)
        with self._cache.claim():
            return scoring.logprobs(self.backend, self._cache, ids, self.prefill_chunk)

    @property
    def reuse_decoded(self) -> bool:
        """Whether prefix reuse also takes keys/values written while decoding (faster next turns; logits then
        equal a fresh prefill's to rounding rather than exactly; see state.py). Default False."""
        return self._cache.reuse_decoded

    @reuse_decoded.setter
    def reuse_decoded(self, value: bool) -> None:
        self._cache.reuse_decoded = bool(value)

    def clear_cache(self) -> None:
        """Forget what the KV cache holds: the next call prefills its whole prompt."""
        with self._cache.claim():
            self._cache.truncate(0)

    def session(self, system: str | None = None) -> Session:
        """A conversation that keeps its KV cache between turns (see session.py)."""
        return Session(self, system)

    def load_session(self, path) -> Session:
        """A session saved by Session.save(path): its messages and KV state, checked against this model."""
        return Session.load(self, path)

    def _describe(self) -> str:
        name, note = self.backend.name, self.backend.describe()
        label = note if note.startswith(name) else f"{name}, {note}" if note else name
        return f"{label}, context {self.context}"
