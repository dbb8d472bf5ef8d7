"""A fingerprint of the code that shapes a bundle, so cached bundles (tests, benchmarks) are never stale."""
from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def exporter_key() -> str:
    h = hashlib.sha256()
    files = sorted((ROOT / "export").rglob("*.py")) + [ROOT / "edge_runtime" / n
                                                        for n in ("quant.py", "config.py", "bundle.py")]
    for f in files:
        if "distill" not in f.parts:
            h.update(f.read_bytes())
    return h.hexdigest()[:10]


def ensure_bundle(source: str, out: Path, *args: str) -> Path:
    """Export `source` to `out` unless a bundle made by this exact exporter code is already there."""
    import subprocess
    import sys

    stamp = out / ".exporter-key"
    key = exporter_key()
    if (out / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == key:
        return out
    print(f"exporting {out} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "export.cli", source, "--out", str(out), "--quiet", "--overwrite", *args],
                   check=True, cwd=ROOT)
    stamp.write_text(key)
    return out
