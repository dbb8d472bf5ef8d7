"""The bundle format as the runtime reads it: model dimensions (config), the manifest, checksums and memory-mapped
weight views (bundle), what a manifest may say (manifest_checks), the files an ONNX graph refers to (onnx_refs), the
block layout of quantized weights (quant) and the graph-contract names (contracts). Imports only the standard
library, NumPy and edge_runtime.errors; the exporter imports it to write what the runtime reads.
"""
