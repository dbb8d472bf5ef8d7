"""GPTQ int4 (export/quant/gptq.py): valid MatMulNBits blocks, and a smaller output error than rounding alone."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import export_in_process
from test_export import run_cli

from export.quant.gptq import gptq_int4, hessian_keys
from export.quant.quantize import quantize_int4
from export.sources import load_source

RNG = np.random.default_rng(77)


def correlated_inputs(tokens: int, k: int) -> np.ndarray:
    """[tokens, K] with correlated channels and a few loud ones, like a transformer's normed hidden states."""
    mix = RNG.normal(0, 1, (k, k)) / np.sqrt(k) + np.eye(k)
    x = RNG.normal(0, 1, (tokens, k)) @ mix
    return (x * np.exp(RNG.normal(0, 0.7, k))).astype(np.float32)


def output_error(bq, w, x) -> float:
    """||(W - Q) X^T||^2: what the next layer sees."""
    return float((((bq.dequantize() - w) @ x.T) ** 2).sum())


@pytest.mark.parametrize("block_size", [32, 64])
def test_gptq_beats_the_search_on_the_output_error(block_size):
    k, n = 256, 96
    x = correlated_inputs(1024, k)
    w = (RNG.standard_t(4, (n, k)) * 0.03).astype(np.float32)
    h = x.astype(np.float64).T @ x
    search = quantize_int4(w, block_size, "search", act_scale=np.sqrt((x * x).mean(0)))
    gptq = quantize_int4(w, block_size, "gptq", hessian=h)
    assert output_error(gptq, w, x) < 0.7 * output_error(search, w, x)


def test_gptq_codes_are_valid_blocks():
    k, n, bs = 128, 40, 32
    x = correlated_inputs(300, k)
    w = (RNG.normal(0, 0.05, (n, k))).astype(np.float32)
    bq = quantize_int4(w, bs, "gptq", hessian=x.astype(np.float64).T @ x)
    assert bq.bits == 4 and bq.block_size == bs and bq.offsets is None and bq.zero_points is not None
    deq = bq.dequantize()
    assert deq.shape == w.shape and np.all(np.isfinite(deq))
    # every element sits on its block's grid s*(q - z) with q in 0..15
    codes, s, z = gptq_int4(w, x.astype(np.float64).T @ x, bs, _search)
    assert codes.min() >= 0 and codes.max() <= 15 and np.all(codes == np.rint(codes))
    grid = (codes.reshape(n, -1, bs) - z[..., None]) * s[..., None]
    np.testing.assert_allclose(grid.reshape(n, k), deq, rtol=1e-6, atol=1e-7)


def _search(x, wt):
    from export.quant.quantize import _search_chunk
    return _search_chunk(x, wt, False, 15, grid=True)


def test_gptq_with_an_identity_hessian_is_plain_rounding_of_the_search():
    """No input correlation, nothing to compensate: GPTQ reduces to rounding with the searched parameters."""
    w = RNG.normal(0, 0.05, (16, 64)).astype(np.float32)
    gptq = quantize_int4(w, 32, "gptq", hessian=np.eye(64))
    search = quantize_int4(w, 32, "search")
    np.testing.assert_array_equal(gptq.dequantize(), search.dequantize())


def test_gptq_needs_a_hessian_and_no_offsets():
    w = RNG.normal(0, 0.05, (8, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="Hessian"):
        quantize_int4(w, 32, "gptq")
    with pytest.raises(ValueError, match="offsets"):
        quantize_int4(w, 32, "gptq", offsets=True, hessian=np.eye(64))


def test_hessian_keys_share_inputs_and_skip_a_tied_embedding():
    cfg = load_source("tiny:llama").config
    keys = hessian_keys(cfg)
    assert keys["model.layers.0.self_attn.q_proj.weight"] == keys["model.layers.0.self_attn.v_proj.weight"]
    assert keys["model.layers.0.mlp.gate_proj.weight"] == keys["model.layers.0.mlp.up_proj.weight"]
    assert len(set(keys.values())) == 4 * cfg.num_hidden_layers + (0 if cfg.tie_word_embeddings else 1)
    assert "model.embed_tokens.weight" not in keys


def test_export_int4_gptq_bundle_runs_and_records_the_method(tmp_path):
    out = tmp_path / "gptq"
    export_in_process("tiny:llama", out, "--quant", "int4", "--method", "gptq")
    manifest = json.loads((out / "manifest.json").read_text())
    methods = {t["method"] for n, t in manifest["quantization"]["tensors"].items() if ".layers." in n}
    assert methods == {"gptq"}
    assert manifest["fidelity"]["heldout"]["kl"] < 0.5


def test_export_rejects_gptq_with_offsets(tmp_path):
    p = run_cli("tiny:llama", "--method", "gptq", "--offsets", "--out", tmp_path / "x", "--quiet")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "--method gptq rounds onto integer zero points" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_auto_with_gptq_candidates(tmp_path):
    """--quant auto --method gptq: the int4 candidate of every layer matmul is GPTQ-rounded (the tied
    embedding, which GPTQ cannot round, takes the search), and the plan still meets its target."""
    out = tmp_path / "auto"
    export_in_process("tiny:llama", out, "--quant", "auto", "--method", "gptq", "--target-kld", "0.5")
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    int4 = {n: t["method"] for n, t in q["tensors"].items() if t["bits"] == 4}
    assert int4 and all(m == "gptq" for n, m in int4.items() if ".layers." in n)
    assert all(m == "search" for n, m in int4.items() if "embed_tokens" in n)
    assert q["auto"]["measured_kl"] is not None and q["auto"]["measured_kl"] <= q["auto"]["budget"]


# -- --untie-embeddings: the tied lm_head stored (and quantized) apart from the embedding table ---------------


def test_untied_fp32_bundle_computes_the_same_logits(tiny_bundle):
    from test_export import backend_logits

    tied = tiny_bundle("tiny:llama", "fp32")
    untied = tiny_bundle("tiny:llama", "fp32", "--untie-embeddings")
    m = json.loads((untied / "manifest.json").read_text())
    assert m["config"]["tie_word_embeddings"] is False and m["quantization"]["untied_embeddings"] is True
    ids = list(range(5, 45))
    for backend in ("ort", "numpy"):
        np.testing.assert_allclose(backend_logits(untied, ids, backend), backend_logits(tied, ids, backend),
                                   atol=1e-5, rtol=0)


def test_untied_gptq_bundle_keeps_the_table_at_8_bits_and_verifies(tiny_bundle):
    from edge_runtime.quality import verify as V

    b = tiny_bundle("tiny:llama", "int4", "--method", "gptq", "--untie-embeddings")
    tensors = json.loads((b / "manifest.json").read_text())["quantization"]["tensors"]
    assert tensors["model.embed_tokens.weight"]["bits"] == 8
    assert tensors["lm_head.weight"] == {**tensors["lm_head.weight"], "bits": 4, "method": "gptq"}
    for backend in ("ort", "numpy"):
        res = V.verify(b, backend=backend, threads=1)
        assert res.ok, (backend, [c.line() for c in res.checks])


def test_presets_use_gptq_only_where_it_can_round():
    """GPTQ needs a matmul input; the embedding table (and a tied lm_head, which is that table) keeps the search."""
    import dataclasses

    from export.quant.quantize import preset_specs

    cfg = load_source("tiny:llama").config
    tied = preset_specs(cfg, "int4", method="gptq")
    assert tied["model.embed_tokens.weight"].method == "search"
    assert tied["model.layers.0.mlp.down_proj.weight"].method == "gptq"
    untied = preset_specs(dataclasses.replace(cfg, tie_word_embeddings=False), "int4", method="gptq")
    assert untied["lm_head.weight"].method == "gptq" and untied["model.embed_tokens.weight"].method == "search"
