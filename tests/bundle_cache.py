"""The cache of real-model test artefacts in build/test-bundles/: SmolLM2 bundles and the Gemma 3 tokenizer.

Entries are built once per version of the exporter code (export.version.exporter_key: the syntax of every module
edge-export may import) and reused by every test file and by later runs while that code is unchanged; entries of
other versions are deleted when the suite starts using the cache. Each entry is built under its own file lock, so
the test process and the prefetcher (`python tests/bundle_cache.py NAME...`, started by conftest.py when the
collected tests need real bundles) never build one entry twice: whoever comes second finds it done.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = ROOT / "build/test-bundles"

# The SmolLM2 bundles the suite uses, by name: the export flags after the source.
SMOLLM2 = {
    "int4": ("--quant", "int4"),
    "int8": ("--quant", "int8"),
    "fp32": ("--quant", "fp32", "--accuracy-level", "0"),
}


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on `path` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def on_parent_exit(sig: int) -> None:
    """Have the kernel send `sig` to this process when its parent exits (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG


def export(source: str, out: Path, *args: str) -> Path:
    """`edge-export source --out out args`, unless `out` already holds a bundle. The export is interrupted
    (and cleans up after itself) if the process that started it dies."""
    with locked(out.parent / f".{out.name}.lock"):
        if not (out / "manifest.json").is_file():
            cmd = [sys.executable, "-m", "export.cli", source, "--out", str(out), "--quiet", *args]
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                               preexec_fn=lambda: on_parent_exit(signal.SIGINT))
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


def model() -> Path:
    """The SmolLM2 GGUF, fetched into cache/ if missing."""
    if not MODEL.is_file():
        from export.sources.fetch import default_model_path

        default_model_path(ROOT / "cache")
    return MODEL


def smollm2_entry(name: str, key: str) -> tuple[Path, list[str]]:
    """Where the SmolLM2 bundle `name` (a key of SMOLLM2) is cached, and its export flags after the source:
    without the held-out evaluation (--no-eval)."""
    return CACHE / f"smollm2-{name}-{key}", [*SMOLLM2[name], "--no-eval"]


def smollm2_bundle(name: str, key: str) -> Path:
    """The SmolLM2 bundle `name`, exported (in a subprocess) unless cached."""
    out, flags = smollm2_entry(name, key)
    return export(str(model()), out, *flags)


def smollm2_bundles_here(names: list[str], key: str) -> None:
    """smollm2_bundle for each of `names` in turn, exported in this process: one read of the GGUF, one float model
    and one set of reference probes for all of them (export.pipeline.Shared)."""
    from export.cli import build_parser, options_of
    from export.pipeline import Shared, export_bundle
    from export.sources import load_source

    source, shared = str(model()), None
    for name in names:
        out, flags = smollm2_entry(name, key)
        with locked(out.parent / f".{out.name}.lock"):
            if (out / "manifest.json").is_file():
                continue
            opts = options_of(build_parser().parse_args([source, "--out", str(out), "--quiet", *flags]))
            shared = shared or Shared(load_source(source))
            export_bundle(source, out, opts, shared)


def gemma_tokenizer(key: str) -> Path:
    """tokenizer.json built from the real Gemma 3 GGUF's vocabulary (the GGUF is fetched if missing)."""
    import gguf

    from export.sources.fetch import model_path
    from export.sources.gguf_tokenizer import tokenizer_from_gguf

    cached = CACHE / f"gemma3-tokenizer-{key}.json"
    with locked(cached.with_suffix(".lock")):
        if not cached.is_file():
            spec, _ = tokenizer_from_gguf(gguf.GGUFReader(model_path("gemma3", ROOT / "cache")).fields)
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(spec, encoding="utf-8")
            tmp.replace(cached)
    return cached


def prefetch(names: list[str]) -> None:
    """Build the entries `names` ("smollm2:int4", ..., "gemma3:tokenizer"), the SmolLM2 bundles first."""
    from export.version import exporter_key

    key = exporter_key()
    smollm2 = [name.partition(":")[2] for name in names if name.startswith("smollm2:")]
    if smollm2:
        smollm2_bundles_here(smollm2, key)
    if "gemma3:tokenizer" in names:
        gemma_tokenizer(key)


if __name__ == "__main__":
    # Second in line for the CPU, and gone with the test run that started it.
    os.nice(10)
    on_parent_exit(signal.SIGTERM)
    # SIGTERM (the test run ended or died) raises SystemExit: an export under way removes its staging folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sys.path.insert(0, str(ROOT))
    prefetch(sys.argv[1:])
