"""Reading a bundle: manifest, checksums, and memory-mapped views of weights.bin (see docs/bundle-format.md)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import BundleError, ContextOverflowError, EdgeError, UnsupportedModelError
from .config import ModelConfig
from .manifest_checks import check_manifest, seal
from .onnx_refs import ProtobufError, external_data_locations
from .verification import Verification, mismatch, sha256_file

FORMAT = "edge-bundle"
FORMAT_VERSION = 3  # the manifest carries its own checksum (manifest_checks.CHECKSUM_KEY) and a `decoder` entry
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # the weight index of a model far larger than any this runtime targets
ALIGN = 4096  # every tensor in weights.bin starts on a page boundary so it can be mmapped in place


def kv_graphs(manifest: dict) -> dict[str, str]:
    """KV dtype -> graph file, the default graph (graph.kv_dtype, graph.file) first. A manifest without
    graph.kv_graphs holds the default graph only."""
    graph = manifest.get("graph") or {}
    default = graph.get("kv_dtype", "float32")
    return {default: graph["file"], **{d: f for d, f in (graph.get("kv_graphs") or {}).items() if d != default}}


def kv_dtypes(manifest: dict) -> tuple[str, ...]:
    """KV dtypes a manifest has graphs for, its default first."""
    return tuple(kv_graphs(manifest))


def write_manifest(root: Path, manifest: dict) -> None:
    """Write manifest.json with its checksum (Bundle.open refuses a manifest whose checksum does not match)."""
    (Path(root) / MANIFEST).write_text(json.dumps(seal(manifest), indent=1), encoding="utf-8")



def check_context(context, max_context: int) -> int:
    """`context` as an int of 1..max_context: EdgeError for what is not a positive count of tokens,
    ContextOverflowError past the bundle's max_context. The one check of a requested KV context."""
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 1:
        raise EdgeError(f"context must be a positive number of tokens, got {context!r}")
    if context > max_context:
        raise ContextOverflowError(f"context {context} exceeds this bundle's max_context {max_context}")
    return int(context)

@dataclass
class Bundle:
    root: Path
    manifest: dict
    _mmap: Optional[np.memmap] = field(default=None, repr=False)
    _verification: Optional[Verification] = field(default=None, repr=False)

    @classmethod
    def open(cls, path, verify: bool = True, background: bool = False) -> "Bundle":
        """Read the manifest (its checksum and bounds checked) and check every file's size and (by default)
        sha256 before anything uses it. background: the checksums are computed by a thread (verification.py)
        and each file's is awaited by `path(name)`; `wait_verified()` awaits them all."""
        if not isinstance(path, (str, os.PathLike)):
            raise BundleError(f"a bundle path must be a string or a path, got {type(path).__name__}")
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"bundle not found: {root} is not a folder")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"bundle {root} has no {MANIFEST}")
        if mpath.is_symlink():
            raise BundleError(f"bundle {root}: {MANIFEST} is a symbolic link")
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"bundle {root}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise BundleError(f"bundle {root}: {MANIFEST} is not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"bundle {root}: {MANIFEST} is not an {FORMAT} manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"bundle {root}: format version {manifest.get('format_version')!r:.20} is not supported "
                f"(this runtime reads version {FORMAT_VERSION}: export the bundle again)"
            )
        check_manifest(manifest, f"bundle {root}")
        bundle = cls(root, manifest)
        bundle.check_files(hashes=verify and not background)
        if verify and background:
            files = {name: (bundle.path(name), meta["sha256"]) for name, meta in manifest["files"].items()}
            bundle._verification = Verification(root, files)
        return bundle

    def wait_verified(self) -> None:
        """Return once every file's checksum matched (at once unless opened with background=True)."""
        if self._verification is not None:
            self._verification.wait_all()

    def abandon(self) -> None:
        """A load that failed: the checksum thread stops after its current file."""
        if self._verification is not None:
            self._verification.cancel()

    def check_files(self, hashes: bool = True) -> None:
        for name, meta in self.manifest["files"].items():
            p = self.path(name)
            if not p.is_file():
                raise BundleError(f"bundle {self.root}: missing file {name}")
            size = p.stat().st_size
            if size != meta["bytes"]:
                raise BundleError(
                    f"bundle {self.root}: {name} is {size} bytes, manifest says {meta['bytes']} (truncated or altered)"
                )
            if hashes and sha256_file(p) != meta["sha256"]:
                raise BundleError(mismatch(self.root, name))

    def path(self, name: str) -> Path:
        """The path of a file the manifest lists. Names come from the manifest: anything unlisted, or whose
        resolved path (symbolic links followed) leaves the bundle folder, is refused."""
        if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
            raise BundleError(f"bundle {self.root}: manifest names a file outside the bundle: {name!r:.80}")
        if name not in self.manifest["files"]:
            raise BundleError(f"bundle {self.root}: {name!r:.80} is not among the manifest's files")
        p = self.root / name
        root = self.root.resolve()
        if not p.resolve().is_relative_to(root) or p.resolve() == root:
            raise BundleError(f"bundle {self.root}: {name} leads outside the bundle (symbolic link)")
        if self._verification is not None:
            self._verification.wait(name)  # nothing reads a file before its checksum matched
        return p

    def graph_path(self, name: str) -> Path:
        """The path of an ONNX graph of the bundle, once every external data file it names is a bundle file
        (checked here, before ONNX Runtime opens anything)."""
        p = self.path(name)
        try:
            locations = external_data_locations(p.read_bytes())
        except ProtobufError as e:
            raise BundleError(f"bundle {self.root}: {name} is not a valid ONNX model ({e})") from None
        for location in set(locations):
            if "\\" in location:
                raise BundleError(f"bundle {self.root}: {name} names external data {location!r:.80}")
            self.path(location)
        return p

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["config"])

    @property
    def contract(self) -> str:
        return self.manifest["graph"]["contract"]

    @property
    def kv_dtypes(self) -> tuple[str, ...]:
        """The KV-cache precisions this bundle has a graph for, the default first (see graph_file)."""
        return kv_dtypes(self.manifest)

    def graph_file(self, kv_dtype: str | None = None) -> str:
        """The graph file for a KV-cache precision (None: the default); BundleError if the bundle has none."""
        files = kv_graphs(self.manifest)
        kv_dtype = kv_dtype or next(iter(files))
        if kv_dtype not in files:
            raise BundleError(f"bundle {self.root}: no graph with a {kv_dtype} KV cache "
                              f"(it has {', '.join(files)})")
        return files[kv_dtype]

    @property
    def accuracy_level(self) -> int:
        """MatMulNBits' activation precision in the default graphs: 4 = int8 activations, 0 = float32."""
        return int((self.manifest.get("graph") or {}).get("accuracy_level", 0))

    def run_kv_dtype(self, kv_dtype: str | None, float_activations: bool = False) -> str:
        """The KV dtype a backend runs with: the one asked for, else the default graph's; float activations
        (the exact graph) run with a float32 cache only."""
        if float_activations:
            if kv_dtype not in (None, "float32"):
                raise UnsupportedModelError(f"float activations run with a float32 KV cache, not {kv_dtype}")
            return "float32"
        return kv_dtype or self.kv_dtypes[0]

    def exact_graph_file(self) -> str | None:
        """The graph computing the same function with float32 activations (accuracy_level 0) and a float32 KV
        cache, on the same weights: the default graph itself when it is one, else graph.exact_graph (the graph
        the cross-backend check runs), else None. Two executors agree on it to float rounding.
        A bundle without quantized weights has no MatMulNBits: its default float32-KV graph is exact."""
        graph = self.manifest.get("graph") or {}
        quantized = bool(((self.manifest.get("quantization") or {}).get("tensors")))
        if (self.accuracy_level == 0 or not quantized) and "float32" in self.kv_dtypes:
            return self.graph_file("float32")  # no int8 activations anywhere: the default graph is exact
        return (graph.get("exact_graph") or {}).get("file")

    @property
    def max_context(self) -> int:
        return int(self.manifest["max_context"])

    def check_context(self, context) -> int:
        """`context` checked against this bundle (see check_context)."""
        return check_context(context, self.max_context)

    @property
    def tensor_index(self) -> dict[str, dict[str, Any]]:
        return self.manifest["weights"]["tensors"]

    def weights_mmap(self) -> np.memmap:
        """The whole weights file, mapped read-only: pages are read on first touch, never copied."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path(self.manifest["weights"]["file"]), dtype=np.uint8, mode="r")
        return self._mmap

    def has_tensor(self, name: str) -> bool:
        return name in self.tensor_index

    def tensor(self, name: str) -> np.ndarray:
        """A read-only view of one array of weights.bin (no copy)."""
        try:
            meta = self.tensor_index[name]
        except KeyError:
            raise BundleError(f"bundle {self.root}: no tensor {name!r} in weights.bin") from None
        buf = self.weights_mmap()
        start, nbytes = int(meta["offset"]), int(meta["nbytes"])
        if start + nbytes > buf.size:
            raise BundleError(f"bundle {self.root}: tensor {name} lies past the end of weights.bin")
        return buf[start:start + nbytes].view(np.dtype(meta["dtype"])).reshape(meta["shape"])

    def read_json(self, name: str) -> Any:
        """A JSON file of the bundle (BundleError if it is not valid JSON)."""
        try:
            return json.loads(self.path(name).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise BundleError(f"bundle {self.root}: {name} is not valid JSON ({e})") from None
