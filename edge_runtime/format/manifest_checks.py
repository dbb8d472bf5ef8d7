"""What a manifest may say: its own checksum, and types and bounds of every field the runtime sizes or opens
something by. A bundle is data from anywhere; these checks run before anything is allocated from it."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import BundleError

CHECKSUM_KEY = "manifest_sha256"
# Far above any model this runtime targets, far below what would exhaust a device.
LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10,
    "num_key_value_heads": 1 << 10,
    "head_dim": 1 << 12,
    "max_position_embeddings": 1 << 24,
}
OPTIONAL_CONFIG = frozenset({"max_position_embeddings", "head_dim", "num_key_value_heads"})  # have defaults
MAX_CONTEXT = 1 << 22
MAX_TEMPLATE_CHARS = 1 << 20
TENSOR_DTYPES = frozenset({"float32", "float16", "uint8", "int8", "int32", "int64", "uint16", "int16", "uint32"})
_SHA256 = re.compile(r"[0-9a-f]{64}")


def manifest_checksum(manifest: Mapping) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), without its own checksum field."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(manifest: dict) -> dict:
    """The manifest with its checksum set (after any change to it)."""
    manifest[CHECKSUM_KEY] = manifest_checksum(manifest)
    return manifest


def check_manifest(manifest: dict, where: str) -> None:
    """BundleError (naming `where`) unless the manifest's checksum matches and its fields are in bounds."""
    try:
        ok = manifest.get(CHECKSUM_KEY) == manifest_checksum(manifest)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise BundleError(f"{where}: manifest.json fails its checksum (altered or corrupted)")
    _check_files(manifest.get("files"), where)
    _check_config(manifest.get("config"), where)
    _check_int(manifest.get("max_context"), 1, MAX_CONTEXT, "max_context", where)
    _check_graph(manifest.get("graph"), where)
    _check_weights(manifest.get("weights"), where)
    _check_tokenizer(manifest.get("tokenizer"), manifest["config"]["vocab_size"], where)
    if manifest.get("decoder") is not None:  # absent in a graph optimum wrote (no spec of ours)
        _check_decoder(manifest["decoder"], manifest["config"]["num_hidden_layers"], where)


def _fail(where: str, what: str):
    raise BundleError(f"{where}: manifest {what}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_int(x: Any, lo: int, hi: int, name: str, where: str) -> None:
    if not _is_int(x) or not lo <= x <= hi:
        _fail(where, f"{name} must be an integer in {lo}..{hi}, got {x!r:.40}")


def _check_dict(x: Any, name: str, where: str) -> dict:
    if not isinstance(x, dict):
        _fail(where, f"{name} must be an object")
    return x


def _check_str(x: Any, name: str, where: str, optional: bool = False) -> None:
    if not (isinstance(x, str) or (optional and x is None)):
        _fail(where, f"{name} must be a string")


def _check_files(files: Any, where: str) -> None:
    for name, meta in _check_dict(files, "files", where).items():
        meta = _check_dict(meta, f"files[{name!r:.40}]", where)
        _check_int(meta.get("bytes"), 0, 1 << 40, f"files[{name!r:.40}].bytes", where)
        if not isinstance(meta.get("sha256"), str) or not _SHA256.fullmatch(meta["sha256"]):
            _fail(where, f"files[{name!r:.40}].sha256 must be 64 hex digits")


def _check_config(config: Any, where: str) -> None:
    config = _check_dict(config, "config", where)
    _check_str(config.get("model_type"), "config.model_type", where)
    for key, hi in LIMITS.items():
        if config.get(key) is not None or key not in OPTIONAL_CONFIG:
            _check_int(config.get(key), 1, hi, f"config.{key}", where)
    if config["num_attention_heads"] % (config.get("num_key_value_heads") or config["num_attention_heads"]):
        _fail(where, "config.num_attention_heads must be a multiple of num_key_value_heads")
    for key in ("rms_norm_eps", "rope_theta"):
        v = config.get(key, 1.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            _fail(where, f"config.{key} must be a positive number")


def _check_graph(graph: Any, where: str) -> None:
    graph = _check_dict(graph, "graph", where)
    _check_str(graph.get("file"), "graph.file", where)
    _check_str(graph.get("contract"), "graph.contract", where)
    for key in ("kv_graphs", "exact_graph"):
        if graph.get(key) is not None:
            _check_dict(graph[key], f"graph.{key}", where)
    for kv, file in (graph.get("kv_graphs") or {}).items():
        _check_str(file, f"graph.kv_graphs[{kv!r:.20}]", where)
    if graph.get("exact_graph") is not None:
        _check_str(graph["exact_graph"].get("file"), "graph.exact_graph.file", where)


def _check_weights(weights: Any, where: str) -> None:
    weights = _check_dict(weights, "weights", where)
    _check_str(weights.get("file"), "weights.file", where)
    for name, meta in _check_dict(weights.get("tensors"), "weights.tensors", where).items():
        what = f"weights.tensors[{name!r:.40}]"
        meta = _check_dict(meta, what, where)
        _check_int(meta.get("offset"), 0, 1 << 40, f"{what}.offset", where)
        _check_int(meta.get("nbytes"), 0, 1 << 40, f"{what}.nbytes", where)
        if not isinstance(meta.get("dtype"), str) or meta["dtype"] not in TENSOR_DTYPES:
            _fail(where, f"{what}.dtype must be one of {', '.join(sorted(TENSOR_DTYPES))}")
        shape = meta.get("shape")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and 0 <= d < 1 << 40 for d in shape):
            _fail(where, f"{what}.shape must be a list of at most 8 non-negative integers")
        if int(np.prod(shape, dtype=object)) * np.dtype(meta["dtype"]).itemsize != meta["nbytes"]:
            _fail(where, f"{what}: shape and dtype do not make nbytes")


def _check_decoder(decoder: Any, num_layers: int, where: str) -> None:
    decoder = _check_dict(decoder, "decoder", where)
    units = decoder.get("units")
    if not isinstance(units, list) or len(units) > 64 * num_layers + 8:
        _fail(where, "decoder.units must be a list of units")
    for i, unit in enumerate(units):
        unit = _check_dict(unit, f"decoder.units[{i}]", where)
        names = unit.get("names")
        if not isinstance(names, list) or not 0 < len(names) <= 16 or not all(isinstance(n, str) for n in names):
            _fail(where, f"decoder.units[{i}].names must be a list of 1..16 tensor names")
        _check_str(unit.get("fused"), f"decoder.units[{i}].fused", where, optional=True)
    layers = decoder.get("layers")
    if not isinstance(layers, list) or len(layers) != num_layers:
        _fail(where, f"decoder.layers must list the config's {num_layers} layers")
    for i, layer in enumerate(layers):
        window = _check_dict(layer, f"decoder.layers[{i}]", where).get("window")
        if window is not None:
            _check_int(window, 1, MAX_CONTEXT, f"decoder.layers[{i}].window", where)


def _check_tokenizer(tok: Any, vocab: int, where: str) -> None:
    if tok is None:
        return
    tok = _check_dict(tok, "tokenizer", where)
    _check_str(tok.get("file", "tokenizer.json"), "tokenizer.file", where)
    _check_str(tok.get("merges_file"), "tokenizer.merges_file", where, optional=True)
    template = tok.get("chat_template")
    _check_str(template, "tokenizer.chat_template", where, optional=True)
    if template is not None and len(template) > MAX_TEMPLATE_CHARS:
        _fail(where, f"tokenizer.chat_template is longer than {MAX_TEMPLATE_CHARS} characters")
    ids = tok.get("eos_token_ids") or []
    if not isinstance(ids, list):
        _fail(where, "tokenizer.eos_token_ids must be a list")
    for i, t in enumerate(ids):
        _check_int(t, 0, vocab - 1, f"tokenizer.eos_token_ids[{i}]", where)
    for key in ("bos_token_id", "pad_token_id"):
        if tok.get(key) is not None:
            _check_int(tok[key], 0, vocab - 1, f"tokenizer.{key}", where)
    if tok.get("special_tokens") is not None:
        _check_dict(tok["special_tokens"], "tokenizer.special_tokens", where)
