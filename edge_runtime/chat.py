"""Rendering chat messages into a prompt with the bundle's Jinja2 chat template, inside a sandbox.

The environment mirrors Hugging Face's `apply_chat_template` (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a non-ASCII-escaping `tojson`) so templates render byte-identical prompts;
it is an ImmutableSandboxedEnvironment because the template is data from a file.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from .errors import EdgeError


class ChatTemplateError(EdgeError):
    """The chat template is missing, does not compile, or fails on these messages."""


def check_messages(messages: Any) -> list[dict]:
    """A list of {"role": str, "content": str} dicts (extra keys such as tool calls pass through)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not (isinstance(m, Mapping) and all(isinstance(m.get(k), str) for k in ("role", "content"))):
            raise ChatTemplateError(f"message {i} must be a dict with string 'role' and 'content': {m!r:.60}")
    return [dict(m) for m in messages]


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(source: str):
    """Parse a template once (cached by its text)."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("chat prompts need the jinja2 package (or pass a raw prompt)") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from None


def render(template: str | None, messages: Sequence[Mapping], special_tokens: Mapping[str, str] | None = None,
           add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages`; special_tokens supplies bos_token, eos_token, ... to the template."""
    if not template:
        raise ChatTemplateError("this bundle has no chat template: pass a raw prompt instead of messages")
    messages = check_messages(messages)
    compiled = compile_template(template)
    from jinja2 import TemplateError

    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **dict(special_tokens or {}))
    except TemplateError as e:  # includes sandbox SecurityError and raise_exception(...)
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
