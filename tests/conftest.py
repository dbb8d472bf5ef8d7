"""Shared fixtures: the real model's artefacts (tests/bundle_cache.py) and bundles of tiny random configs.

When the collected tests need real artefacts, a prefetcher builds them in a second process while the first tests
run (the suite itself runs on one core most of the time); a fixture that needs an entry first waits on its lock.
"""
from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_cache import CACHE, ROOT, gemma_tokenizer, locked, model, prune_stale
from bundle_cache import smollm2_bundle as build

from export.version import exporter_key

# What the prefetcher builds for a fixture the collected tests use, in the order the suite first needs them.
PREFETCH = {"smollm2_bundle": ["smollm2:int4", "smollm2:fp32", "smollm2:int8"],
            "gemma_tokenizer_json": ["gemma3:tokenizer"]}
_prefetcher: subprocess.Popen | None = None


@functools.cache
def pruned_cache() -> Path:
    """build/test-bundles/, pruned of other exporter versions' entries (once per run)."""
    with locked(CACHE / ".prune.lock"):
        prune_stale(CACHE, exporter_key())
    return CACHE


def start_prefetch(names: list[str]) -> None:
    global _prefetcher
    if _prefetcher is None and names:
        pruned_cache()
        _prefetcher = subprocess.Popen([sys.executable, str(ROOT / "tests/bundle_cache.py"), *names], cwd=ROOT,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_configure(config) -> None:
    """The whole suite needs every entry: start before collection (which spends seconds importing torch)."""
    whole = [Path(a).resolve() for a in config.args] == [ROOT / "tests"]
    if whole and not (config.option.keyword or config.option.markexpr or config.option.collectonly):
        start_prefetch([entry for entries in PREFETCH.values() for entry in entries])


def pytest_collection_finish(session) -> None:
    used = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    if not session.config.option.collectonly:
        start_prefetch([entry for fixture, entries in PREFETCH.items() if fixture in used for entry in entries])


def pytest_sessionfinish(session, exitstatus) -> None:
    """Stop a prefetcher still building what no remaining test needs (its export then cleans up after itself)."""
    if _prefetcher is not None and _prefetcher.poll() is None:
        _prefetcher.terminate()
        _prefetcher.wait()


@pytest.fixture(scope="session")
def bundle_cache() -> Path:
    """build/test-bundles/, pruned of other exporter versions' entries."""
    return pruned_cache()


@pytest.fixture(scope="session")
def real_model() -> Path:
    return model()


@pytest.fixture(scope="session")
def smollm2_bundle(real_model, bundle_cache):
    """smollm2_bundle("int4") -> path of the SmolLM2 bundle of that name (bundle_cache.SMOLLM2), exported on
    first use.

    Without the held-out evaluation (--no-eval): no test reads a real bundle's `fidelity` (tests/test_evaluate.py
    checks the evaluation on tiny models; bench/fidelity.py reports it for the real one). The reference probes
    that verify and cross-check run are kept."""
    key = exporter_key()
    return lambda name: build(name, key)


@pytest.fixture(scope="session")
def gemma_tokenizer_json(bundle_cache) -> str:
    """tokenizer.json of the real Gemma 3 GGUF (reading the 262k-piece vocabulary is the slow part)."""
    return gemma_tokenizer(exporter_key()).read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def smollm2_reference(real_model):
    """SmolLM2's float reference (transformers, fp32), built once for the tests that compare against it."""
    from export.quality.reference import FloatReference
    from export.sources import load_source

    return FloatReference(load_source(str(real_model)), threads=1)


def export_in_process(source: str, out: Path, *args: str) -> Path:
    """`edge-export source --out out --quiet args` run by export.cli.export in this process (errors raise)."""
    from export import cli

    cli.export([source, "--out", str(out), "--quiet", *args])
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """tiny_bundle("tiny:llama", "int4") -> path of a bundle of a tiny random model (exported once per session,
    in this process: a tiny export is mostly torch's and transformers' imports, paid here once)."""
    root = tmp_path_factory.mktemp("tiny-bundles")

    def get(spec: str = "tiny:llama", quant: str = "fp32", *args: str) -> Path:
        tag = "-".join([spec.replace(":", "_"), quant, *[a.lstrip("-") for a in args]])
        out = root / tag
        if not (out / "manifest.json").is_file():
            export_in_process(spec, out, "--quant", quant, *args)
        return out

    return get
