"""ONNX graph builder for the decoders of edge_runtime.spec (`edge-llama-v1` contract, docs/bundle-format.md).
Imports onnx, edge_runtime.spec and edge_runtime.format; never the sources or the quantizers (it takes arrays).
"""
from .builder import WEIGHT_LAYOUT_KEY, GraphBuilder, fused_initializers
from .decoder import DecoderGraph, GraphOptions, build_decoder_graph

__all__ = ["WEIGHT_LAYOUT_KEY", "DecoderGraph", "GraphBuilder", "GraphOptions", "build_decoder_graph",
           "fused_initializers"]
