"""Where calibration and evaluation text come from: one calibration source, several evaluation domains unlike it.

Calibration (activation statistics, GPTQ inputs, sensitivities) reads CPython's pydoc topics: Python reference
prose with code. Evaluation never reads it: it scores the bundle on domains of other sources, each reported on
its own, so a recipe fitted to the calibration text cannot look better than it is on text it never saw.
Every source ships with the interpreter or inside a runtime dependency's wheel, so an export needs no download.
"""
from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CALIBRATION_SOURCE = "pydoc_data.topics"

# Standard-library modules whose source is the code domain: plain Python, comments and docstrings.
CODE_MODULES = ("argparse", "textwrap", "heapq", "fractions", "difflib", "calendar")

# Chat prompts of the chat domain: the float model's greedy replies to them are scored, and their top-1
# agreement is the bundle's greedy agreement with the float model on chat, token by token.
CHAT_PROMPTS = (
    "Give me three tips for a good night's sleep.",
    "Write a short story about a lighthouse keeper and a storm.",
    "How do I make a simple tomato soup?",
    "Explain photosynthesis to a ten-year-old.",
    "What should I pack for a weekend hiking trip?",
    "Write a polite email asking my landlord to fix the heating.",
)
CHAT_REPLY_TOKENS = 96


@dataclass(frozen=True)
class Domain:
    """One evaluation domain: a name for reports and the manifest, where its text comes from, and its text."""

    name: str
    source: str
    text: Callable[[], str]


def calibration_text() -> str:
    """CPython's pydoc topics in key order (the bundle's probe window included: verify is not an evaluation)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def license_text() -> str:
    """Legal English: the license texts shipped in the numpy and onnxruntime wheels (runtime dependencies)."""
    parts = []
    for dist in ("numpy", "onnxruntime"):
        files = importlib.metadata.distribution(dist).files or []
        for f in sorted(files, key=str):
            name = str(f).rsplit("/", 1)[-1].lower()
            if name.startswith(("license", "thirdpartynotices")) and name.endswith((".txt", "license")):
                parts.append(f.locate().read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(parts)


def code_text() -> str:
    """Python source code of a few standard-library modules."""
    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in CODE_MODULES)


def chat_marker() -> str:
    """The chat domain has no fixed text: its windows are the float model's replies (see chat_windows)."""
    return "\n".join(CHAT_PROMPTS)


DOMAINS: tuple[Domain, ...] = (
    Domain("licenses", "license texts in the numpy and onnxruntime wheels", license_text),
    Domain("code", "CPython standard-library source: " + ", ".join(CODE_MODULES), code_text),
    Domain("chat", "the float model's greedy replies to chat prompts, with the chat template", chat_marker),
)
TEXT_DOMAINS = tuple(d for d in DOMAINS if d.name != "chat")


def chat_windows(encode_chat: Callable[[str], list[int]],
                 greedy_batch: Callable[[list[list[int]], int], list[list[int]]],
                 reply_tokens: int = CHAT_REPLY_TOKENS, prompts: Sequence[str] = CHAT_PROMPTS) -> list[list[int]]:
    """One window per chat prompt: its ids rendered with the chat template, then the float model's greedy reply.

    greedy_batch(prompts' ids, n) -> for each, up to n greedy token ids after it (the float reference's)."""
    ids = [list(encode_chat(text)) for text in prompts]
    return [p + [int(t) for t in reply] for p, reply in zip(ids, greedy_batch(ids, reply_tokens))]
