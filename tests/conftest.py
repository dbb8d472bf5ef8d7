"""Shared fixtures: exported bundles of the real model (SmolLM2-135M) and of tiny random configs.

Real bundles are exported once per version of the exporter code (export.version.exporter_key: the syntax of every
module edge-export may import) into build/test-bundles/ and reused by every test file and by later runs while that
code is unchanged; entries of other versions are deleted when the suite starts using the cache.
"""
from __future__ import annotations

import contextlib
import fcntl
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.version import exporter_key

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = ROOT / "build/test-bundles"


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on `path` (created if missing): two test runs of one checkout share the bundle cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def export(source: str, out: Path, *args: str) -> Path:
    with locked(out.parent / f".{out.name}.lock"):
        if not (out / "manifest.json").is_file():
            cmd = [sys.executable, "-m", "export.cli", source, "--out", str(out), "--quiet", *args]
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
            if p.returncode != 0:
                raise RuntimeError(f"export failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return out


def prune_stale(cache: Path, key: str) -> list[str]:
    """Delete the cached bundles and files of other exporter versions (names ending in -KEY or -KEY.json)."""
    removed = []
    for entry in sorted(cache.glob("*")) if cache.is_dir() else []:
        m = re.search(r"-([0-9a-f]{10})(\.json|\.lock)?$", entry.name)
        if m and m.group(1) != key:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            removed.append(entry.name)
    return removed


@pytest.fixture(scope="session")
def bundle_cache() -> Path:
    """build/test-bundles/, pruned of other exporter versions' entries."""
    with locked(CACHE / ".prune.lock"):
        prune_stale(CACHE, exporter_key())
    return CACHE


@pytest.fixture(scope="session")
def real_model() -> Path:
    if not MODEL.is_file():
        from export.sources.fetch import default_model_path

        default_model_path(ROOT / "cache")
    return MODEL


@pytest.fixture(scope="session")
def smollm2_bundle(real_model, bundle_cache):
    """smollm2_bundle("int4") -> path of the SmolLM2 bundle of that preset (exported on first use).

    Without the held-out evaluation (--no-eval): no test reads a real bundle's `fidelity` (tests/test_evaluate.py
    checks the evaluation on tiny models; bench/fidelity.py reports it for the real one). The reference probes
    that verify and cross-check run are kept."""
    key = exporter_key()

    def get(quant: str, *args: str) -> Path:
        tag = "-".join([quant, *[a.lstrip("-") for a in args]])
        return export(str(real_model), bundle_cache / f"smollm2-{tag}-{key}", "--quant", quant, "--no-eval", *args)

    return get


@pytest.fixture(scope="session")
def smollm2_reference(real_model):
    """SmolLM2's float reference (transformers, fp32), built once for the tests that compare against it."""
    from export.quality.reference import FloatReference
    from export.sources import load_source

    return FloatReference(load_source(str(real_model)), threads=1)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """tiny_bundle("tiny:llama", "int4") -> path of a bundle of a tiny random model (exported once per session)."""
    root = tmp_path_factory.mktemp("tiny-bundles")

    def get(spec: str = "tiny:llama", quant: str = "fp32", *args: str) -> Path:
        tag = "-".join([spec.replace(":", "_"), quant, *[a.lstrip("-") for a in args]])
        return export(spec, root / tag, "--quant", quant, *args)

    return get
