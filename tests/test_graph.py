"""The edge-llama-v1 graph (export/graph) run by OrtBackend against transformers, and the bundle writer."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from edge_runtime.backends.ort.llama import OrtBackend, make_session_options
from edge_runtime.errors import ContextOverflowError, UnsupportedModelError
from edge_runtime.format.bundle import ALIGN, Bundle
from edge_runtime.format.config import ModelConfig
from edge_runtime.format.quant import BlockQuant
from export.bundle.writer import write_bundle
from export.graph import GraphOptions, build_decoder_graph
from export.quant.quantize import quantize_int4, quantize_int8

TINY = {"vocab_size": 160, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0}
IDS = np.array([5, 9, 17, 3, 99, 1, 4, 60, 7, 2, 150, 33], np.int64)
MAX_CONTEXT = 64


def tiny_hf(arch: str, tied: bool):
    torch.manual_seed(0)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=tied)).eval()
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied)).eval()


def hf_weights(hf) -> tuple[ModelConfig, dict]:
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return cfg, sd


def hf_logits(hf, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(ids[None])).logits[0].numpy()


def make_backend(tmp_path, cfg, weights, context=32, **opts) -> OrtBackend:
    graph = build_decoder_graph(cfg, weights, GraphOptions(max_context=MAX_CONTEXT, **opts))
    out = write_bundle(tmp_path / "bundle", config=cfg, graph=graph, manifest_fields={"max_context": MAX_CONTEXT},
                       extra_files={"tokenizer.json": "{}"})
    return OrtBackend(Bundle.open(out), context=context, threads=1)


def check_all_modes(be: OrtBackend, ref: np.ndarray, tol: float) -> None:
    """Prefill, a two-chunk prefill and token-by-token decode each reproduce the reference logits."""
    n = len(IDS)
    np.testing.assert_allclose(be.forward(IDS, 0, np.arange(n)), ref, atol=tol, rtol=0)
    first = be.forward(IDS[:7], 0, np.arange(7))
    second = be.forward(IDS[7:], 7, np.arange(n - 7))
    np.testing.assert_allclose(np.concatenate([first, second]), ref, atol=tol, rtol=0)
    steps = [be.forward(IDS[:3], 0, np.array([2]))]
    steps += [be.forward(IDS[t:t + 1], t, np.zeros(1, np.int64)) for t in range(3, n)]
    np.testing.assert_allclose(np.concatenate(steps), ref[2:], atol=tol, rtol=0)


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_fp32_graph_matches_transformers(tmp_path, arch, tied):
    hf = tiny_hf(arch, tied)
    cfg, weights = hf_weights(hf)
    check_all_modes(make_backend(tmp_path, cfg, weights), hf_logits(hf), tol=1e-4)


def test_unfused_projections_match(tmp_path):
    hf = tiny_hf("qwen2", tied=True)
    cfg, weights = hf_weights(hf)
    be = make_backend(tmp_path, cfg, weights, fuse_qkv=False, fuse_gate_up=False)
    check_all_modes(be, hf_logits(hf), tol=1e-4)


def quantize_linears(weights: dict, quantize) -> dict:
    """Every 2-D weight (linears and the embedding) replaced by quantize(w)."""
    return {k: quantize(w) if w.ndim == 2 else w for k, w in weights.items()}


def dequantized_hf(hf, qweights: dict):
    """The transformers model carrying the dequantized weights: the exact reference of a quantized graph."""
    sd = {k: torch.from_numpy(w.dequantize() if isinstance(w, BlockQuant) else w) for k, w in qweights.items()}
    if hf.config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict(sd)
    return hf


@pytest.mark.parametrize("quantize", [
    lambda w: quantize_int8(w, 32),
    lambda w: quantize_int4(w, 16, method="rtn"),                 # integer zero points
    lambda w: quantize_int4(w, 32, method="rtn", offsets=True),   # float offsets: blocksum @ offsets^T
], ids=["int8", "int4-zp", "int4-offsets"])
@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
def test_quantized_graph_matches_dequantized_reference(tmp_path, quantize, arch, tied):
    hf = tiny_hf(arch, tied)
    cfg, weights = hf_weights(hf)
    qweights = quantize_linears(weights, quantize)
    ref = hf_logits(dequantized_hf(hf, qweights))
    # accuracy_level 0 keeps activations in fp32: the graph computes exactly the dequantized model.
    check_all_modes(make_backend(tmp_path, cfg, qweights, accuracy_level=0), ref, tol=1e-4)


def test_int8_activations_stay_close(tmp_path):
    hf = tiny_hf("llama", tied=True)
    cfg, weights = hf_weights(hf)
    qweights = quantize_linears(weights, lambda w: quantize_int4(w, 32, method="rtn"))
    ref = hf_logits(dequantized_hf(hf, qweights))
    out = make_backend(tmp_path, cfg, qweights, accuracy_level=4).forward(IDS, 0, np.arange(len(IDS)))
    # int8-quantized activations: a small relative error, and the same argmax nearly everywhere.
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def optimized_graph(model_path, tmp_path, **options) -> onnx.GraphProto:
    """The graph as the backend's session options leave it after ONNX Runtime's optimizers."""
    import onnxruntime as ort

    so = make_session_options(1, options)
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph


def test_decode_path_layout_survives_session_optimization(tmp_path):
    hf = tiny_hf("llama", tied=True)
    cfg, weights = hf_weights(hf)
    qweights = quantize_linears(weights, lambda w: quantize_int4(w, 32, method="rtn", offsets=True))
    qweights["model.embed_tokens.weight"] = quantize_int4(weights["model.embed_tokens.weight"], 32, method="rtn")
    graph = build_decoder_graph(cfg, qweights, GraphOptions(max_context=MAX_CONTEXT))
    out = write_bundle(tmp_path / "b", config=cfg, graph=graph, manifest_fields={}, extra_files={})
    g = optimized_graph(out / "model.onnx", tmp_path)
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name for t in g.initializer}
    gemms = [n for n in g.node if n.name.endswith("/offsets/Gemm")]
    assert len(gemms) == 4 * cfg.num_hidden_layers
    # offsets stay an unpacked view (a Reshape of the bundle's array), block sums a Reshape + ReduceSum
    assert all(producer[n.input[1]].op_type == "Reshape" and n.input[1] not in inits for n in gemms)
    assert {producer[n.input[0]].op_type for n in gemms} == {"ReduceSum"}
    assert producer["logits"].op_type == "MatMulNBits"  # the lm_head writes the bound logits buffer itself
    folded = optimized_graph(out / "model.onnx", tmp_path, constant_folding=True)
    assert all(n.input[1] in {t.name for t in folded.initializer} for n in folded.node
               if n.name.endswith("/offsets/Gemm"))


def test_tied_quantized_embedding_is_stored_once(tmp_path):
    hf = tiny_hf("llama", tied=True)
    cfg, weights = hf_weights(hf)
    qweights = quantize_linears(weights, lambda w: quantize_int4(w, 32, method="rtn"))
    graph = build_decoder_graph(cfg, qweights, GraphOptions(max_context=MAX_CONTEXT))
    out = write_bundle(tmp_path / "b", config=cfg, graph=graph, manifest_fields={}, extra_files={})
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    model_inits = {t.name: t for t in model.graph.initializer}
    base = model_inits["model.embed_tokens.weight.qweight"]
    alias = [t for n, t in model_inits.items() if n.startswith("model.embed_tokens.weight.qweight/")]
    assert len(alias) == 1 and list(alias[0].dims) == [cfg.vocab_size, cfg.hidden_size // 2]
    assert alias[0].external_data == base.external_data  # same offset and length in weights.bin
    assert not any(k.startswith("lm_head") for k in Bundle.open(out).tensor_index)


def test_bundle_index_reads_back_every_weight(tmp_path):
    hf = tiny_hf("qwen2", tied=False)
    cfg, weights = hf_weights(hf)
    qweights = quantize_linears(weights, lambda w: quantize_int4(w, 32, method="rtn", offsets=True))
    qweights["model.embed_tokens.weight"] = quantize_int8(weights["model.embed_tokens.weight"], 32)
    graph = build_decoder_graph(cfg, qweights, GraphOptions(max_context=MAX_CONTEXT))
    bundle = Bundle.open(write_bundle(tmp_path / "b", config=cfg, graph=graph, manifest_fields={"max_context": 64},
                                      extra_files={"tokenizer.json": "{}"}))
    expected = {}
    for name, w in qweights.items():
        arrays = {f"{name}.{s}": a for s, a in w.arrays().items()} if isinstance(w, BlockQuant) else {name: w}
        expected.update(arrays)
    for name, arr in expected.items():
        got = bundle.tensor(name)
        assert got.dtype == arr.dtype and got.shape == arr.shape, name
        assert got.tobytes() == np.ascontiguousarray(arr).tobytes(), name
    assert set(expected) <= set(bundle.tensor_index)
    model = onnx.load(str(bundle.path("model.onnx")), load_external_data=False)
    for t in model.graph.initializer:
        if t.external_data:
            assert int({e.key: e.value for e in t.external_data}["offset"]) % ALIGN == 0, t.name
    assert bundle.manifest["graph"]["inputs"][:4] == ["input_ids", "logits_index", "seqlens_k", "total_sequence_length"]
    assert set(bundle.manifest["files"]) == {"model.onnx", "weights.bin", "tokenizer.json"}


class Boom(Exception):
    pass


def test_bundle_writer_is_atomic(tmp_path):
    hf = tiny_hf("llama", tied=True)
    cfg, weights = hf_weights(hf)
    out = tmp_path / "bundle"

    def fail_midway(done, total):
        if done > total // 2:
            raise Boom()

    graph = build_decoder_graph(cfg, weights, GraphOptions(max_context=MAX_CONTEXT))
    with pytest.raises(Boom):
        write_bundle(out, config=cfg, graph=graph, manifest_fields={}, extra_files={}, progress=fail_midway)
    assert os.listdir(tmp_path) == []  # nothing left behind, not even the temp folder

    graph = build_decoder_graph(cfg, weights, GraphOptions(max_context=MAX_CONTEXT))
    write_bundle(out, config=cfg, graph=graph, manifest_fields={"note": "first"}, extra_files={})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    graph = build_decoder_graph(cfg, weights, GraphOptions(max_context=MAX_CONTEXT))
    with pytest.raises(Boom):
        write_bundle(out, config=cfg, graph=graph, manifest_fields={}, extra_files={}, progress=fail_midway)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old bundle is untouched
    assert os.listdir(tmp_path) == ["bundle"]
    graph = build_decoder_graph(cfg, weights, GraphOptions(max_context=MAX_CONTEXT))
    write_bundle(out, config=cfg, graph=graph, manifest_fields={"note": "second"}, extra_files={})
    assert json.loads((out / "manifest.json").read_text())["note"] == "second"
    assert os.listdir(tmp_path) == ["bundle"]


def test_backend_rejects_overflow_and_rewinds(tmp_path):
    hf = tiny_hf("llama", tied=True)
    cfg, weights = hf_weights(hf)
    be = make_backend(tmp_path, cfg, weights, context=8)
    assert be.kv_nbytes() == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 8 * cfg.head_dim * 4
    with pytest.raises(ContextOverflowError):
        be.forward(IDS[:9], 0, np.array([8]))
    with pytest.raises(ContextOverflowError):
        OrtBackend(Bundle.open(tmp_path / "bundle"), context=MAX_CONTEXT + 1)
    # Rewinding = calling again with a smaller past_len: the stale cache entries are overwritten.
    ref = hf_logits(hf, IDS[:6])
    be.forward(np.array([1, 2, 3, 4, 5, 6, 7, 8]), 0, np.array([7]))
    be.forward(IDS[:4], 0, np.array([3]))
    np.testing.assert_allclose(be.forward(IDS[4:6], 4, np.array([0, 1])), ref[4:6], atol=1e-4, rtol=0)


def test_float16_kv_cache_stays_close(tmp_path):
    hf = tiny_hf("llama", tied=True)
    cfg, weights = hf_weights(hf)
    be = make_backend(tmp_path, cfg, weights, kv_dtype="float16")
    assert be.kv_dtype == "float16" and be.kv[0][0].dtype == np.float16
    ref = hf_logits(hf)
    check_all_modes(be, ref, tol=5e-3 * np.abs(ref).max())


def test_bundle_holds_a_graph_per_kv_dtype_over_one_weights_file(tiny_bundle):
    """Exported bundles carry float32- and float16-KV graphs sharing weights.bin; both backends default to the
    float32 one, take float16 when asked, and the two caches give the same answer to float16 rounding."""
    from edge_runtime.backends.numpy.backend import NumpyBackend

    bundle = Bundle.open(tiny_bundle("tiny:llama", "int4"))
    graph = bundle.manifest["graph"]
    assert bundle.kv_dtypes == ("float32", "float16") and graph["file"] == "model.onnx"
    assert graph["kv_graphs"] == {"float32": "model.onnx", "float16": "model.float16.onnx"}
    assert {"model.onnx", "model.float16.onnx", "weights.bin"} <= set(bundle.manifest["files"])
    offsets = {}
    for kv, name in graph["kv_graphs"].items():
        model = onnx.load(str(bundle.path(name)), load_external_data=False)
        locs = {t.name: {e.key: e.value for e in t.external_data}
                for t in model.graph.initializer if t.external_data}
        assert {loc["location"] for loc in locs.values()} == {"weights.bin"}
        offsets[kv] = {n: loc["offset"] for n, loc in locs.items()}
        past = next(v for v in model.graph.input if v.name == "past_key_values.0.key")
        assert helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type).name == kv
    shared = set(offsets["float32"]) & set(offsets["float16"])
    assert any(n.endswith(".qweight") for n in shared)
    assert all(offsets["float32"][n] == offsets["float16"][n] for n in shared)  # stored once
    assert set(offsets["float16"]) - shared == {"rotary.cos_cache.float16", "rotary.sin_cache.float16"}

    ids = np.arange(5, 17, dtype=np.int64)
    every = np.arange(len(ids), dtype=np.int64)
    runs = {}
    for kv in (None, "float16"):
        ort_be = OrtBackend(bundle, 32, threads=1, kv_dtype=kv)
        np_be = NumpyBackend(bundle, 32, threads=1, kv_dtype=kv)
        want = kv or "float32"
        assert ort_be.kv_dtype == np_be.kv_dtype == want and ort_be.kv[0][0].dtype == np.dtype(want)
        runs[kv] = ort_be.forward(ids, 0, every)
    scale = np.abs(runs[None]).max()
    np.testing.assert_allclose(runs["float16"], runs[None], atol=2e-2 * scale, rtol=0)
    with pytest.raises(UnsupportedModelError):
        OrtBackend(Bundle.open(tiny_bundle("tiny:llama", "int4", "--kv-dtype", "float16")), 32, kv_dtype="float32")


def test_backend_lets_the_weight_file_pages_go_after_each_chunk_and_every_release_steps(tiny_bundle):
    """The memory plan's `mapped` bound for ONNX Runtime (budget.ort_weight_bytes) holds because the backend
    releases the weight file's pages after every multi-token chunk and every RELEASE_STEPS decode steps."""
    from edge_runtime.backends.ort.llama import OrtBackend
    from edge_runtime.memory.pages import RELEASE_STEPS

    be = OrtBackend(Bundle.open(tiny_bundle("tiny:llama", "int4")), context=RELEASE_STEPS * 2 + 8, threads=1)
    assert be.weight_pages.spans  # the file's mappings were found
    calls = []
    be.weight_pages.release = lambda: calls.append(1) or 0
    ids = np.array([3, 5, 7, 9], np.int64)
    be.forward(ids, 0, np.array([3], np.int64))
    assert len(calls) == 1
    for i in range(2 * RELEASE_STEPS):
        be.forward(ids[:1], 4 + i, np.zeros(1, np.int64))
    assert len(calls) == 3
