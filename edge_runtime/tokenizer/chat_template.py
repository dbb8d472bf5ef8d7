"""Rendering chat messages into a prompt with the bundle's Jinja2 chat template, inside a sandbox.

The environment mirrors Hugging Face's `apply_chat_template` (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a non-ASCII-escaping `tojson`) so templates render byte-identical prompts;
it is an ImmutableSandboxedEnvironment because the template is data from a file, with bounds on what one render
may cost (BoundedEnvironment): every call, filter, operator and loop step counts against RENDER_OPS and
RENDER_SECONDS, and no string, repetition, number argument or output may exceed RENDER_CHARS.
"""
from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from ..errors import EdgeError

RENDER_SECONDS = 2.0      # each bound is far above what a real chat template needs
RENDER_OPS = 1_000_000    # calls, filters, operators and range steps of one render
RENDER_CHARS = 4_000_000  # characters of any string built, repeated or output; magnitude of any int argument
MAX_RANGE = 100_000       # elements of one range()
MAX_EXPONENT = 4096
FIT_ATTEMPTS = 8          # re-renders fit_messages tries while shortening the oldest content
ROLES = ("system", "user", "assistant", "tool")
# A %-format or str.format field whose width or precision has RENDER_CHARS' digits or more.
_BIG_WIDTH = re.compile(r"%[-+ #0]*\d*\.?\d{7,}|\{[^{}]*:[^{}]*\d{7,}")


class ChatTemplateError(EdgeError):
    """The chat template is missing, does not compile, fails on these messages, or exceeds a render bound."""


class _Budget(threading.local):
    """The running render's deadline and operation count (one per thread: the compiled template is shared)."""

    deadline: float | None = None
    ops: int = 0


_budget = _Budget()


def _spend() -> None:
    if _budget.deadline is None:
        return
    _budget.ops += 1
    if _budget.ops > RENDER_OPS or time.monotonic() > _budget.deadline:
        raise ChatTemplateError(f"chat template exceeds its render bounds ({RENDER_OPS} operations or "
                                f"{RENDER_SECONDS:g} s)")


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > RENDER_CHARS:
        raise ChatTemplateError(f"chat template builds a value longer than {RENDER_CHARS} characters")
    return value


def _check_args(args, kwargs) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > RENDER_CHARS:
            raise ChatTemplateError(f"chat template passes a number larger than {RENDER_CHARS} to a function")


class _Range(Sequence):
    """range() for templates: at most MAX_RANGE elements, each loop step counted."""

    def __init__(self, *args):
        _check_args(args, {})
        self.r = range(*args)
        if len(self.r) > MAX_RANGE:
            raise ChatTemplateError(f"chat template asks for a range of {len(self.r)} elements "
                                    f"(at most {MAX_RANGE})")

    def __len__(self) -> int:
        return len(self.r)

    def __getitem__(self, i):
        return self.r[i]

    def __iter__(self):
        for i in self.r:
            _spend()
            yield i


def _bounded_filter(f):
    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def bounded(*args, **kwargs):
        _spend()
        _check_args(args[1:], kwargs)
        return _check_size(f(*args, **kwargs))
    return bounded


def _bounded_join(join):
    def bounded(seq):
        _spend()
        return _check_size(join(seq))
    return bounded


def check_messages(messages: Any) -> list[dict]:
    """A list of {"role": str, "content": str} dicts (extra keys such as tool calls pass through)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not (isinstance(m, Mapping) and all(isinstance(m.get(k), str) for k in ("role", "content"))):
            raise ChatTemplateError(f"message {i} must be a dict with string 'role' and 'content': {m!r:.60}")
        if m["role"] not in ROLES:
            raise ChatTemplateError(f"message {i} has role {m['role']!r:.40}: roles are {', '.join(ROLES)}")
    return [dict(m) for m in messages]


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment():
    """The sandboxed, bounded Jinja2 environment (built on first use: jinja2 is imported only for chat)."""
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2.utils import Namespace
    except ImportError:
        raise ChatTemplateError("chat prompts need the jinja2 package (or pass a raw prompt)") from None

    class BoundedNamespace(Namespace):
        def __setitem__(self, name, value):
            _spend()
            super().__setitem__(name, _check_size(value))

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
            _spend()
            _check_args(args, kwargs)
            target = getattr(__obj, "__wrapped__", __obj)
            if getattr(target, "__name__", "") in ("format", "format_map") and \
                    _BIG_WIDTH.search(str(getattr(target, "__self__", ""))):
                raise ChatTemplateError("chat template formats with a width or precision that is too large")
            return _check_size(super().call(__context, __obj, *args, **kwargs))

        def call_binop(self, context, operator, left, right):
            _spend()
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > RENDER_CHARS:
                        raise ChatTemplateError(f"chat template repeats a value past {RENDER_CHARS} characters")
            elif operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise ChatTemplateError(f"chat template raises to a power above {MAX_EXPONENT}")
            elif operator == "%" and isinstance(left, str) and _BIG_WIDTH.search(left):
                raise ChatTemplateError("chat template formats with a width or precision that is too large")
            return _check_size(super().call_binop(context, operator, left, right))

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, range=_Range,
                       namespace=BoundedNamespace)
    return env


@lru_cache(maxsize=8)
def compile_template(source: str):
    """Parse a template once (cached by its text)."""
    env = _environment()
    import jinja2

    try:
        template = env.from_string(source)
    except (jinja2.TemplateError, RecursionError, MemoryError, ValueError) as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from None
    # String concatenation (`~`) compiles to these two module-level helpers; bound them like every operator.
    scope = template.root_render_func.__globals__
    for name in ("str_join", "markup_join"):
        if name in scope:
            scope[name] = _bounded_join(scope[name])
    return template


def render(template: str | None, messages: Sequence[Mapping], special_tokens: Mapping[str, str] | None = None,
           add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages`; special_tokens supplies bos_token, eos_token, ... to the template."""
    if not template:
        raise ChatTemplateError("this bundle has no chat template: pass a raw prompt instead of messages")
    messages = check_messages(messages)
    compiled = compile_template(template)
    from jinja2 import TemplateError

    _budget.deadline, _budget.ops = time.monotonic() + RENDER_SECONDS, 0
    try:
        pieces, size = [], 0
        for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       **dict(special_tokens or {})):
            _spend()
            size += len(piece)
            if size > RENDER_CHARS:
                raise ChatTemplateError(f"chat template output exceeds {RENDER_CHARS} characters")
            pieces.append(piece)
        return "".join(pieces)
    except TemplateError as e:  # includes sandbox SecurityError and raise_exception(...)
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError,
            MemoryError, ZeroDivisionError, UnicodeError) as e:
        raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
    finally:
        _budget.deadline = None


def fit_messages(messages: Sequence[Mapping], encode: Callable[[list[dict]], list[int]], limit: int) -> list[int]:
    """Ids of the messages, rendered, in at most `limit` tokens where the template allows, keeping its
    structure: the oldest messages other than system ones and the last are dropped whole first, then the
    oldest part of the first remaining non-system message's content. May still exceed `limit` (a system
    prompt or the template's own text alone too long): the caller's token-level policy applies then."""
    msgs = [dict(m) for m in messages]
    ids = encode(msgs)
    while len(ids) > limit:
        droppable = [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"]
        if not droppable:
            break
        del msgs[droppable[0]]
        ids = encode(msgs)
    for _ in range(FIT_ATTEMPTS):
        i = next((i for i, m in enumerate(msgs) if m["role"] != "system"), None)
        if len(ids) <= limit or i is None or not msgs[i]["content"]:
            break
        content = msgs[i]["content"]
        chars_per_token = max(1.0, len(content) / max(1, len(ids)))
        cut = int((len(ids) - limit) * chars_per_token * 1.1) + 1
        msgs[i]["content"] = content[cut:]
        ids = encode(msgs)
    return ids
