"""Loading a bundle into a ready-to-run Model (tokenizer, backend, context policy) and its generate() call."""
from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Union

import numpy as np

from . import backends, budget, chat, pages
from .bundle import Bundle
from .errors import ContextOverflowError, EdgeError, EdgeWarning, SamplingError
from .generate import (
    PREFILL_CHUNK,
    Generation,
    TextStream,
    check_overflow,
    fit_prompt,
    generate_tokens,
    split_stop,
)
from .sampling import make_logits_processors, make_sampler, validate
from .stats import GenerationStats, parse_size
from .tokenizer import Tokenizer

DEFAULT_CONTEXT = 2048  # until the memory planner chooses one from the budget
MAX_DEFAULT_THREADS = 4  # beyond the big cores of a phone, more threads only add contention

Prompt = Union[str, Sequence[Mapping[str, str]]]
Stop = Union[str, int, Iterable[Union[str, int]], None]


def available_cpus() -> int:
    """The CPUs this process may actually use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    return min(available_cpus(), MAX_DEFAULT_THREADS)


def check_threads(threads: int | None) -> int:
    """The thread count to run with: default_threads() for None, else `threads` capped at available_cpus()
    (more threads than CPUs only add contention and per-thread buffers), with an EdgeWarning saying so."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise EdgeError(f"threads must be a positive integer, got {threads!r}")
    cpus = available_cpus()
    if threads > cpus:
        warnings.warn(EdgeWarning(f"threads {threads} capped at {cpus}, the CPUs available to this process"),
                      stacklevel=3)
        return cpus
    return threads


def _choose_context(bundle: Bundle, context: int | None, memory_budget, backend: str, kv_dtype):
    """(context, kv_dtype, prefill_chunk): from the memory planner when there is a budget, else as given."""
    if memory_budget is not None:
        plan = budget.plan(bundle, parse_size(memory_budget), context=context, backend=backend,
                           kv_dtype=kv_dtype)
        return int(plan.context), plan.kv_dtype, plan.prefill_chunk
    if context is None:
        return min(bundle.max_context, DEFAULT_CONTEXT), kv_dtype, PREFILL_CHUNK
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise EdgeError(f"context must be a positive number of tokens, got {context!r}")
    if context > bundle.max_context:
        raise ContextOverflowError(
            f"context {context} exceeds this bundle's max_context {bundle.max_context}")
    return context, kv_dtype, PREFILL_CHUNK


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
    threads = check_threads(threads)
    bundle = Bundle.open(bundle_path, verify=verify)
    limit = parse_size(memory_budget) if memory_budget is not None else None
    name = budget.resolve_backend(bundle, backend, limit, context, kv_dtype)  # "auto" under a budget: what fits
    # Planned before anything large (tokenizer, weights, KV cache) is allocated.
    context, kv_dtype, chunk = _choose_context(bundle, context, memory_budget, name, kv_dtype)
    opts = {"kv_dtype": kv_dtype} if kv_dtype is not None else {}
    engine = backends.make_backend(name, bundle, context, threads, **opts)
    # After the backend: its load transient (weights being prepacked) then peaks without the tokenizer on top.
    tokenizer = Tokenizer.from_bundle(bundle)
    pages.trim_heap()  # the tokenizer's parse garbage and the prepacking buffers ONNX Runtime freed
    return Model(bundle, tokenizer, engine, overflow=overflow, load_s=time.perf_counter() - t0,
                 prefill_chunk=chunk)


def check_seed_and_temperature(seed, temperature) -> None:
    """SamplingError unless seed is None or an integer >= 0 and temperature is finite."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise SamplingError(f"seed must be an integer >= 0, got {seed!r:.40}")
    if isinstance(temperature, (int, float)) and math.isinf(temperature):
        raise SamplingError("temperature must be finite")


class Model:
    """A loaded bundle: generate(prompt or messages) -> Generation, or a stream of text pieces."""

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
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode(self.apply_chat_template(prompt), add_bos=False)

    def generate(self, prompt: Prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: Stop = (), stream: bool = False
                 ) -> Generation | TextStream:
        """Continue `prompt`: a string, or chat messages [{"role", "content"}, ...] rendered by the template.

        Greedy when temperature == 0. `stop` holds strings (never emitted, matched across pieces) and/or token
        ids; the bundle's EOS ids always stop. stream=True returns a TextStream (iterate it for text pieces;
        .finish_reason, .token_ids and .stats fill in as it runs); otherwise a Generation.
        """
        validate(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens)
        check_seed_and_temperature(seed, temperature)
        stop_strings, stop_ids = split_stop(stop)
        vocab = self.bundle.config.vocab_size
        if any(not 0 <= i < vocab for i in stop_ids):
            raise SamplingError(f"stop token ids must be in 0..{vocab - 1}, got {sorted(stop_ids)}")
        ids = self.encode_prompt(prompt)
        room = self.context - min(max_new_tokens, self.context // 2)  # what fit_prompt keeps of a long prompt
        if not isinstance(prompt, str) and self.overflow != "error" and len(ids) > room:
            ids = chat.fit_messages(prompt, self.encode_prompt, room)  # whole old messages go first
        n_keep = int(self.tokenizer.bos_token_id is not None and ids[:1] == [self.tokenizer.bos_token_id])
        ids = fit_prompt(ids, self.context, max_new_tokens, self.overflow, n_keep)
        stats = GenerationStats(prompt_tokens=len(ids), load_s=self.load_s, backend=self._describe())
        tokens = generate_tokens(self.backend, ids, make_sampler(temperature, top_k, top_p, min_p, seed),
                                 make_logits_processors(repetition_penalty), max_new_tokens, self.overflow,
                                 self.prefill_chunk, n_keep, stats, source=f"bundle {self.bundle.root}")
        text = TextStream(tokens, self.tokenizer, stop_strings, stop_ids, self.eos_token_ids, stats)
        if stream:
            return text
        pieces = "".join(text)
        return Generation(pieces, text.token_ids, text.finish_reason, text.stats)

    def stream(self, prompt: Prompt, **kwargs) -> TextStream:
        """generate(..., stream=True)."""
        kwargs["stream"] = True
        return self.generate(prompt, **kwargs)

    def _describe(self) -> str:
        name, note = self.backend.name, self.backend.describe()
        label = note if note.startswith(name) else f"{name}, {note}" if note else name
        return f"{label}, context {self.context}"
