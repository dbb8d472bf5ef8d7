"""The graph contracts a bundle may declare (manifest graph.contract, docs/bundle-format.md): what its ONNX graph's
inputs and outputs mean. The exporters write them, the backends register for them; spelled here only."""

# our decoder graph: input_ids, positions, a KV cache bound in place (one buffer per layer), logits of the last rows
DECODER = "edge-llama-v1"
# DECODER's inputs for sliding-window layers whose KV buffers shift (backends/ort/window.py): seqlens_k and
# total_sequence_length counted from the buffers' first slot, then the window rope's cos / sin rows from there
WINDOW_INPUTS = ("seqlens_k.window", "total_sequence_length.window", "rotary.window.cos_cache",
                 "rotary.window.sin_cache")
# optimum's exported graph: past_key_values.* in, present.* out, fed back each step
OPTIMUM_KV = "optimum-kv-v1"
