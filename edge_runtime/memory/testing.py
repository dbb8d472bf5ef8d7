"""Memory regression tests for users: run a generation session in a fresh process, read its peak RSS (VmHWM)
stage by stage, and compare it with the planner's budget.

    from edge_runtime.memory.testing import assert_generation_within_budget

    def test_fits_the_phone():
        assert_generation_within_budget("bundles/smollm2-int4", "200MB", prompt_tokens=500, new_tokens=128,
                                        context=2048)

A fresh subprocess is the only honest measure: the test runner's own imports and earlier tests would otherwise
count. With pytest, the `generation_budget` fixture (import it into a conftest.py) is the same call.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..generation.stats import MB, parse_size

STAGES = ("runtime", "tokenizer", "backend", "prefill", "decode")  # in the order the child measures them
CHILD_TIMEOUT_S = 1800


@dataclass
class Measurement:
    """What a fresh process used: peak RSS overall and the growth of the peak at each stage (bytes)."""

    peak: int
    stages: dict[str, int]          # stage -> bytes (see _stage_sizes), plus "load_transient"
    context: int
    kv_dtype: str
    backend: str
    prefill_chunk: int
    new_tokens: int
    slides: int = 0
    load_s: float = 0.0
    decode_tps: float | None = None
    rss_end: dict[str, int] = field(default_factory=dict)  # VmRSS, RssAnon, RssFile at the end

    def table(self) -> str:
        rows = [f"  {name:<15}{self.stages.get(name, 0) / MB:8.1f} MB" for name in STAGES + ("load_transient",)]
        return "\n".join(rows + [f"  {'peak':<15}{self.peak / MB:8.1f} MB"])


# -- the parent side ----------------------------------------------------------------------------------------------

def measure_generation(bundle, prompt_tokens: int, new_tokens: int, context: int | None = None,
                       backend: str = "auto", memory_budget: int | str | None = None,
                       kv_dtype: str | None = None, overflow: str = "error", threads: int | None = None,
                       timeout: float = CHILD_TIMEOUT_S) -> Measurement:
    """Load `bundle` and generate `new_tokens` after a `prompt_tokens`-token prompt in a fresh Python process."""
    spec = {"bundle": str(Path(bundle).resolve()), "prompt_tokens": int(prompt_tokens),
            "new_tokens": int(new_tokens), "context": context, "backend": backend,
            "memory_budget": None if memory_budget is None else parse_size(memory_budget),
            "kv_dtype": kv_dtype, "overflow": overflow, "threads": threads}
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.memory.testing", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise ChildError(f"the measuring process failed (exit {proc.returncode}): {tail[0]}", proc.stderr)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return Measurement(**out)


class ChildError(RuntimeError):
    def __init__(self, message: str, stderr: str = ""):
        super().__init__(message)
        self.stderr = stderr


def assert_generation_within_budget(bundle, budget: int | str, prompt_tokens: int, new_tokens: int,
                                    context: int | None = None, backend: str = "auto",
                                    overflow: str = "error", kv_dtype: str | None = None) -> Measurement:
    """Fail (AssertionError with the plan and the measured breakdown) unless a fresh process that loads `bundle`
    with memory_budget=`budget` and generates stays at or under `budget` peak RSS. Returns the measurement."""
    from ..format.bundle import Bundle
    from . import budget as planner

    limit = parse_size(budget)
    b = Bundle.open(bundle, verify=False)
    name = planner.resolve_backend(b, backend)
    plan = planner.plan(b, limit, context=context, backend=name, kv_dtype=kv_dtype)  # raises if it cannot fit
    m = measure_generation(bundle, prompt_tokens, new_tokens, context=plan.context, backend=name,
                           memory_budget=limit, kv_dtype=kv_dtype, overflow=overflow)
    if m.peak > limit:
        raise AssertionError(
            f"peak RSS {m.peak / MB:.1f} MB exceeds the budget of {limit / MB:.1f} MB "
            f"({prompt_tokens}-token prompt + {new_tokens} new tokens, context {m.context}, {m.backend}, "
            f"kv {m.kv_dtype})\nplan:\n{plan.table()}\nmeasured (growth of the peak per stage):\n{m.table()}")
    return m


if "pytest" in sys.modules:  # only under pytest (importing it would weigh on the measuring child)
    import pytest

    @pytest.fixture
    def generation_budget():
        """The assert_generation_within_budget function (import this fixture into your conftest.py)."""
        return assert_generation_within_budget


# -- the child side -----------------------------------------------------------------------------------------------

def _status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in bytes (Linux /proc)."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def text_prompt_ids(tokenizer, n: int, special: Iterable[int] = ()) -> list[int]:
    """n ids of English text (CPython's pydoc topics, repeated if need be), deterministic.

    Text rather than random ids: a quantized embedding is read in place from the mapped weights file, so the
    pages a prompt brings in depend on how many distinct tokens it holds, and text is what prompts are.
    """
    from pydoc_data.topics import topics

    skip = set(special)
    text = "\n".join(topics[k] for k in sorted(topics))
    ids: list[int] = []
    start = 0
    while len(ids) < n:
        piece = text[start:start + 8 * (n - len(ids)) + 64] or text
        start = (start + len(piece)) % len(text)
        ids += [i for i in tokenizer.encode(piece, add_bos=False) if i not in skip]
    return ids[:n]


def _child(spec: dict) -> dict:
    """Measure one session in this (fresh) process; the stage marks are taken around the real load() path."""
    marks = [(0, 0)]  # (peak during the stage, RSS at its end); the first stage counts the interpreter itself

    def mark():
        st = _status()
        marks.append((st["VmHWM"], st["VmRSS"]))
        _reset_peak()  # so the next stage's VmHWM is its own peak, not an earlier stage's


    import edge_runtime
    from edge_runtime import backends
    from edge_runtime.generation.generate import fit_prompt, generate_tokens
    from edge_runtime.generation.sampling import make_sampler
    from edge_runtime.generation.stats import GenerationStats
    from edge_runtime.sessions.state import CacheState

    from . import budget as planner
    planner.import_runtime_libraries(spec["backend"])  # what a real app has imported before it loads a model
    mark()  # runtime

    real_make = backends.make_backend

    def mark_then_backend(*a, **k):
        mark()  # tokenizer (load() builds it before the backend)
        return real_make(*a, **k)

    backends.make_backend = mark_then_backend
    t0 = time.perf_counter()
    try:
        model = edge_runtime.load(spec["bundle"], backend=spec["backend"], context=spec["context"],
                                  memory_budget=spec["memory_budget"], kv_dtype=spec["kv_dtype"], verify=False,
                                  overflow=spec["overflow"], threads=spec["threads"])
    finally:
        backends.make_backend = real_make
    load_s = time.perf_counter() - t0
    mark()  # backend (and everything else load() does after the tokenizer)

    meta = model.bundle.manifest.get("tokenizer") or {}
    special = {int(t) for t in meta.get("eos_token_ids") or ()}
    ids = fit_prompt(text_prompt_ids(model.tokenizer, spec["prompt_tokens"], special), model.context,
                     spec["new_tokens"], model.overflow)
    stats = GenerationStats()
    tokens = generate_tokens(model.backend, CacheState(), ids, make_sampler(0.0, 0, 1.0, 0.0, None), (),
                             spec["new_tokens"], model.overflow, model.prefill_chunk, 0, stats)
    n = 0
    for n, _ in enumerate(tokens, 1):
        if n == 1:
            mark()  # prefill
            t1 = time.perf_counter()
    decode_s = time.perf_counter() - t1 if n else 0.0
    if n == 0:
        mark()
    mark()  # decode
    end = _status()
    return {"peak": max(hwm for hwm, _ in marks), "stages": _stage_sizes(marks),
            "context": model.context, "kv_dtype": getattr(model.backend, "kv_dtype", "float32"),
            "backend": model.backend.name, "prefill_chunk": model.prefill_chunk, "new_tokens": n,
            "slides": stats.slides, "load_s": load_s,
            "decode_tps": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
            "rss_end": {k: v for k, v in end.items() if k != "VmHWM"}}


def _reset_peak() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0: writing 5 to clear_refs); a no-op where refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def _stage_sizes(marks: list[tuple[int, int]]) -> dict[str, int]:
    """Bytes per stage: what it left resident (RSS growth), except prefill, whose size is its peak over what
    was resident before it (activations come and go; the KV cache was committed at load). load_transient is
    how far load() peaked above what it kept (ONNX Runtime prepacking)."""
    out = {}
    for i, name in enumerate(STAGES):
        (_, rss0), (hwm1, rss1) = marks[i], marks[i + 1]
        out[name] = hwm1 - rss0 if name == "prefill" else rss1 - rss0
    backend = marks[STAGES.index("backend") + 1]
    out["load_transient"] = max(0, backend[0] - backend[1])
    return out

if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
