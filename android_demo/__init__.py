"""The edge-runtime chat demo for Android phones (Termux) and its arm64 check. Imports only the runtime
(edge_runtime, NumPy backend) and the standard library: a phone has neither onnxruntime nor the exporter.
"""
