"""Quality-budgeted quantization: units, calibration statistics, the perturbed-KL shortcut and the int4/int8 plan."""
from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.format.quant import BlockQuant
from edge_runtime.spec import spec_for
from export.quant import sensitivity as S


@pytest.fixture(scope="module")
def tiny():
    from export.quality.reference import FloatReference
    from export.sources import load_source

    source = load_source("tiny:llama")
    rng = np.random.default_rng(0)
    windows = [list(rng.integers(3, source.config.vocab_size, 48)) for _ in range(2)]
    return source, FloatReference(source, threads=1), windows


def test_units_cover_every_linear_weight_once_fused_like_the_graph(tiny):
    source = tiny[0]
    us = S.units(source.config)
    names = [n for u in us for n in u.names]
    linear = [n for n in spec_for(source.config).tensor_names() if n.endswith("proj.weight") or "embed" in n]
    assert sorted(names) == sorted(linear) and len(names) == len(set(names))
    assert [u.label for u in us[:4]] == ["layers.0.qkv", "layers.0.o", "layers.0.gate_up", "layers.0.down"]
    assert us[-1].label == "embed"  # tied: the embedding is the lm_head too


def test_activation_scales_are_input_rms_per_channel(tiny):
    import torch

    _source, ref, windows = tiny
    act = S.activation_scales(ref.torch_model, windows, tied=True)
    q, k = act["model.layers.0.self_attn.q_proj.weight"], act["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(q, k)  # one input, one statistic
    assert "model.embed_tokens.weight" in act and act["model.layers.0.mlp.down_proj.weight"].shape == (128,)
    # layer 0's q/k/v input is input_layernorm(embedding): recompute it by hand
    with torch.no_grad():
        layer = ref.torch_model.model.layers[0]
        xs = [layer.input_layernorm(ref.torch_model.model.embed_tokens(torch.tensor([w])))[0] for w in windows]
    x = torch.cat(xs).double().numpy()
    np.testing.assert_allclose(q, np.sqrt((x * x).mean(0)), rtol=1e-5)


def test_partial_rerun_matches_the_full_forward(tiny):
    source, ref, windows = tiny
    kl = S.PerturbedKL(ref.torch_model, windows)
    assert kl.kl({}, None) == pytest.approx(0.0, abs=1e-12)
    name = "model.layers.1.mlp.down_proj.weight"
    w = source.tensors[name] + np.random.default_rng(1).normal(0, 0.05, source.tensors[name].shape).astype(np.float32)
    full, partial = kl.kl({name: w}, None), kl.kl({name: w}, 1)
    assert full > 1e-4 and partial == pytest.approx(full, rel=1e-6)
    assert kl.kl({}, None) == pytest.approx(0.0, abs=1e-12)  # the float weights are back


def test_choose_bits_takes_the_cheapest_kld_per_byte_first():
    sens = {"a": 0.010, "b": 0.001, "c": 0.004, "d": 0.0}
    saved = {"a": 100, "b": 10, "c": 100, "d": 5}
    assert S.choose_bits(sens, saved, 0.0) == {"a": 8, "b": 8, "c": 8, "d": 4}
    assert S.choose_bits(sens, saved, 0.005) == {"a": 8, "b": 4, "c": 4, "d": 4}
    assert S.choose_bits(sens, saved, 1.0) == {"a": 4, "b": 4, "c": 4, "d": 4}


def test_auto_quantize_meets_its_budget_with_a_mix_and_caches_sensitivity(tiny, tmp_path):
    source, ref, windows = tiny
    logs = []
    weights, _specs, plan = S.auto_quantize(source, ref.torch_model, windows, 0.05, transcode=False,
                                           cache_dir=tmp_path, log=logs.append)
    assert set(plan.bits.values()) == {4, 8}
    assert plan.measured_kl <= 0.05 * S.WEIGHT_BUDGET_SHARE
    for u in S.units(source.config):
        for n in u.names:
            assert isinstance(weights[n], BlockQuant) and weights[n].bits == plan.bits[u.label]
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 1
    logs.clear()
    _, _, again = S.auto_quantize(source, ref.torch_model, windows, 0.05, transcode=False, cache_dir=tmp_path,
                                  log=logs.append)
    assert logs[0].startswith("sensitivity: cached") and again.bits == plan.bits
    # an int8 vocabulary matrix (embedding / lm_head) uses blocks of VOCAB_INT8_BLOCK, others the preset's
    for u in S.units(source.config):
        for n in u.names:
            if plan.bits[u.label] == 8:
                want = S.VOCAB_INT8_BLOCK if u.label in ("embed", "lm_head") else 32
                assert weights[n].block_size == want, n


def test_vocab_int8_block_only_where_the_hidden_size_allows():
    from edge_runtime.format.config import ModelConfig

    cfg = ModelConfig("llama", 1000, 576, 1536, 2, 9, 3, 64, tie_word_embeddings=False)
    specs = S.vocab_int8_specs(cfg)
    assert set(specs) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(s.bits == 8 and s.block_size == S.VOCAB_INT8_BLOCK for s in specs.values())
    tied = ModelConfig("llama", 1000, 576, 1536, 2, 9, 3, 64, tie_word_embeddings=True)
    assert set(S.vocab_int8_specs(tied)) == {"model.embed_tokens.weight"}  # tied: one matrix
    assert S.vocab_int8_specs(ModelConfig("llama", 1000, 96, 256, 2, 3, 1, 32)) == {}  # 96 % 64 != 0
    fine = S.vocab_int8_specs(cfg, 16)  # --vocab-block 16: finer int8 activations into the lm_head
    assert set(fine) == set(specs) and all(s.block_size == 16 for s in fine.values())
    assert set(S.vocab_int8_specs(ModelConfig("llama", 1000, 96, 256, 2, 3, 1, 32), 16)) == {
        "model.embed_tokens.weight", "lm_head.weight"}


def test_exact_transcodes_are_not_measured_and_cost_nothing(tiny):
    """A unit whose int4 candidate transcodes the GGUF blocks its float weights came from has sensitivity 0
    without a forward pass; the others are measured as before."""
    import dataclasses

    from export.quality.reference import FloatReference
    from export.sources import GGUFBlocks

    source, _, windows = tiny
    name = "model.layers.0.self_attn.o_proj.weight"
    n, k = source.tensors[name].shape
    rng = np.random.default_rng(3)
    blocks = GGUFBlocks("q4_1", rng.uniform(0.01, 0.05, (n, k // 32)).astype(np.float16).astype(np.float32),
                        rng.normal(0, 0.1, (n, k // 32)).astype(np.float16).astype(np.float32),
                        rng.integers(0, 16, (n, k // 32, 32)).astype(np.uint8))
    tensors = {**source.tensors, name: blocks.dequantize()}
    gguf = dataclasses.replace(source, tensors=tensors, gguf_blocks={name: blocks})
    ref = FloatReference(gguf, threads=1)
    logs = []
    _, _, plan = S.auto_quantize(gguf, ref.torch_model, windows, 0.05, log=logs.append)
    assert plan.sensitivity["layers.0.o"] == 0.0 and plan.bits["layers.0.o"] == 4
    assert any("layers.0.o: exact, not measured" in line for line in logs)
    assert plan.sensitivity["layers.0.qkv"] > 0 and sum("not measured" in line for line in logs) == 1
