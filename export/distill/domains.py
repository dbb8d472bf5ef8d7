"""Where distillation text comes from: the teacher's training prompts and the held-out evaluation domains.

Every domain names its source; the training sources (prompts the teacher answers or continues) and the evaluation
sources (public text shipped with Python and numpy) are disjoint by construction and by test, so the evaluation
measures how the student behaves on text it never saw, not how well it memorized its training set.
"""
from __future__ import annotations

import ast
import importlib.util
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..version import module_file


@dataclass(frozen=True)
class Domain:
    name: str
    source: str  # where the text comes from; no source is both trained on and evaluated on
    load: Callable[[], list[str]]


# Text starts from several domains: the teacher continues each one (sampled), a document the student learns from.
TEXT_STARTS = (
    "Once upon a time, in a small village by the sea,",
    "The old lighthouse keeper had not seen a ship in years. One stormy night",
    "BREAKING NEWS: City council approves a new plan to",
    "Scientists have discovered that the migration of birds",
    "How to bake sourdough bread at home\n\nIngredients:\n",
    "Dear Sarah,\n\nThank you for your letter. I wanted to tell you",
    "The Industrial Revolution began in Britain in the late eighteenth century because",
    "Photosynthesis is the process by which plants",
    "Chapter 1\n\nThe train was late again, and Maria",
    "Review: This laptop is",
    "In mathematics, a prime number is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Top 10 tips for staying productive when working from home:\n1.",
    "The human heart has four chambers.",
    "Meeting notes, Monday\n\nAttendees: Tom, Priya, Lee\n\n1.",
    "The volcano erupted without warning, and",
    "Welcome to our beginner's guide to gardening. First,",
    "In 1969, astronauts landed on the Moon.",
    "Q: Why is the sky blue?\nA:",
    "A recipe for a quick vegetable soup:",
    "The economy of ancient Rome depended on",
    "function add(a, b) {\n  return a + b;\n}\n\n// Now let's write a function that",
    "My favorite childhood memory is",
    "Climate change affects ocean currents by",
)

# Chat prompts, rendered with the teacher's chat template; the teacher's answer is the training text.
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Explain what a black hole is to a ten-year-old.",
    "Give me three ideas for a healthy breakfast.",
    "How do I reverse a list in Python?",
    "What are the main causes of the First World War?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Can you help me write an email asking for a day off?",
    "What is the difference between weather and climate?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Why do cats purr?",
    "List the planets of the solar system in order.",
    "What is machine learning?",
    "Tell me a joke about computers.",
    "How can I improve my sleep?",
    "What does DNA stand for and what does it do?",
    "Write a haiku about the ocean.",
    "What is 15% of 240? Show your steps.",
    "Suggest a name for a small coffee shop.",
    "How does a bicycle stay upright?",
    "What are some tips for learning a new language?",
    "Explain recursion with a simple example.",
    "Who was Marie Curie?",
    "What should I pack for a weekend hiking trip?",
)

# Chat prompts of the evaluation: the student never trains on these questions nor on the teacher's answers.
EVAL_CHAT_PROMPTS = (
    "What is the tallest mountain in the world?",
    "Give me a simple recipe for pancakes.",
    "Explain how a rainbow forms.",
    "What are the benefits of regular exercise?",
    "Write a two-line poem about the moon.",
    "How do I open a file in Python?",
    "What is the boiling point of water?",
    "Why do leaves change color in autumn?",
)


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


# Standard-library modules whose source is the code domain (plain Python, comments and docstrings).
CODE_MODULES = ("textwrap", "csv", "fractions", "shlex", "calendar", "heapq", "bisect", "colorsys", "string",
                "difflib")


def _stdlib_code() -> list[str]:
    return [Path(importlib.util.find_spec(m).origin).read_text(encoding="utf-8") for m in CODE_MODULES]


def _licenses() -> list[str]:
    """Legal English: CPython's LICENSE (with the history of Python) and numpy's bundled licenses."""
    import numpy

    files = [Path(sysconfig.get_path("stdlib")) / "LICENSE.txt"]
    files += sorted(Path(numpy.__file__).parent.parent.glob("numpy-*.dist-info/licenses/LICENSE.txt"))
    return [f.read_text(encoding="utf-8") for f in files if f.is_file()]


EVAL_DOMAINS = (
    Domain("python-docs", "cpython:pydoc_data.topics", _pydoc_topics),
    Domain("python-code", "cpython:stdlib-source", _stdlib_code),
    Domain("licenses", "cpython+numpy:LICENSE.txt", _licenses),
)

# Public text shipped with the export environment's third-party packages (never CPython's or numpy's, the
# evaluation's sources, nor edge-runtime's own README, which changes with every commit): their READMEs, their
# license files, the source of some pure-Python modules and the docstrings of other modules of several packages.
PUBLIC_MODULES = ("tqdm.std", "packaging.version", "packaging.specifiers", "requests.models", "requests.sessions",
                  "jinja2.lexer", "pluggy._manager", "filelock._api", "idna.core", "dateutil.relativedelta",
                  "yaml.constructor", "anyio._core._fileio", "networkx.classes.graph", "sympy.core.basic",
                  "pygments.lexer", "pyparsing.core", "fsspec.spec", "huggingface_hub.file_download",
                  "torch.optim.adamw", "torch.nn.modules.module", "matplotlib.colors", "PIL.Image",
                  "h11._connection", "pydantic.fields", "mpmath.ctx_base", "onnx.helper", "jinja2.environment",
                  "optimum.exporters.tasks")
DOC_PACKAGES = ("networkx", "sympy", "matplotlib", "torch", "transformers", "huggingface_hub", "pydantic", "fsspec",
                "pygments", "pyparsing", "mpmath", "onnx", "PIL", "jinja2", "optimum", "dateutil", "anyio", "tqdm")
DOC_MIN_CHARS = 200  # shorter docstrings are mostly one-line summaries
PUBLIC_CHARS = {"readmes": 240_000, "licenses": 120_000, "code": 240_000, "docs": 300_000}  # per kind, characters
PUBLIC_TEXT_CHARS = 20_000  # at most this much of one text, so that a kind spans several packages
EXCLUDED_DISTRIBUTIONS = ("numpy", "edge-runtime")


def _capped(texts, budget: int) -> list[str]:
    """Distinct texts in order until `budget` characters (the last one cut to fit)."""
    out, seen, used = [], set(), 0
    for t in texts:
        t = t.strip()
        if not t or t in seen or used >= budget:
            continue
        seen.add(t)
        out.append(t[: min(budget - used, PUBLIC_TEXT_CHARS)])
        used += len(out[-1])
    return out


def _distributions():
    from importlib.metadata import distributions

    found = {(d.metadata["Name"] or "").lower(): d for d in distributions()}
    return [found[n] for n in sorted(found) if n and n not in EXCLUDED_DISTRIBUTIONS]


def _module_file(module: str) -> Path | None:
    """A third-party module's source file, found without importing it (importing torch takes seconds)."""
    return module_file(module, Path(sysconfig.get_path("purelib")))


def _docstrings(path: Path) -> list[str]:
    """The module, class and function docstrings of one source file that have DOC_MIN_CHARS or more."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds))
    return [d for d in docs if d and len(d) >= DOC_MIN_CHARS]


def _package_docs(package: str, budget: int, skip: set[Path]) -> list[str]:
    """Docstrings of `package`'s modules (sorted paths, tests and `skip` left out) until `budget` characters."""
    root = _module_file(package)
    if root is None or root.name != "__init__.py":
        return []
    out, used = [], 0
    for f in sorted(root.parent.rglob("*.py")):
        if used >= budget:
            break
        if f in skip or "tests" in f.relative_to(root.parent).parts:
            continue
        for doc in _docstrings(f):
            out.append(doc)
            used += len(doc)
    return out


def _round_robin(groups: list[list[str]]) -> list[str]:
    """The first item of every group, then every second one, ...: a budget cut anywhere spans all groups."""
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def public_texts() -> dict[str, list[str]]:
    """{kind: texts} of the public training text, each kind within its PUBLIC_CHARS budget."""
    dists = _distributions()
    readmes = [d.metadata.get_payload() or "" for d in dists]
    licenses = [Path(f.locate()).read_text(encoding="utf-8", errors="replace") for d in dists
                for f in (d.files or ()) if f.name.upper().startswith(("LICENSE", "COPYING"))
                and ".dist-info" in str(f.parent) and Path(f.locate()).is_file()]
    files = [f for f in map(_module_file, PUBLIC_MODULES) if f is not None]
    code = [f.read_text(encoding="utf-8") for f in files]
    share = PUBLIC_CHARS["docs"] // len(DOC_PACKAGES) + 1
    docs = _round_robin([_package_docs(p, share, set(files)) for p in DOC_PACKAGES])
    kinds = {"readmes": readmes, "licenses": licenses, "code": code, "docs": docs}
    return {k: _capped(v, PUBLIC_CHARS[k]) for k, v in kinds.items()}


TRAIN_SOURCES = ("teacher:text-starts", "teacher:chat-prompts", "site-packages:readmes",
                 "site-packages:licenses", "site-packages:source",
                 "site-packages:docstrings")
EVAL_SOURCES = tuple(d.source for d in EVAL_DOMAINS) + ("distill:eval-chat-prompts",)


def eval_domain(name: str) -> Domain:
    for d in EVAL_DOMAINS:
        if d.name == name:
            return d
    raise ValueError(f"unknown evaluation domain {name!r}: one of {[d.name for d in EVAL_DOMAINS]}")
