"""The generation loop, in layers: a token generator (prefill reusing the cached prefix, then one token per
step, context policy), a response stream on top (stream.py: detokenization, stop strings and ids, EOS, stats),
and the plain result.

Context policy. The KV cache holds `context` tokens and the model must read every token it conditions on, i.e.
the prompt and every generated token but the last: a generation of N tokens after a P-token prompt needs
P + N - 1 <= context. `overflow` says what happens otherwise:

* "error":    raise ContextOverflowError before any work if it cannot fit;
* "truncate": a too-long prompt keeps its last part (room for min(N, context/2) new tokens; a leading BOS is
              kept); generation stops with finish_reason "length" when the cache is full;
* "slide":    like truncate for the prompt; when the cache is full, keep the last half of the tokens and
              prefill them again from position 0 (valid because RoPE attention depends only on relative
              positions). The cache is reused in place, never reallocated.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ContextOverflowError, EdgeError
from ..sessions.state import CacheState
from .sampling import LogitsProcessor, Sampler, apply_processors
from .stats import GenerationStats

OVERFLOW_POLICIES = ("error", "truncate", "slide")
PREFILL_CHUNK = 128  # tokens per prefill pass: see budget.PREFILL_CHUNKS for the speed/memory trade
_LAST = np.zeros(1, dtype=np.int64)  # logits_index of a one-token step
_LAST.flags.writeable = False


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # every sampled id, including a final EOS or stop id (whose text is not in `text`)
    finish_reason: str    # "eos" | "stop" | "length"
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: list[float] = field(default_factory=list)  # of each of token_ids under the model


def check_overflow(policy: str) -> str:
    if policy not in OVERFLOW_POLICIES:
        raise EdgeError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {policy!r}")
    return policy


def fit_prompt(ids: Sequence[int], context: int, max_new_tokens: int, overflow: str,
               n_keep: int = 0) -> list[int]:
    """Apply the context policy to the prompt (see the module docstring); `n_keep` leading ids always stay."""
    ids = list(ids)
    if not ids:
        raise EdgeError("the prompt is empty (no tokens to condition on)")
    needed = len(ids) + max(max_new_tokens - 1, 0)
    if overflow == "error" and needed > context:
        raise ContextOverflowError(
            f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens needs a context of {needed}, "
            f"the model has {context} (shorten the prompt, lower max_new_tokens, raise the context, "
            f"or set overflow to truncate or slide)")
    if len(ids) <= context:
        return ids
    keep = context - min(max_new_tokens, context // 2)
    n_keep = min(n_keep, keep - 1)
    return ids[:n_keep] + ids[len(ids) - (keep - n_keep):]


def forward(backend, cache: CacheState, ids: Sequence[int], past_len: int, logits_index) -> np.ndarray:
    """backend.forward, keeping `cache.ids` true: positions >= past_len are dropped before the pass (a failed
    pass leaves them half-written) and the new ids recorded after it."""
    cache.truncate(past_len)
    try:
        logits = backend.forward(np.asarray(ids, dtype=np.int64), past_len, logits_index)
    except BaseException:
        cache.failed(past_len)
        raise
    cache.append(ids, past_len)
    return logits


def prefill(backend, cache: CacheState, ids: Sequence[int], chunk: int = PREFILL_CHUNK,
            stats: GenerationStats | None = None) -> np.ndarray:
    """Bring the cache to hold `ids` and return the logits [V] after the last one.

    The longest common prefix with what the cache holds and may reuse (CacheState.reusable) is kept (at least
    the last id is run, for its logits; nothing when a ring no longer holds its keys: CacheState.resume_at);
    the rest runs in chunks. Every chunk asks for the logits of its last
    position only: earlier chunks' logits are unused, but an empty logits_index would hand some kernels a
    zero-row matmul.
    """
    start = cache.resume_at(min(cache.reusable(ids), len(ids) - 1))
    for s in range(start, len(ids), chunk):
        part = ids[s:s + chunk]  # [S]
        logits = forward(backend, cache, part, s, np.array([len(part) - 1], dtype=np.int64))  # [1, V]
    if stats is not None:
        stats.cached_tokens += start
        stats.prefilled_tokens += len(ids) - start
    return logits[-1]


def log_softmax_at(logits: np.ndarray, token: int) -> float:
    """log p(token) under logits [V] (float64 sums: the value is compared across backends and chunkings)."""
    z = logits.astype(np.float64)
    top = z.max()
    return float(z[token] - top - np.log(np.exp(z - top).sum()))


def generate_tokens(backend, cache: CacheState, prompt: Sequence[int], sampler: Sampler,
                    processors: Sequence[LogitsProcessor] = (), max_new_tokens: int = 256,
                    overflow: str = "error", prefill_chunk: int = PREFILL_CHUNK, n_keep: int = 0,
                    stats: GenerationStats | None = None, source: str = "the model"
                    ) -> Iterator[tuple[int, float]]:
    """Yield up to max_new_tokens (sampled id, its log-prob under the model's own distribution). Lazy: a token
    is fed to the model only when the next one is asked for, so a consumer that stops at EOS costs no extra
    forward pass. `prompt` must fit (fit_prompt); `n_keep` leading ids survive a slide.
    NonFiniteLogitsError (naming `source`) if the model's logits are NaN or infinite."""
    context = backend.context
    window = list(prompt)  # ids whose keys/values are in the cache, plus the one just sampled
    # every id so far, for processors: sized by the context, grown only as tokens actually come
    history = np.empty(len(prompt) + min(max_new_tokens, context), dtype=np.int64)
    history[:len(prompt)] = prompt
    n_seen = len(prompt)
    if max_new_tokens == 0:
        return
    logits = prefill(backend, cache, window, prefill_chunk, stats)
    for step in range(max_new_tokens):
        scored = apply_processors(processors, history[:n_seen], logits) if processors else logits
        token = int(_sample(sampler, scored, source))
        if n_seen == history.size:
            history = np.concatenate([history, np.empty_like(history)])
        history[n_seen] = token
        n_seen += 1
        yield token, log_softmax_at(logits, token)
        if step == max_new_tokens - 1:
            return
        window.append(token)
        if len(window) <= context:
            logits = forward(backend, cache, [token], len(window) - 1, _LAST)[0]
        elif overflow == "slide":
            keep = max(1, context // 2)
            head = min(n_keep, keep - 1)
            window = window[:head] + window[len(window) - (keep - head):]
            logits = prefill(backend, cache, window, prefill_chunk, stats)
            if stats is not None:
                stats.slides += 1
        else:
            return  # the cache is full: finish_reason "length"


class NonFiniteLogitsError(EdgeError):
    """The model computed NaN or infinite logits: a damaged bundle or a broken kernel, not a user error."""

    exit_code = 1


def _sample(sampler: Sampler, logits: np.ndarray, source: str) -> int:
    """sampler(logits), checking only the sampled logit (NaN wins an argmax, so a NaN row shows there; a
    sampler refusing NaN probabilities raises ValueError)."""
    try:
        token = sampler(logits)
        if np.isfinite(logits[token]):
            return token
    except ValueError:
        if np.isfinite(logits).all():
            raise
    raise NonFiniteLogitsError(f"{source} produced non-finite logits (NaN or inf): the bundle or a kernel is "
                               f"broken; check it with `edge-run verify`")


def split_stop(stop: str | int | Iterable[str | int] | None) -> tuple[tuple[str, ...], frozenset]:
    """stop strings and stop ids from one argument: a string, an id, or a mix of both in a sequence."""
    if stop is None:
        return (), frozenset()
    if isinstance(stop, (str, int, np.integer)):
        stop = (stop,)
    if not isinstance(stop, Iterable):
        raise EdgeError(f"stop must be a string, a token id or a sequence of them, got {stop!r:.40}")
    strings, ids = [], set()
    for s in stop:
        if isinstance(s, str):
            if not s:
                raise EdgeError("stop strings must not be empty")
            strings.append(s)
        elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
            ids.add(int(s))
        else:
            raise EdgeError(f"stop entries must be strings or token ids, got {s!r}")
    return tuple(strings), frozenset(ids)


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could be the start of a stop string (so must wait)."""
    longest = min(len(text), max((len(s) for s in stops), default=1) - 1)
    for k in range(longest, 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0
