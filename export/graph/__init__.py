"""ONNX graph builder for the Llama family (`edge-llama-v1` contract, docs/bundle-format.md)."""
from .builder import WEIGHT_LAYOUT_KEY, GraphBuilder
from .llama import ARCHITECTURES, CONTRACT, GraphOptions, LlamaGraph, build_llama_graph

__all__ = ["ARCHITECTURES", "CONTRACT", "WEIGHT_LAYOUT_KEY", "GraphBuilder", "GraphOptions", "LlamaGraph",
           "build_llama_graph"]
