"""ONNX Runtime executors: the `edge-llama-v1` graph with its KV cache bound in place (llama) and optimum's `optimum-
kv-v1` graphs (optimum). The only place onnxruntime is imported at run time. May import edge_runtime.format,
edge_runtime.memory.pages and edge_runtime.errors.
"""
