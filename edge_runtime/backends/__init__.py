"""Executors of a bundle's graph contract, each implementing `backends.base.Backend`; this module picks and
builds one, importing it only when chosen (so `import edge_runtime` never loads onnxruntime)."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os

from ..errors import EdgeError, UnsupportedModelError
from ..format.contracts import DECODER, OPTIMUM_KV

# name -> "module:class". Kept as strings so nothing is imported until a backend is built.
BACKENDS = {
    "ort": "edge_runtime.backends.ort.llama:OrtBackend",
    "numpy": "edge_runtime.backends.numpy.backend:NumpyBackend",
    "ort-optimum": "edge_runtime.backends.ort.optimum:OptimumOrtBackend",
}

# contract -> backends able to run it, preferred first. "auto" takes the first whose runtime is installed.
CONTRACTS = {
    DECODER: ("ort", "numpy"),
    OPTIMUM_KV: ("ort-optimum",),
}

NEEDS_ONNXRUNTIME = ("ort", "ort-optimum")

# Hidden test hook: "name=module:Class[,name=module:Class]" adds backends that accept any contract.
EXTRA_BACKENDS_ENV = "EDGE_RUNTIME_EXTRA_BACKENDS"


def _extra_backends() -> dict[str, str]:
    spec = os.environ.get(EXTRA_BACKENDS_ENV, "")
    pairs = (item.split("=", 1) for item in spec.split(",") if "=" in item)
    return {name.strip(): target.strip() for name, target in pairs}


def choices() -> list[str]:
    """Names a user may ask for (the CLI's --backend)."""
    return ["auto", "ort", "numpy", *_extra_backends()]


def has_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None  # looks, does not import


def resolve(requested: str, contract: str) -> str:
    """The backend to build for `contract` when the user asked for `requested` ("auto", "ort", "numpy")."""
    if requested in _extra_backends():
        return requested
    if contract not in CONTRACTS:
        raise UnsupportedModelError(f"graph contract {contract!r} is not one this runtime runs "
                                    f"(known: {', '.join(CONTRACTS)})")
    able = CONTRACTS[contract]
    if requested == "auto":
        installed = [b for b in able if b not in NEEDS_ONNXRUNTIME or has_onnxruntime()]
        if not installed:
            raise EdgeError(f"contract {contract} needs onnxruntime, which is not installed")
        return installed[0]
    if requested == "ort" and "ort" not in able:
        requested = "ort-optimum"  # the ONNX Runtime executor of optimum's graph layout
    if requested not in able:
        usable = dict.fromkeys("ort" if b in NEEDS_ONNXRUNTIME else b for b in able)  # names users type
        raise UnsupportedModelError(f"backend {requested!r} cannot run graph contract {contract} "
                                    f"(use {' or '.join(usable)})")
    if requested in NEEDS_ONNXRUNTIME and not has_onnxruntime():
        raise EdgeError(f"backend {requested} needs onnxruntime, which is not installed (try backend numpy)")
    return requested


def make_backend(name: str, bundle, context: int, threads: int, **opts):
    """Build backend `name` (as returned by `resolve`) for `bundle` with a KV cache of `context` tokens."""
    target = _extra_backends().get(name) or BACKENDS.get(name)
    if target is None:
        raise EdgeError(f"unknown backend {name!r} (choose from {', '.join(choices())})")
    module, _, cls = target.partition(":")
    factory = getattr(importlib.import_module(module), cls)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in opts:
        if key not in params and not takes_any:
            raise EdgeError(f"backend {name} has no option {key!r}")
    return factory(bundle, context, threads=threads, **opts)
