"""The fallback exporter for architectures the graph builder does not know: optimum's ONNX export and ONNX Runtime's
quantizers (fallback). May import export.sources, export.quality and export.bundle, never export.pipeline (the
pipeline chooses which exporter runs).
"""
