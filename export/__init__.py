"""Exporter: turns a GGUF / Hugging Face / tiny model into an edge-runtime bundle (needs torch, onnx, gguf)."""
