"""Exporter: turns a GGUF / Hugging Face / tiny model into an edge-runtime bundle (needs torch, onnx, gguf).

cli (edge-export) -> options (one validated ExportOptions) -> pipeline (the straight line of steps) over
sources (read a model), quant (recipes, GPTQ, smoothing, sensitivity), graph (the ONNX decoder), bundle (assets
and the atomic writer), quality (float reference, probes, evaluation domains), optimum (the fallback exporter for
other architectures) and distill (a smaller student). May import edge_runtime (never its cli, except cli.errors);
the runtime never imports export.
"""
