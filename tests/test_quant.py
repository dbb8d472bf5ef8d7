"""Block quantization: the MatMulNBits layout (edge_runtime.format.quant) and the quantizers (export.quant.quantize)."""
import json

import numpy as np
import pytest

from edge_runtime.errors import BundleError, EdgeError
from edge_runtime.format.bundle import ALIGN, Bundle
from edge_runtime.format.config import ModelConfig
from edge_runtime.format.quant import BlockQuant, pack_4bit, unpack_4bit
from export.quant.quantize import (
    QuantSpec,
    preset_specs,
    quantize_int4,
    quantize_int8,
    quantize_tensor,
    transcode_gguf,
)
from export.sources import GGUFBlocks

RNG = np.random.default_rng(1234)


def reference_dequant(q, zp, scales, offsets):
    """The bundle-format formula element by element: W[n, b*bs+i] = (q[n,b,i] - zp[n,b]) * s[n,b] + o[n,b]."""
    n, kb, bs = q.shape
    w = np.zeros((n, kb * bs), np.float64)
    for r in range(n):
        for b in range(kb):
            for i in range(bs):
                code = int(q[r, b, i]) - int(zp[r, b])
                w[r, b * bs + i] = code * float(scales[r, b]) + float(offsets[r, b])
    return w


def block_view(w, bs):
    return w.reshape(w.shape[0], -1, bs)


# -- layout --------------------------------------------------------------------------------------------------


def test_pack_4bit_low_nibble_first():
    assert pack_4bit(np.array([1, 2, 15, 0], np.uint8)).tolist() == [0x21, 0x0F]
    assert pack_4bit(np.array([[3, 4, 5]], np.uint8)).tolist() == [[0x43, 0x05]]  # odd: padded with 0
    q = RNG.integers(0, 16, (3, 5, 32), dtype=np.uint8)
    assert np.array_equal(unpack_4bit(pack_4bit(q)), q)


@pytest.mark.parametrize("with_offsets", [False, True])
def test_dequantize_4bit_matches_formula(with_offsets):
    n, kb, bs = 3, 3, 16  # odd kb: the last zero-point byte holds one value
    q = RNG.integers(0, 16, (n, kb, bs), dtype=np.uint8)
    zp = RNG.integers(0, 16, (n, kb), dtype=np.uint8)
    scales = RNG.uniform(0.01, 0.1, (n, kb)).astype(np.float32)
    offsets = RNG.normal(0, 0.1, (n, kb)).astype(np.float32) if with_offsets else None
    bq = BlockQuant(4, bs, (n, kb * bs), pack_4bit(q), scales, pack_4bit(zp), offsets)
    assert bq.zero_points.shape == (n, 2)
    want = reference_dequant(q, zp, scales, offsets if with_offsets else np.zeros((n, kb)))
    atol = 1e-6 * np.abs(want).max()
    np.testing.assert_allclose(bq.dequantize(), want, rtol=1e-6, atol=atol)
    np.testing.assert_allclose(bq.dequantize(slice(1, 3)), want[1:3], rtol=1e-6, atol=atol)
    assert np.array_equal(bq.unpacked_q(), q)
    assert np.array_equal(bq.zero_point_values(), zp)
    want_keys = ["qweight", "scales", "zero_points"] + (["offsets"] if with_offsets else [])
    assert sorted(bq.arrays()) == sorted(want_keys)


def test_dequantize_8bit_default_zero_point():
    n, kb, bs = 2, 2, 32
    q = RNG.integers(0, 256, (n, kb, bs), dtype=np.uint8)
    scales = RNG.uniform(0.01, 0.1, (n, kb)).astype(np.float32)
    bq = BlockQuant(8, bs, (n, kb * bs), q, scales)
    want = reference_dequant(q, np.full((n, kb), 128), scales, np.zeros((n, kb)))
    # q*s - 128*s cancels: fp32 rounding is relative to the block's range, not to each element
    np.testing.assert_allclose(bq.dequantize(), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert bq.nbytes == q.nbytes + scales.nbytes
    assert bq.zero_point_values(slice(1, 2)).tolist() == [[128, 128]]


def test_shape_mismatch_is_rejected():
    with pytest.raises(BundleError):
        BlockQuant(4, 32, (2, 64), np.zeros((2, 2, 32), np.uint8), np.ones((2, 2), np.float32))
    with pytest.raises(BundleError):
        BlockQuant(4, 24, (2, 48), np.zeros((2, 2, 12), np.uint8), np.ones((2, 2), np.float32))


def write_bundle(root, arrays):
    """A minimal bundle: weights.bin with each array at a 4096-aligned offset and the manifest's index."""
    index, blob = {}, bytearray()
    for name, a in arrays.items():
        blob += b"\0" * (-len(blob) % ALIGN)
        index[name] = {"offset": len(blob), "nbytes": a.nbytes, "dtype": a.dtype.name, "shape": list(a.shape)}
        blob += a.tobytes()
    (root / "weights.bin").write_bytes(bytes(blob))
    manifest = {"weights": {"file": "weights.bin", "tensors": index},
                "files": {"weights.bin": {"bytes": len(blob), "sha256": ""}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return Bundle(root, manifest)


@pytest.mark.parametrize("offsets", [False, True])
def test_from_bundle_round_trip(tmp_path, offsets):
    w = RNG.normal(0, 1, (8, 64)).astype(np.float32)
    bq = quantize_int4(w, 32, "rtn", offsets=offsets)
    bundle = write_bundle(tmp_path, {f"W.{k}": v for k, v in bq.arrays().items()})
    meta = json.loads(json.dumps(bq.manifest_entry("rtn")))
    back = BlockQuant.from_bundle(bundle, "W", meta)
    assert back.shape == (8, 64) and back.bits == 4
    assert np.array_equal(back.dequantize(), bq.dequantize())
    wrong = dict(meta, zero_points=not meta["zero_points"])
    with pytest.raises(BundleError):
        BlockQuant.from_bundle(bundle, "W", wrong)


# -- quantizers ----------------------------------------------------------------------------------------------


def test_int8_symmetric_and_asymmetric():
    w = RNG.normal(0, 0.05, (16, 128)).astype(np.float32)
    sym = quantize_int8(w, 32)
    assert sym.zero_points is None and sym.qweight.shape == (16, 4, 32)
    err = np.abs(block_view(sym.dequantize() - w, 32))
    assert np.all(err <= sym.scales[..., None] * 0.5 + 1e-7)
    np.testing.assert_allclose(np.abs(block_view(w, 32)).max(-1) / 127, sym.scales, rtol=1e-6)
    asym = quantize_int8(w + 0.03, 32, symmetric=False)
    assert asym.zero_points.shape == (16, 4)
    assert np.linalg.norm(asym.dequantize() - (w + 0.03)) / np.linalg.norm(w + 0.03) < 0.01


@pytest.mark.parametrize("offsets", [False, True])
def test_int4_rtn_error_bound(offsets):
    w = RNG.normal(0, 0.05, (16, 128)).astype(np.float32)
    bq = quantize_int4(w, 32, "rtn", offsets=offsets)
    assert (bq.offsets is not None) == offsets and (bq.zero_points is None) == offsets
    err = np.abs(block_view(bq.dequantize() - w, 32))
    # offsets: the grid spans [min, max] exactly; integer zp: rounding the zp may clip an end by another s/2
    bound = bq.scales[..., None] * (0.5 if offsets else 1.0) + 1e-6
    assert np.all(err <= bound)


@pytest.mark.parametrize("offsets", [False, True])
def test_int4_search_never_worse_than_rtn_per_block(offsets):
    w = RNG.standard_t(3, (32, 256)).astype(np.float32) * 0.02
    rtn = block_view(quantize_int4(w, 32, "rtn", offsets=offsets).dequantize() - w, 32)
    srch = block_view(quantize_int4(w, 32, "search", offsets=offsets).dequantize() - w, 32)
    e_rtn, e_srch = (rtn ** 2).sum(-1), (srch ** 2).sum(-1)
    assert np.all(e_srch <= e_rtn * (1 + 1e-4) + 1e-12)
    assert e_srch.sum() < 0.97 * e_rtn.sum()


def test_int4_search_uses_activation_importance():
    w = RNG.normal(0, 0.05, (64, 128)).astype(np.float32)
    act = np.exp(RNG.normal(0, 1.5, 128)).astype(np.float32)  # a few channels dominate the output error
    def weighted_err(bq):
        return float((((bq.dequantize() - w) * act) ** 2).sum())
    plain = quantize_int4(w, 32, "search")
    aware = quantize_int4(w, 32, "search", act_scale=act)
    assert weighted_err(aware) < 0.9 * weighted_err(plain)


def test_int4_offsets_recover_a_q4_1_grid_exactly():
    n, kb = 8, 4
    d = RNG.uniform(0.001, 0.01, (n, kb)).astype(np.float32)
    m = RNG.normal(0, 0.05, (n, kb)).astype(np.float32)
    q = RNG.integers(0, 16, (n, kb, 32)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15  # every block uses its full range
    w = (d[..., None] * q + m[..., None]).reshape(n, -1)
    for method in ("rtn", "search"):
        bq = quantize_int4(w, 32, method, offsets=True)
        np.testing.assert_allclose(bq.dequantize(), w, rtol=0, atol=1e-6 * np.abs(w).max())


def random_gguf_blocks(kind, n=6, kb=3):
    d = RNG.uniform(0.001, 0.02, (n, kb)).astype(np.float16).astype(np.float32)  # GGUF stores fp16
    m = RNG.normal(0, 0.1, (n, kb)).astype(np.float16).astype(np.float32) if kind == "q4_1" else None
    top = 255 if kind == "q8_0" else 15
    return GGUFBlocks(kind, d, m, RNG.integers(0, top + 1, (n, kb, 32)).astype(np.uint8))


@pytest.mark.parametrize("kind,bits", [("q8_0", None), ("q4_0", None), ("q4_1", None), ("q4_0", 8),
                                       ("q4_1", 8)])
def test_transcode_gguf_is_exact(kind, bits):
    blk = random_gguf_blocks(kind)
    q = blk.q.astype(np.float64)
    d = blk.d.astype(np.float64)[..., None]
    want = {"q8_0": lambda: d * (q - 128), "q4_0": lambda: d * (q - 8),
            "q4_1": lambda: d * q + blk.m.astype(np.float64)[..., None]}[kind]().reshape(blk.q.shape[0], -1)
    bq = transcode_gguf(blk, bits)
    assert bq.bits == (bits or (8 if kind == "q8_0" else 4)) and bq.block_size == 32
    assert (bq.offsets is not None) == (kind == "q4_1")
    assert np.array_equal(bq.dequantize(), want.astype(np.float32))  # one rounding, as gguf's


def test_transcode_rejects_q8_to_4bit():
    with pytest.raises(EdgeError):
        transcode_gguf(random_gguf_blocks("q8_0"), 4)


# -- specs and presets ---------------------------------------------------------------------------------------


def tiny_config(hidden=64, tied=True):
    return ModelConfig(model_type="llama", vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=hidden // 4, tie_word_embeddings=tied)


def test_presets_cover_linear_weights_only():
    cfg = tiny_config(tied=False)
    assert all(s is None for s in preset_specs(cfg, "fp32").values())
    int8 = preset_specs(cfg, "int8")
    assert int8["model.norm.weight"] is None and int8["model.layers.0.input_layernorm.weight"] is None
    assert int8["lm_head.weight"] == QuantSpec(8, 32, "sym")
    assert int8["model.embed_tokens.weight"] == QuantSpec(8, 32, "sym")
    int4 = preset_specs(cfg, "int4", method="rtn", offsets=True)
    assert int4["model.layers.1.mlp.down_proj.weight"] == QuantSpec(4, 32, "rtn", True)
    with pytest.raises(EdgeError):
        preset_specs(cfg, "int3")


def test_presets_pick_a_block_size_that_divides_k():
    specs = preset_specs(tiny_config(hidden=48), "int4", block_size=32)  # K = 48 or 96: 16 divides both
    assert specs["model.layers.0.self_attn.q_proj.weight"].block_size == 16
    assert specs["model.layers.0.mlp.down_proj.weight"].block_size == 32  # K = 96


def test_presets_transcode_gguf_blocks():
    cfg = tiny_config()
    blocks = {"model.embed_tokens.weight": random_gguf_blocks("q8_0", 96, 2),
              "model.layers.0.mlp.up_proj.weight": random_gguf_blocks("q4_1", 128, 2)}
    int4 = preset_specs(cfg, "int4", blocks)
    # a Q8_0 tensor is re-quantized to 4 bits under int4 (an 8-bit lm_head is slower per token), kept by exact
    assert int4["model.embed_tokens.weight"] == QuantSpec(4, 32, "search")
    exact = preset_specs(cfg, "exact", blocks)
    assert exact["model.embed_tokens.weight"] == QuantSpec(8, 32, "transcode")
    assert exact["model.layers.0.mlp.up_proj.weight"] == QuantSpec(4, 32, "transcode", True)
    assert exact["model.layers.0.mlp.gate_proj.weight"] == QuantSpec(8, 32, "sym")  # a float tensor
    assert preset_specs(cfg, "int8", blocks)["model.embed_tokens.weight"] == QuantSpec(8, 32, "transcode")
    assert int4["model.layers.0.mlp.up_proj.weight"] == QuantSpec(4, 32, "transcode", True)
    assert int4["model.layers.0.mlp.gate_proj.weight"].method == "search"
    int8 = preset_specs(cfg, "int8", blocks)
    assert int8["model.layers.0.mlp.up_proj.weight"] == QuantSpec(8, 32, "transcode", True)
    assert preset_specs(cfg, "int4", blocks, transcode=False)["model.embed_tokens.weight"].bits == 4
    name = "model.layers.0.mlp.up_proj.weight"
    w = blocks[name].dequantize()
    bq = quantize_tensor(name, w, int4[name], blocks)
    assert np.array_equal(bq.dequantize(), w)
    with pytest.raises(EdgeError):
        quantize_tensor("model.layers.0.mlp.gate_proj.weight", w, int4[name], blocks)


# -- against ONNX Runtime's MatMulNBits kernel (the consumer of this layout) -------------------------------


def matmul_nbits(bq, a):
    """a [M, K] @ W^T through a one-node MatMulNBits graph, plus the offsets term blocksum(a) @ o^T."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n, k = bq.shape
    arrays = bq.arrays()
    names = {"qweight": "B", "scales": "scales", "zero_points": "zp"}
    inits = [numpy_helper.from_array(np.ascontiguousarray(arrays[s]), names[s]) for s in names if s in arrays]
    node = helper.make_node("MatMulNBits", ["A"] + [i.name for i in inits], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=bq.bits, block_size=bq.block_size)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"A": a})[0]
    if bq.offsets is not None:
        y = y + a.reshape(a.shape[0], -1, bq.block_size).sum(-1) @ bq.offsets.T
    return y


@pytest.mark.parametrize("make", [
    lambda w: quantize_int4(w, 32, "search"),                # kb = 3: odd, packed zero points padded
    lambda w: quantize_int4(w, 16, "rtn", offsets=True),
    lambda w: quantize_int8(w, 32),
    lambda w: quantize_int8(w, 32, symmetric=False),
    lambda w: transcode_gguf(random_gguf_blocks("q4_1", 40, 3), 8),
])
def test_layout_matches_onnxruntime_matmulnbits(make):
    w = RNG.normal(0, 1, (40, 96)).astype(np.float32)
    bq = make(w)
    a = RNG.normal(0, 1, (3, 96)).astype(np.float32)
    want = a.astype(np.float64) @ bq.dequantize().T.astype(np.float64)
    np.testing.assert_allclose(matmul_nbits(bq, a), want, rtol=0, atol=1e-5 * np.abs(want).max())
