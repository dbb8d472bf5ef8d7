"""The generation loop, in layers: a token generator (prefill, then one token per step, context policy), a
text stream on top (incremental detokenization, stop strings and ids, EOS, stats), and the plain result.

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

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ContextOverflowError, EdgeError
from .sampling import LogitsProcessor, Sampler, apply_processors
from .stats import MB, GenerationStats, peak_rss_bytes
from .tokenizer import StreamDecoder, Tokenizer

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


def prefill(backend, ids: Sequence[int], chunk: int = PREFILL_CHUNK) -> np.ndarray:
    """Run `ids` from position 0 in chunks; return the logits [V] after the last one.

    Every chunk asks for the logits of its last position only: earlier chunks' logits are unused, but an empty
    logits_index would hand some kernels a zero-row matmul, and one vocab row per chunk costs nothing.
    """
    for start in range(0, len(ids), chunk):
        part = np.asarray(ids[start:start + chunk], dtype=np.int64)  # [S]
        logits = backend.forward(part, start, np.array([part.size - 1], dtype=np.int64))  # [1, V]
    return logits[-1]


def generate_tokens(backend, prompt: Sequence[int], sampler: Sampler,
                    processors: Sequence[LogitsProcessor] = (), max_new_tokens: int = 256,
                    overflow: str = "error", prefill_chunk: int = PREFILL_CHUNK, n_keep: int = 0,
                    stats: GenerationStats | None = None, source: str = "the model") -> Iterator[int]:
    """Yield up to max_new_tokens sampled ids. Lazy: a token is fed to the model only when the next one is
    asked for, so a consumer that stops at EOS costs no extra forward pass. `prompt` must fit (fit_prompt).
    NonFiniteLogitsError (naming `source`) if the model's logits are NaN or infinite."""
    context = backend.context
    window = list(prompt)  # ids whose keys/values are in the cache, plus the one just sampled
    # every id so far, for processors: sized by the context, grown only as tokens actually come
    history = np.empty(len(prompt) + min(max_new_tokens, context), dtype=np.int64)
    history[:len(prompt)] = prompt
    n_seen = len(prompt)
    if max_new_tokens == 0:
        return
    logits = prefill(backend, window, prefill_chunk)
    for step in range(max_new_tokens):
        if processors:
            logits = apply_processors(processors, history[:n_seen], logits)
        token = _sample(sampler, logits, source)
        if n_seen == history.size:
            history = np.concatenate([history, np.empty_like(history)])
        history[n_seen] = token
        n_seen += 1
        yield token
        if step == max_new_tokens - 1:
            return
        window.append(token)
        if len(window) <= context:
            logits = backend.forward(np.array([token], dtype=np.int64), len(window) - 1, _LAST)[0]
        elif overflow == "slide":
            keep = max(1, context // 2)
            head = min(n_keep, keep - 1)
            window = window[:head] + window[len(window) - (keep - head):]
            logits = prefill(backend, window, prefill_chunk)
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


class TextStream:
    """Iterator of text pieces. After (or during) iteration: .token_ids, .finish_reason, .stats, .text."""

    def __init__(self, tokens: Iterator[int], tokenizer: Tokenizer, stop: Sequence[str] = (),
                 stop_ids: Iterable[int] = (), eos_ids: Iterable[int] = (),
                 stats: GenerationStats | None = None):
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stats = stats if stats is not None else GenerationStats()
        self._pieces: list[str] = []
        self._tokens = tokens
        self._decoder = StreamDecoder(tokenizer)
        self._stops = tuple(stop)
        self._stop_ids = frozenset(stop_ids)
        self._eos_ids = frozenset(eos_ids)
        self._run = self._pieces_of_text()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._run)

    def close(self) -> None:
        """Stop early (e.g. the consumer broke out of the loop): no more forward passes are run."""
        self._run.close()

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def _emit(self, piece: str) -> str:
        self._pieces.append(piece)
        return piece

    def _pieces_of_text(self) -> Iterator[str]:
        pending = ""  # decoded text not yet emitted because it may begin a stop string
        t0 = time.perf_counter()
        t_first = None
        try:
            for token in self._tokens:
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    self.stats.prefill_s = now - t0
                self.stats.decode_s = now - t_first
                self.token_ids.append(token)
                self.stats.new_tokens = len(self.token_ids)
                if token in self._eos_ids or token in self._stop_ids:
                    self.finish_reason = "eos" if token in self._eos_ids else "stop"
                    break
                pending += self._decoder.push(token)
                piece, pending, hit = self._cut(pending)
                if piece:
                    yield self._emit(piece)
                if hit:
                    self.finish_reason, pending = "stop", None
                    break
            else:
                self.finish_reason = "length"
            if pending is not None:  # text held back for a stop string or an unfinished UTF-8 character
                piece, _, hit = self._cut(pending + self._decoder.flush(), final=True)
                if hit:
                    self.finish_reason = "stop"
                if piece:
                    yield self._emit(piece)
        finally:
            close = getattr(self._tokens, "close", None)
            if close is not None:
                close()
            self.stats.peak_rss_mb = peak_rss_bytes() / MB

    def _cut(self, pending: str, final: bool = False) -> tuple[str, str, bool]:
        """(text safe to emit, text to hold, whether a stop string was found)."""
        if not self._stops:
            return pending, "", False
        hits = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            return pending[:min(hits)], "", True
        hold = 0 if final else held_back(pending, self._stops)
        return pending[:len(pending) - hold], pending[len(pending) - hold:], False
