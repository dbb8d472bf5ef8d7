"""Op helpers: plain functions `helper(g, *input_names, ..., name=path) -> output name(s)` over a GraphBuilder.

Hidden states are kept 2-D `[S, hidden]` (batch is 1) so float linears can be a single Gemm(transB=1) reading
the Hugging Face `[out, in]` weight as stored; only GroupQueryAttention sees a `[1, S, d]` view.
"""
from __future__ import annotations

from collections.abc import Sequence

from .builder import MS_DOMAIN, GraphBuilder, onnx_dtype


def rms_norm(g: GraphBuilder, x: str, weight: str, eps: float, name: str) -> str:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis (matches HF LlamaRMSNorm, fp32 statistics)."""
    return g.op("SimplifiedLayerNormalization", [x, weight], f"{name}/SimplifiedLayerNormalization",
                axis=-1, epsilon=float(eps), stash_type=1)


def skip_rms_norm(g: GraphBuilder, x: str, skip: str, weight: str, eps: float, name: str) -> tuple[str, str]:
    """(rms_norm(x + skip), x + skip): the residual add fused with the next norm."""
    node = f"{name}/SkipSimplifiedLayerNormalization"
    outs = [f"{node}/output_0", "", "", f"{node}/output_3"]
    g.op("SkipSimplifiedLayerNormalization", [x, skip, weight], node, domain=MS_DOMAIN, outputs=outs,
         epsilon=float(eps))
    return outs[0], outs[3]


def gather_rows(g: GraphBuilder, table: str, index: str, name: str) -> str:
    return g.op("Gather", [table, index], f"{name}/Gather", axis=0)


def reshape(g: GraphBuilder, x: str, shape: Sequence[int], name: str) -> str:
    return g.op("Reshape", [x, g.constant(list(shape))], f"{name}/Reshape")


def add(g: GraphBuilder, a: str, b: str, name: str) -> str:
    return g.op("Add", [a, b], f"{name}/Add")


def silu_mul(g: GraphBuilder, gate: str, up: str, name: str) -> str:
    """silu(gate) * up. QuickGelu with alpha=1 is exactly x * sigmoid(x), one fused kernel instead of two."""
    act = g.op("QuickGelu", [gate], f"{name}/act_fn/QuickGelu", domain=MS_DOMAIN, alpha=1.0)
    return g.op("Mul", [act, up], f"{name}/Mul")


def gelu_tanh_mul(g: GraphBuilder, gate: str, up: str, name: str) -> str:
    """gelu_tanh(gate) * up. FastGelu is GELU's tanh approximation (HF gelu_pytorch_tanh), one fused kernel."""
    act = g.op("FastGelu", [gate], f"{name}/act_fn/FastGelu", domain=MS_DOMAIN)
    return g.op("Mul", [act, up], f"{name}/Mul")


# DecoderSpec.activation -> the gated product helper
ACTIVATION_MUL = {"silu": silu_mul, "gelu_tanh": gelu_tanh_mul}


def cast(g: GraphBuilder, x: str, dtype, name: str) -> str:
    return g.op("Cast", [x], f"{name}/Cast", to=onnx_dtype(dtype))


def split_last(g: GraphBuilder, x: str, sizes: Sequence[int], name: str) -> list[str]:
    return g.op("Split", [x, g.constant(list(sizes))], f"{name}/Split", n_outputs=len(sizes), axis=-1)


# -- linear layers ------------------------------------------------------------------------------------------------


def float_linear(g: GraphBuilder, x: str, weight: str, bias: str | None, name: str) -> str:
    """x [S, K] @ weight[N, K]^T (+ bias) -> [S, N]; the HF layout is read as is (transB=1)."""
    return g.op("Gemm", [x, weight, bias], f"{name}/Gemm", transB=1)


def block_sum(g: GraphBuilder, x: str, k: int, block_size: int, name: str) -> str:
    """Sum of x over each quantization block: [S, K] -> [S, K/bs]; shared by every matmul reading x."""
    key = ("block_sum", x, block_size)
    if key not in g.cache:
        # Reshape (a view) + ReduceSum: cheaper than a MatMul with a 0/1 block indicator, whose packed [K, kb]
        # operand costs more per call, most in a prefill chunk (per-op times: bench/ort_graph.py profile).
        blocks = reshape(g, x, [-1, k // block_size, block_size], f"{name}/block_sum")     # [S, kb, bs]
        g.cache[key] = g.op("ReduceSum", [blocks, g.constant([-1])], f"{name}/block_sum/ReduceSum",
                            keepdims=0)                                                    # [S, kb]
    return g.cache[key]


def nbits_linear(g: GraphBuilder, x: str, inits: dict[str, str], bias: str | None, *, n: int, k: int,
                 bits: int, block_size: int, accuracy_level: int, name: str, output: str | None = None) -> str:
    """x [S, K] @ dequant(W)^T, W [N, K], with MatMulNBits; `inits` maps array suffix -> initializer name.

    A float per-block offset (GGUF Q4_1's min) is applied outside the integer kernel:
    sum_i x_i * off[n, b(i)] = blocksum(x) @ off^T, a small Gemm over K/bs columns (x must then be 2-D).
    Without offsets x may be [..., K] and `output` names the result (e.g. a graph output).
    """
    assert output is None or "offsets" not in inits, "the offsets Gemm is 2-D: name its output instead"
    y = g.op("MatMulNBits", [x, inits["qweight"], inits["scales"], inits.get("zero_points"), None, bias],
             f"{name}/MatMulNBits", domain=MS_DOMAIN, outputs=[output] if output else None, K=k, N=n, bits=bits,
             block_size=block_size, accuracy_level=int(accuracy_level))
    if "offsets" in inits:
        sums = block_sum(g, x, k, block_size, name)                                   # [S, kb]
        # The offsets reach the Gemm through a Reshape view (no copy): ORT prepacks only a constant B, and the
        # packed path of a [1, kb] x [kb, N] product is memory-bound on one thread; the unpacked B is read by
        # MLAS's M=1 kernel row by row, faster, and is never copied into the arena (bench/ort_graph.py run
        # BUNDLE --option constant_folding=1 measures the folded graph). The runtime must keep ORT's
        # ConstantFolding off, or it folds the view back into a constant.
        offsets = reshape(g, inits["offsets"], [n, k // block_size], f"{name}/offsets")  # [N, kb]
        # y + sums @ off^T in one node (Gemm's C input)
        y = g.op("Gemm", [sums, offsets, y], f"{name}/offsets/Gemm", transB=1)       # [S, N]
    return y


def group_query_attention(g: GraphBuilder, qkv: str, past_key: str, past_value: str, seqlens_k: str,
                          total_len: str, cos_cache: str, sin_cache: str, num_heads: int, kv_heads: int,
                          present: tuple[str, str], name: str, scale: float | None = None,
                          window: int | None = None, softcap: float | None = None) -> str:
    """Rotary + causal GQA over packed qkv [1, S, (H + 2*KVH) * D] with a shared past/present KV buffer.

    Writes this chunk's K/V at positions seqlens_k + 1 - S .. seqlens_k of the [1, KVH, C, D] buffers and
    returns the attention output [1, S, H * D]. scale: None for 1/sqrt(D). window: keys a query sees, itself
    included (HF sliding_window, and ORT's local_window_size: checked against the float model in the tests).
    softcap c: scores become c * tanh(scores / c).
    """
    out, _, _ = g.op("GroupQueryAttention",
                [qkv, None, None, past_key, past_value, seqlens_k, total_len, cos_cache, sin_cache],
                f"{name}/GroupQueryAttention", domain=MS_DOMAIN, outputs=[f"{name}/output_0", *present],
                num_heads=num_heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
                scale=None if scale is None else float(scale),
                local_window_size=None if window is None else int(window),
                softcap=None if not softcap else float(softcap))
    return out
