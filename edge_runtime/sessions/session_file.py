"""The session file: a conversation and the KV state of its tokens, bound to one bundle and KV dtype.

    b"EDGESESS" | sha256 (64 hex digits) | header length (8 bytes, little-endian) | header JSON | payload

The checksum covers everything after it. The header holds the bundle's identity (its manifest's checksum),
the KV dtype, the token ids whose keys/values are saved, the conversation, and the shape and dtype of each
array, and how many leading ids came from prefill passes (state.CacheState.exact); the payload is those
arrays' raw bytes, in the order the backend reports them (Backend.kv_held: each array cut to the slots of the
saved positions along the position axis -2), and `kv_base`, the position in the first slot of a shifting
sliding-window buffer (ONNX Runtime's; 0 for every other cache). Nothing is ever unpickled or evaluated.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeError, SessionFileError
from ..format.manifest_checks import CHECKSUM_KEY
from ..tokenizer.chat_template import check_messages

MAGIC = b"EDGESESS"
FORMAT = 1
_DIGEST = 64
_LEN = struct.Struct("<Q")
MAX_HEADER = 64 << 20  # a header is ids and messages: far below this unless the file is damaged


@dataclass
class Saved:
    ids: list[int]
    system: str | None
    messages: list[dict]


def bundle_identity(bundle) -> str:
    """The manifest's own checksum: it covers the manifest, hence every file's sha256."""
    return str(bundle.manifest[CHECKSUM_KEY])


def kv_held(model, n: int, base: int | None = None) -> tuple[int, list[np.ndarray]]:
    held = getattr(model.backend, "kv_held", None)
    if held is None:
        raise SessionFileError(f"the {model.backend.name} backend cannot save or load sessions")
    return held(n, base)


def save(path, model, ids: list[int], system: str | None, messages: list[dict]) -> Path:
    """Write the file atomically (a temporary beside it, then renamed). The cache must hold `ids`."""
    base, arrays = kv_held(model, len(ids))
    header = {"format": FORMAT, "bundle": bundle_identity(model.bundle), "kv_dtype": str(arrays[0].dtype),
              "kv_base": base, "ids": [int(i) for i in ids], "exact": min(model._cache.exact, len(ids)),
              "system": system,
              "messages": messages,
              "arrays": [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in arrays]}
    head = json.dumps(header, ensure_ascii=False).encode("utf-8")
    digest = hashlib.sha256(_LEN.pack(len(head)) + head)
    for a in arrays:
        digest.update(np.ascontiguousarray(a).data)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + digest.hexdigest().encode("ascii") + _LEN.pack(len(head)) + head)
            for a in arrays:
                f.write(np.ascontiguousarray(a).data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SessionFileError(f"cannot write session file {path}: {e.strerror or e}") from None
    return path


def _read_header(path: Path, f, size: int, digest) -> dict:
    start = len(MAGIC) + _DIGEST
    lead = f.read(start + _LEN.size)
    if len(lead) < start + _LEN.size or not lead.startswith(MAGIC):
        raise SessionFileError(f"{path} is not an edge-runtime session file")
    (n,) = _LEN.unpack_from(lead, start)
    if n > min(MAX_HEADER, size - len(lead)):
        raise SessionFileError(f"session file {path} is damaged (header length)")
    raw = f.read(n)
    digest.update(lead[start:] + raw)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SessionFileError(f"session file {path} is damaged (header)") from None


def _check_header(path: Path, header, model) -> None:
    """Check the header is this bundle's, this KV dtype's and well formed."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SessionFileError(f"session file {path} is damaged or of an unknown format")
    if header.get("bundle") != bundle_identity(model.bundle):
        raise SessionFileError(f"session file {path} was saved from another bundle than {model.bundle.root}")
    targets = kv_held(model, 0)[1]
    if header.get("kv_dtype") != str(targets[0].dtype):
        raise SessionFileError(f"session file {path} holds a {header.get('kv_dtype')} KV cache, this model runs "
                               f"{targets[0].dtype} (load the model with kv_dtype={header.get('kv_dtype')})")
    ids, specs = header.get("ids"), header.get("arrays")
    if not (isinstance(ids, list) and all(isinstance(i, int) and 0 <= i < model.bundle.config.vocab_size
                                          for i in ids)):
        raise SessionFileError(f"session file {path} is damaged (token ids)")
    exact = header.get("exact")
    if isinstance(exact, bool) or not isinstance(exact, int) or not 0 <= exact <= len(ids):
        raise SessionFileError(f"session file {path} is damaged (exact prefix)")
    if len(ids) > model.context:
        raise SessionFileError(f"session file {path} holds {len(ids)} tokens, more than this model's context "
                               f"of {model.context}")
    if not isinstance(specs, list) or len(specs) != len(targets):
        raise SessionFileError(f"session file {path} does not match this backend's KV layout")


def _conversation(path: Path, header: dict) -> tuple[str | None, list[dict]]:
    system, messages = header.get("system"), header.get("messages")
    if system is not None and not isinstance(system, str):
        raise SessionFileError(f"session file {path} is damaged (system prompt)")
    try:
        return system, check_messages(messages) if messages else []
    except EdgeError:
        raise SessionFileError(f"session file {path} is damaged (messages)") from None


def load(path, model) -> Saved:
    """Check the file and put its KV state into the model's cache (the caller holds the cache's claim).

    The payload is read straight into the cache, block by block (never a second copy of the KV state in
    memory); a checksum mismatch found at the end leaves the cache marked empty."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = _read_header(path, f, size, digest)
            _check_header(path, header, model)
            system, messages = _conversation(path, header)
            n, base = len(header["ids"]), header.get("kv_base", 0)
            if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base <= n:
                raise SessionFileError(f"session file {path} is damaged (kv_base)")
            parts = kv_held(model, n, base)[1]
            for spec, part in zip(header["arrays"], parts):
                if not isinstance(spec, dict) or spec.get("shape") != list(part.shape) \
                        or spec.get("dtype") != str(part.dtype):
                    raise SessionFileError(f"session file {path} does not match this backend's KV layout")
            if size - f.tell() != sum(p.nbytes for p in parts):
                raise SessionFileError(f"session file {path} is damaged (payload size)")
            model._cache.truncate(0)
            for part in parts:
                for lead in np.ndindex(part.shape[:-2]):
                    block = part[lead]  # [positions, head_dim]: contiguous rows of the cache
                    f.readinto(memoryview(block).cast("B"))
                    digest.update(block.data)
            f.seek(len(MAGIC))
            stored = f.read(_DIGEST)
    except OSError as e:
        raise SessionFileError(f"cannot read session file {path}: {e.strerror or e}") from None
    if digest.hexdigest().encode("ascii") != stored:
        raise SessionFileError(f"session file {path} is damaged (checksum mismatch)")
    model._cache.append(header["ids"], 0)
    model._cache.exact = header["exact"]
    return Saved(list(header["ids"]), system, messages)
