"""ONNX graph builder for the decoders of edge_runtime.spec (`edge-llama-v1` contract, docs/bundle-format.md)."""
from .builder import WEIGHT_LAYOUT_KEY, GraphBuilder, fused_initializers
from .decoder import CONTRACT, DecoderGraph, GraphOptions, build_decoder_graph

__all__ = ["CONTRACT", "WEIGHT_LAYOUT_KEY", "DecoderGraph", "GraphBuilder", "GraphOptions", "build_decoder_graph",
           "fused_initializers"]
