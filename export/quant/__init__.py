"""Weight quantizers: float [N, K] or GGUF blocks -> block-quantized weights (quantize), GPTQ rounding (gptq),
SmoothQuant-style input scaling (smooth), per-matmul sensitivity for `--quant auto` (sensitivity), the calibration
pass they share (calibration) and named recipes resolved into a per-tensor plan (recipes). May import
edge_runtime.format and export.quality; never the graph builder or the bundle writer.
"""
