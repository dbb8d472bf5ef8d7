"""Writing a bundle folder atomically: weights.bin (page-aligned ONNX external data), model.onnx, manifest.json."""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_runtime.errors import EdgeError
from edge_runtime.format.bundle import ALIGN, FORMAT, FORMAT_VERSION, MANIFEST, write_manifest
from edge_runtime.format.config import ModelConfig
from edge_runtime.format.contracts import DECODER
from edge_runtime.format.verification import sha256_file
from edge_runtime.spec import spec_for, supported

from ..graph.builder import WEIGHT_LAYOUT_KEY, fused_initializers

WEIGHTS_FILE = "weights.bin"
MODEL_FILE = "model.onnx"
EXACT_FILE = "model.exact.onnx"
INLINE_LIMIT = 1024  # initializers below this many bytes stay inside model.onnx unless they are indexed weights

Progress = Callable[[int, int], None]  # (bytes of weights written, total bytes)


def write_bundle(out_dir, *, config: ModelConfig, manifest_fields: Mapping, extra_files: Mapping[str, bytes | str],
                 graph: onnx.ModelProto | None = None, graphs: Mapping[str, onnx.ModelProto] | None = None,
                 exact_graph: onnx.ModelProto | None = None, progress: Progress | None = None,
                 overwrite: bool = True) -> Path:
    """Write a bundle to `out_dir`, moved into place only once everything is written.

    out_dir must be absent, empty, or hold a bundle (replaced only if overwrite); anything else raises
    OutPathError before any work (check_out_dir).

    graph: the one decoder, or graphs: KV dtype -> decoder, each with inline initializers and, optionally, the
    builder's weight layout in its metadata (fused initializers are indexed part by part, aliases share their
    base's bytes). The first graph is the default (model.onnx); the others (model.<dtype>.onnx) share its
    weights.bin, where only the initializers they alone have (their rotary tables) are appended.
    exact_graph: the same decoder with float32 activations and KV cache (model.exact.onnx, also sharing
    weights.bin), recorded as graph.exact_graph: what two executors can be compared on to float rounding.
    manifest_fields: the manifest keys this writer does not own (graph contract, quantization, tokenizer,
    reference, fidelity, source, max_context...). extra_files: other files of the bundle (tokenizer.json,
    reference.json). The graphs are modified in place (their initializers become external references).
    """
    if (graph is None) == (graphs is None):
        raise ValueError("write_bundle takes graph or graphs")
    graphs = graphs or {_kv_dtype(graph): graph}
    # What a runtime reads instead of guessing: the units as the default graph fused them, the layer pattern.
    # A graph optimum wrote for a family without a spec (the fallback) has none; only ONNX Runtime runs it.
    decoder = (spec_for(config).manifest(fused_initializers(next(iter(graphs.values()))))
               if supported(config.model_type) else None)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        files, index = {}, {}
        with open(tmp / WEIGHTS_FILE, "wb") as f:
            placed: dict = {}
            for i, (kv_dtype, graph) in enumerate(graphs.items()):
                index.update(_write_weights(graph, f, placed, progress))
                files[kv_dtype] = MODEL_FILE if i == 0 else f"{Path(MODEL_FILE).stem}.{kv_dtype}.onnx"
                onnx.save_model(graph, str(tmp / files[kv_dtype]))
            if exact_graph is not None:
                index.update(_write_weights(exact_graph, f, placed, None))  # the default graph's weights, reused
                onnx.save_model(exact_graph, str(tmp / EXACT_FILE))
        for name, data in extra_files.items():
            (tmp / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else bytes(data))
        manifest = _manifest(config, graphs, files, manifest_fields, index, tmp)
        if decoder is not None:
            manifest["decoder"] = decoder
        if exact_graph is not None:
            manifest["graph"]["exact_graph"] = {"file": EXACT_FILE, "accuracy_level": 0, "kv_dtype": "float32"}
        write_manifest(tmp, manifest)
        _replace_dir(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class OutPathError(EdgeError):
    """The output path holds something that is not ours to replace; nothing was written or removed."""


def is_bundle_dir(path: Path) -> bool:
    """A folder holding an edge bundle and nothing else: manifest.json plus only the files it lists (and
    hidden files)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        listed = set((manifest.get("files") or {}) if isinstance(manifest, dict) else ())
        entries = list(path.iterdir())
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    return (manifest.get("format") == FORMAT  # hidden files are tools' stamps (e.g. the exporter key)
            and all(p.name.startswith(".") or (p.is_file() and not p.is_symlink() and p.name in listed | {MANIFEST})
                    for p in entries))


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Raise OutPathError unless out_dir may receive a bundle: absent, an empty folder, or (only with
    overwrite) a folder holding a bundle. A file, a symlink or any other folder is never replaced."""
    out_dir = Path(out_dir)
    if not os.path.lexists(out_dir):
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise OutPathError(f"{out_dir} exists and is not a folder: nothing written (choose another output path)")
    if not any(out_dir.iterdir()):
        return
    if not is_bundle_dir(out_dir):
        raise OutPathError(f"{out_dir} is a folder that is not an edge bundle: nothing written "
                           f"(choose an empty or new output path)")
    if not overwrite:
        raise OutPathError(f"{out_dir} holds a bundle: pass --overwrite to replace it")


def _replace_dir(tmp: Path, out_dir: Path, overwrite: bool = True) -> None:
    """Move the finished folder `tmp` to out_dir (see check_out_dir); an older bundle there is swapped out in
    one step where the OS allows it, and removed after the swap. Nothing named after either is left behind."""
    with _sigint_deferred():
        check_out_dir(out_dir, overwrite)
        if not os.path.lexists(out_dir) or not any(out_dir.iterdir()):
            os.replace(tmp, out_dir)  # replaces an empty folder
            return
        if _exchange(tmp, out_dir):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old bundle
            return
        old = tmp.with_name(tmp.name + ".old")
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def _sigint_deferred():
    """Ctrl-C waits until the block is done: a swap of folders is never left half-way (it takes a few renames
    and the removal of the old bundle). Only the main thread receives signals, so elsewhere this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _pop_layout(graph: onnx.ModelProto) -> dict:
    props = list(graph.metadata_props)
    layout = {"weights": [], "parts": {}, "aliases": {}}
    for p in props:
        if p.key == WEIGHT_LAYOUT_KEY:
            layout.update(json.loads(p.value))
    del graph.metadata_props[:]
    graph.metadata_props.extend(p for p in props if p.key != WEIGHT_LAYOUT_KEY)
    return layout


def _nbytes(t: TensorProto) -> int:
    return int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _raw_bytes(t: TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    return onnx.numpy_helper.to_array(t).tobytes()


def _write_weights(graph: onnx.ModelProto, f, placed: dict, progress: Progress | None) -> dict:
    """Stream the weight initializers into the open weights file `f` at ALIGN-ed offsets; return their manifest
    index. placed: name -> (offset, bytes) of what earlier graphs wrote, reused when the bytes are the same."""
    layout = _pop_layout(graph)
    weights, parts, aliases = set(layout["weights"]), layout["parts"], layout["aliases"]
    inits = [t for t in graph.graph.initializer if t.name not in aliases]
    chosen = [t for t in inits if t.name in weights or _nbytes(t) >= INLINE_LIMIT]
    total, done = sum(_nbytes(t) for t in chosen), 0
    index = {}
    for t in chosen:
        if t.name in placed:  # written by an earlier graph: same name, same weights (the builder's contract)
            offset, length = placed[t.name]
            if length != _nbytes(t):
                raise ValueError(f"initializer {t.name} differs between the bundle's graphs")
        else:
            data = _raw_bytes(t)
            offset, length = -(-f.tell() // ALIGN) * ALIGN, len(data)
            f.write(b"\0" * (offset - f.tell()))
            f.write(data)
            placed[t.name] = (offset, length)
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        for name, shape, start in _index_entries(t, parts.get(t.name), dtype):
            index[name] = {"offset": offset + start, "nbytes": int(np.prod(shape)) * dtype.itemsize,
                           "dtype": dtype.name, "shape": list(shape)}
        _make_external(t, offset, length)
        done += length
        if progress:
            progress(done, total)
    for t in graph.graph.initializer:
        if t.name in aliases:
            _make_external(t, *placed[aliases[t.name][0]])
    return index


def _index_entries(t: TensorProto, parts, dtype: np.dtype):
    """(index name, shape, byte offset inside t) of every indexed tensor stored in initializer t."""
    if not parts:
        yield t.name, list(t.dims), 0
        return
    start = 0
    for name, shape in parts:
        yield name, shape, start
        start += int(np.prod(shape)) * dtype.itemsize


def _make_external(t: TensorProto, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(field)
    del t.external_data[:]
    for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = TensorProto.EXTERNAL


def _kv_dtype(graph: onnx.ModelProto) -> str:
    """The NumPy dtype name of the graph's KV cache inputs (float32 when it has none)."""
    for v in graph.graph.input:
        if v.name.startswith("past_key_values."):
            return helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
    return "float32"


def _io_names(values) -> list[str]:
    return [v.name for v in values]


def _manifest(config: ModelConfig, graphs: Mapping[str, onnx.ModelProto], files: Mapping[str, str],
              fields: Mapping, index: dict, root: Path) -> dict:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "architecture": fields.get("architecture", config.model_type)}
    manifest.update(fields)
    manifest.setdefault("max_context", config.max_position_embeddings)  # a reader sizes contexts by it
    manifest["config"] = config.to_dict()
    default = next(iter(graphs.values()))
    manifest["graph"] = {"contract": DECODER, **dict(fields.get("graph", {})), "kv_dtype": _kv_dtype(default),
                         "file": MODEL_FILE, "inputs": _io_names(default.graph.input),
                         "outputs": _io_names(default.graph.output),
                         "kv_graphs": dict(files)}
    manifest["weights"] = {"file": WEIGHTS_FILE, "tensors": index}
    manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                         for p in sorted(root.iterdir()) if p.is_file() and p.name != MANIFEST}
    return manifest
