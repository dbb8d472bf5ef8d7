"""The NumPy executor of `edge-llama-v1`: the readable reference forward pass (llama), block-quantized matrix products
without a float copy of the weights (kernels) and the Backend wrapper (backend). Imports NumPy, edge_runtime.format
and edge_runtime.memory.pages; never onnxruntime.
"""
