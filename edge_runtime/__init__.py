"""edge-runtime: run quantized small language models on device (ONNX Runtime or NumPy backends).

    import edge_runtime
    model = edge_runtime.load("bundles/smollm2-int4")
    print(model.generate([{"role": "user", "content": "Hi!"}], max_new_tokens=64).text)

Importing this package loads only NumPy; onnxruntime, tokenizers and jinja2 are imported when first needed.
"""
from .errors import (
    BundleError,
    ContextOverflowError,
    EdgeError,
    FidelityError,
    MemoryBudgetError,
    SamplingError,
    SessionFileError,
    StreamBusyError,
    UnsupportedModelError,
)
from .generation.generate import Generation
from .generation.stats import GenerationStats
from .generation.stream import Response, ResponseStream
from .model import Model, load
from .sessions.session import Session

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "ContextOverflowError",
    "EdgeError",
    "FidelityError",
    "Generation",
    "GenerationStats",
    "MemoryBudgetError",
    "Model",
    "SamplingError",
    "Response",
    "ResponseStream",
    "Session",
    "SessionFileError",
    "StreamBusyError",
    "UnsupportedModelError",
    "load",
]
