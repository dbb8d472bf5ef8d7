"""SmoothQuant-style smoothing for the int8 preset (export.quant.smooth) and the exact int8 transcodes beside it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_runtime.backends.numpy.kernels import int8_blocks
from edge_runtime.backends.numpy.llama import DecoderForward, DenseWeights, rms_norm
from export.quant import smooth as S
from export.quant.quantize import transcode_gguf
from export.sources import GGUFBlocks, load_source

RNG = np.random.default_rng(0)


def random_act(cfg, rng) -> dict:
    """Calibration RMS per input channel with a wide spread (log-normal, a few 30x outliers): strong scales."""
    def vec(k):
        a = np.exp(rng.normal(0, 1, k))
        a[rng.choice(k, 2, replace=False)] *= 30
        return a.astype(np.float32)

    act = {}
    for i in range(cfg.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        act[a + "q_proj.weight"] = vec(cfg.hidden_size)
        act[a + "o_proj.weight"] = vec(cfg.q_dim)
        act[m + "gate_proj.weight"] = vec(cfg.hidden_size)
        act[m + "down_proj.weight"] = vec(cfg.intermediate_size)
    return act


def logits(source, tensors, ids):
    fwd = DecoderForward(source.config, DenseWeights(tensors, source.config), len(ids))
    return fwd.forward(np.asarray(ids, np.int64), 0, np.arange(len(ids)))  # [S, V]


@pytest.mark.parametrize("spec", ["tiny:llama", "tiny:qwen2"])  # qwen2: q/k/v biases (v's is rescaled)
def test_smoothing_leaves_the_float_model_unchanged(spec):
    source = load_source(spec)
    ids = list(RNG.integers(3, source.config.vocab_size, 24))
    smoothed = S.smooth_decoder(source.tensors, source.config, random_act(source.config, RNG), alpha=0.5)
    moved = S.changed(source.tensors, smoothed)
    assert any("input_layernorm" in n for n in moved) and any("v_proj" in n for n in moved)
    assert not any("embed" in n or n == "model.norm.weight" for n in moved)  # the (tied) lm_head is left alone
    want, got = logits(source, source.tensors, ids), logits(source, smoothed, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_smoothing_kinds_are_independent():
    source = load_source("tiny:llama")
    act = random_act(source.config, RNG)
    only_o = S.changed(source.tensors, S.smooth_decoder(source.tensors, source.config, act, kinds=("o",)))
    assert sorted({n.split(".", 3)[-1] for n in only_o}) == ["self_attn.o_proj.weight", "self_attn.v_proj.weight"]
    with pytest.raises(ValueError):
        S.smooth_decoder(source.tensors, source.config, act, kinds=("lm_head",))


def test_smoothing_scales():
    act, wmax = np.array([1.0, 4.0, 100.0]), np.array([2.0, 1.0, 0.5])
    s = S.smoothing_scales(act, wmax, 0.5)
    assert np.exp(np.log(s).mean()) == pytest.approx(1.0, rel=1e-6)            # weights keep their size
    np.testing.assert_allclose(s / s[0], np.sqrt(act / wmax) / np.sqrt(0.5), rtol=1e-6)
    s1, s0 = S.smoothing_scales(act, wmax, 1.0), S.smoothing_scales(act, wmax, 0.0)
    np.testing.assert_allclose(s1 / s1[0], act / act[0], rtol=1e-6)           # all of the range to the weights
    np.testing.assert_allclose(s0 / s0[0], wmax[0] / wmax, rtol=1e-6)         # none
    with pytest.raises(ValueError):
        S.smoothing_scales(act, wmax, 1.5)


def test_smoothing_cuts_int8_activation_error_on_outlier_channels():
    """A norm-fed matmul whose input has a few outlier channels (as RMSNorm outputs do): MatMulNBits' per-block
    int8 rounding of the smoothed input (norm weight / s, weight columns * s) loses much less."""
    k, n, tokens = 128, 64, 256
    x = RNG.normal(0, 1, (tokens, k)).astype(np.float32)
    g = np.ones(k, np.float32)
    g[[5, 40, 77, 100]] = 40.0                                         # outlier channels of the norm weight
    w = RNG.normal(0, 0.05, (n, k)).astype(np.float32)
    xn = rms_norm(x, g, 1e-5)                                          # [tokens, k]
    act = np.sqrt((xn * xn).mean(0))
    s = S.smoothing_scales(act, np.abs(w).max(0), 0.5)
    xs, ws = rms_norm(x, g / s, 1e-5), w * s
    want = xn @ w.T
    np.testing.assert_allclose(xs @ ws.T, want, rtol=0, atol=1e-4 * np.abs(want).max())
    err_plain = np.abs(int8_blocks(xn, 32) @ w.T - want).mean()
    err_smooth = np.abs(int8_blocks(xs, 32) @ ws.T - want).mean()
    assert err_smooth < err_plain / 4


# -- exact int8 transcodes of GGUF blocks --------------------------------------------------------------------


def gguf_blocks(kind: str, n: int = 6, kb: int = 3) -> GGUFBlocks:
    d = RNG.uniform(0.01, 0.1, (n, kb)).astype(np.float16).astype(np.float32)
    m = RNG.normal(0, 0.1, (n, kb)).astype(np.float16).astype(np.float32) if kind == "q4_1" else None
    top = 255 if kind == "q8_0" else 15
    return GGUFBlocks(kind, d, m, RNG.integers(1 if kind == "q8_0" else 0, top + 1, (n, kb, 32)).astype(np.uint8))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("block_size", [None, 16])
def test_int8_transcode_is_exact_at_smaller_blocks(kind, block_size):
    blk = gguf_blocks(kind)
    bq = transcode_gguf(blk, 8, block_size)
    assert bq.bits == 8 and bq.block_size == (block_size or 32)
    assert np.array_equal(bq.dequantize(), blk.dequantize())


def test_int8_transcode_of_q4_1_centers_the_codes():
    blk = gguf_blocks("q4_1")
    bq = transcode_gguf(blk, 8)
    assert bq.zero_points is None  # the centering is folded into the codes: int8 activations times (q - z)
    centered = bq.qweight.astype(np.int16) - 128                         # [N, kb, 32] = q - z
    z = (blk.q.astype(np.int16) - centered)[..., 0]
    assert np.all(np.abs(z - np.rint(blk.q.mean(-1))) <= 1)  # the mean code, or the nearest exact neighbour


# -- the exporter --------------------------------------------------------------------------------------------


def test_int8_export_smooths_by_default(tmp_path):
    from export.pipeline import ExportOptions, export_bundle

    out = export_bundle("tiny:llama", tmp_path / "b", ExportOptions(quant="int8", reference=False, progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["smooth"]["alpha"] == 0.5 and q["smooth"]["calibration_tokens"] > 0
    assert q["tensors"]["model.layers.0.self_attn.q_proj.weight"]["zero_points"]  # re-quantized asym
    assert manifest["fidelity"]["heldout"]["kl"] < 0.01
    off = export_bundle("tiny:llama", tmp_path / "c", ExportOptions(quant="int8", accuracy_level=0, reference=False,
                                                                    evaluate=False, progress=False))
    assert "smooth" not in json.loads((off / "manifest.json").read_text())["quantization"]
