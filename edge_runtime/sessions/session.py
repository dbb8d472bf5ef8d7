"""Chat sessions that keep their KV cache: each turn prefills only what is new since the last one.

A Session holds the conversation (system prompt, then user/assistant messages) and the ids the model's KV cache
held when its last answer ended. A turn renders the whole conversation with the chat template and runs it
through the model, whose prefix reuse (generate.prefill) skips every token the cache still holds: in a
conversation that alone uses the model, that is everything but the new turn. Sessions share their model's one
KV cache, so sessions used alternately re-prefill from where their conversations differ (still exact).

When a turn does not fit the context (overflow "slide" or "truncate"), the oldest whole turns are dropped;
the system prompt always stays, also through slides during an answer.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from ..errors import EdgeError
from ..generation.generate import prefill
from ..generation.stream import ResponseStream
from ..tokenizer.chat_template import check_messages
from . import session_file
from .state import common_prefix

if TYPE_CHECKING:
    from ..generation.generate import Generation
    from ..model import Model

Turn = Union[str, Mapping[str, str], Sequence[Mapping[str, str]]]


def drop_oldest_turn(history: list[dict]) -> list[dict] | None:
    """History without its first turn (a user message and what follows up to the next user message), or
    None when only the last turn is left."""
    for k in range(1, len(history)):
        if history[k]["role"] == "user":
            return history[k:]
    return None


class Session:
    """A conversation over one model: generate()/stream() continue it; reset(), save(path).

    Built by Model.session(system) or Model.load_session(path). One conversation takes one turn at a time:
    use a session from one thread at a time (the model itself may be shared, see state.py)."""

    def __init__(self, model: Model, system: str | None = None):
        if system is not None and not isinstance(system, str):
            raise EdgeError(f"system must be a string, got {system!r:.60}")
        self.model = model
        self.system = system
        self.messages: list[dict] = []  # the conversation after the system prompt
        self.cached_ids: list[int] = []  # what the KV cache held when this session's last answer ended

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages, self.cached_ids = [], []

    def head(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def generate(self, turn: Turn, max_new_tokens: int = 256, **options) -> Generation:
        """Continue the conversation with `turn` (a user message's text, a message, or messages) and return
        the whole answer, which joins the conversation. Options as for Model.stream."""
        return self.stream(turn, max_new_tokens, **options).collect()

    def stream(self, turn: Turn, max_new_tokens: int = 256, **options) -> ResponseStream:
        """generate() as a stream of Response objects; the answer joins the conversation when the stream
        ends (read to the end, or closed after at least one token)."""
        if self.model.chat_template is None:
            raise EdgeError("sessions need a bundle with a chat template")
        history = self.messages + _as_messages(turn)
        ids, history = self._fit(history, max_new_tokens)
        n_keep = self._n_keep(ids)

        def record(_prompt: list[int], stream: ResponseStream) -> None:
            if stream.token_ids:
                self.messages = history + [{"role": "assistant", "content": stream.text}]
                self.cached_ids = list(self.model._cache.ids)

        return self.model.stream_ids(ids, max_new_tokens, n_keep=n_keep, on_end=record, **options)

    def _encode(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.model.apply_chat_template(messages, add_generation_prompt)
        return self.model.tokenizer.encode(text, add_bos=False)

    def _fit(self, history: list[dict], max_new_tokens: int) -> tuple[list[int], list[dict]]:
        """The prompt ids of head + history, dropping the oldest turns while it does not fit (unless the
        overflow policy is "error", which then fails in fit_prompt)."""
        room = self.model.context - max(max_new_tokens - 1, 0)
        ids = self._encode(self.head() + history)
        while len(ids) > room and self.model.overflow != "error":
            shorter = drop_oldest_turn(history)
            if shorter is None:
                break  # the last turn alone is too long: fit_prompt cuts it
            history = shorter
            ids = self._encode(self.head() + history)
        return ids, history

    def _n_keep(self, ids: list[int]) -> int:
        """How many leading ids are the system prompt (kept through truncation and slides)."""
        if not self.system:
            return 0
        return common_prefix(ids, self._encode(self.head(), add_generation_prompt=False))

    def save(self, path) -> Path:
        """Write the conversation and its KV state to `path` (see session_file.py); returns the path."""
        model = self.model
        with model._cache.claim():
            cache = model._cache
            if self.cached_ids and common_prefix(cache.ids, self.cached_ids) < len(self.cached_ids):
                prefill(model.backend, cache, self.cached_ids, model.prefill_chunk)  # another user moved it
            ids = self.cached_ids if self.messages else []
            return session_file.save(path, model, ids, self.system, self.messages)

    @classmethod
    def load(cls, model: Model, path) -> Session:
        """The session saved at `path`, its KV state put back into the model's cache."""
        with model._cache.claim():
            saved = session_file.load(path, model)
        session = cls(model, saved.system)
        session.messages, session.cached_ids = saved.messages, saved.ids
        return session


def _as_messages(turn: Turn) -> list[dict]:
    if isinstance(turn, str):
        return [{"role": "user", "content": turn}]
    if isinstance(turn, Mapping):
        return check_messages([turn])
    return check_messages(list(turn))
