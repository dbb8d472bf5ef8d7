"""The one streaming form: an iterator of Response objects (text piece, token id, its log-prob; the last one
also carries finish_reason and stats) over the token generator, with incremental detokenization, stop strings
and ids, and EOS handling."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from ..tokenizer.tokenizer import StreamDecoder, Tokenizer
from .generate import Generation, held_back
from .stats import MB, GenerationStats, peak_rss_bytes


@dataclass
class Response:
    """One step of a stream. `text` may be "" (held back: a possible stop string or a split UTF-8 character);
    the pieces joined are the whole answer. The last response has finish_reason ("eos" | "stop" | "length")
    and the stats; its token is the EOS or stop id that ended the answer, or None."""

    text: str
    token: int | None
    logprob: float | None   # natural log-probability of `token` under the model (before sampling settings)
    finish_reason: str | None = None
    stats: GenerationStats | None = None


@dataclass
class _Outcome:
    """What a stream has produced so far; shared with the generator without referring back to the stream
    (no reference cycle, so an abandoned stream is closed, and its claim on the model released, at once)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)


class ResponseStream:
    """Iterator of Response. During and after iteration: .text, .token_ids, .logprobs, .finish_reason, .stats.

    It holds the model's KV cache until it ends: read it to the end, or close() it (leaving a `for` loop
    early and dropping the stream closes it too). on_end(stream) runs once when it ends.
    """

    def __init__(self, tokens: Iterator[tuple[int, float]], tokenizer: Tokenizer, stop: Sequence[str] = (),
                 stop_ids: Iterable[int] = (), eos_ids: Iterable[int] = (),
                 stats: GenerationStats | None = None, on_end: Callable[[ResponseStream], None] | None = None):
        self._out = _Outcome(stats=stats if stats is not None else GenerationStats())
        self._tokens = tokens
        self._on_end = on_end
        self._run = _responses(tokens, StreamDecoder(tokenizer), tuple(stop), frozenset(stop_ids),
                               frozenset(eos_ids), self._out)

    def __iter__(self) -> ResponseStream:
        return self

    def __next__(self) -> Response:
        try:
            return next(self._run)
        except BaseException:
            self.close()
            raise

    def collect(self) -> Generation:
        """Read the stream to its end and return the whole answer."""
        for _ in self:
            pass
        return Generation(self.text, self.token_ids, self.finish_reason or "length", self.stats, self.logprobs)

    def close(self) -> None:
        """Stop early: no more forward passes run, and the model is free for the next generation."""
        self._run.close()
        close = getattr(self._tokens, "close", None)
        if close is not None:
            close()
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(self)

    def __del__(self) -> None:
        if hasattr(self, "_run"):
            self.close()

    @property
    def text(self) -> str:
        return "".join(self._out.pieces)

    @property
    def token_ids(self) -> list[int]:
        """Every sampled id, including a final EOS or stop id (whose text is not in `text`)."""
        return self._out.token_ids

    @property
    def logprobs(self) -> list[float]:
        """The log-prob of each of token_ids under the model."""
        return self._out.logprobs

    @property
    def finish_reason(self) -> str | None:
        return self._out.finish_reason

    @property
    def stats(self) -> GenerationStats:
        return self._out.stats


def _cut(pending: str, stops: Sequence[str], final: bool = False) -> tuple[str, str, bool]:
    """(text safe to emit, text to hold, whether a stop string was found)."""
    if not stops:
        return pending, "", False
    hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
    if hits:
        return pending[:min(hits)], "", True
    hold = 0 if final else held_back(pending, stops)
    return pending[:len(pending) - hold], pending[len(pending) - hold:], False


def _responses(tokens: Iterator[tuple[int, float]], decoder: StreamDecoder, stops: tuple[str, ...],
               stop_ids: frozenset, eos_ids: frozenset, out: _Outcome) -> Iterator[Response]:
    pending = ""  # decoded text not yet emitted because it may begin a stop string
    stats = out.stats
    t0 = time.perf_counter()
    t_first = None
    last: tuple[int | None, float | None] = (None, None)
    final, stopped_by_text = "", False
    try:
        for token, logprob in tokens:
            now = time.perf_counter()
            if t_first is None:
                t_first = now
                stats.prefill_s = now - t0
            stats.decode_s = now - t_first
            out.token_ids.append(token)
            out.logprobs.append(logprob)
            stats.new_tokens = len(out.token_ids)
            if token in eos_ids or token in stop_ids:
                out.finish_reason = "eos" if token in eos_ids else "stop"
                last = (token, logprob)
                break
            pending += decoder.push(token)
            piece, pending, hit = _cut(pending, stops)
            if hit:
                out.finish_reason, final, stopped_by_text = "stop", piece, True
                last = (token, logprob)
                break
            out.pieces.append(piece)
            yield Response(piece, token, logprob)
        else:
            out.finish_reason = "length"
        if not stopped_by_text:  # text held back for a stop string or an unfinished UTF-8 character
            final, _, hit = _cut(pending + decoder.flush(), stops, final=True)
            if hit:
                out.finish_reason = "stop"
        stats.peak_rss_mb = peak_rss_bytes() / MB
        out.pieces.append(final)
        yield Response(final, *last, finish_reason=out.finish_reason, stats=stats)
    finally:
        stats.peak_rss_mb = max(stats.peak_rss_mb, peak_rss_bytes() / MB)
