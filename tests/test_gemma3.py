"""Gemma 3 on a tiny random config (tiny:gemma3: two sliding-window layers of 8 keys and a global one): the
spec, the NumPy forward pass and both backends' bundles against transformers' Gemma3ForCausalLM, and the
window layers' ring-buffer KV caches."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge_runtime.backends.numpy.llama import DecoderForward, DenseWeights
from edge_runtime.format.bundle import FORMAT_VERSION, Bundle
from edge_runtime.spec import spec_for
from export.sources import SourceModel, load_source

CONTEXT = 64
N = 40  # tokens per test sequence: five times the window


@pytest.fixture(scope="module")
def source() -> SourceModel:
    return load_source("tiny:gemma3")


def float_logits(source: SourceModel, ids) -> np.ndarray:
    from export.quality.reference import FloatReference

    return FloatReference(source).logits(ids)  # [S, V]


def with_config(source: SourceModel, **fields) -> SourceModel:
    return dataclasses.replace(source, config=dataclasses.replace(source.config, **fields))


def test_spec_declares_the_gemma3_block(source):
    spec = spec_for(source.config)
    ly = spec.layers[0]
    assert spec.family == "gemma3_text" and spec.activation == "gelu_tanh" and spec.norm_offset == 1.0
    assert (ly.attn_norm, ly.attn_out_norm, ly.mlp_norm, ly.mlp_out_norm) == tuple(
        f"model.layers.0.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm",
                                               "pre_feedforward_layernorm", "post_feedforward_layernorm"))
    assert ly.q_norm == "model.layers.0.self_attn.q_norm.weight"
    assert spec.windows == (8, 8, None)
    assert [(r.theta, r.factor) for r in spec.ropes] == [(10000.0, 1.0), (1000000.0, 1.0)]
    assert spec.embed_scale() == pytest.approx(8.0) and spec.attn_scale() == pytest.approx(24 ** -0.5)
    assert list(source.tensors) == spec.tensor_names() and "lm_head.weight" not in source.tensors
    entry = spec.manifest()
    assert [u["label"] for u in entry["units"][:4]] == ["layers.0.qkv", "layers.0.o", "layers.0.gate_up",
                                                        "layers.0.down"]
    assert [layer["window"] for layer in entry["layers"]] == [8, 8, None]


def test_default_layer_pattern_is_five_local_one_global(source):
    cfg = dataclasses.replace(source.config, num_hidden_layers=12, layer_types=None, sliding_window=512)
    assert spec_for(cfg).windows == (512,) * 5 + (None,) + (512,) * 5 + (None,)


@pytest.mark.parametrize("fields", [{}, {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0},
                                    {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}],
                         ids=["plain", "softcap", "linear-rope"])
def test_numpy_forward_matches_transformers(source, fields):
    """Prefill, chunked prefill (13 + 27) and token-by-token decoding, past the window on every path."""
    src = with_config(source, **fields)
    ids = np.random.default_rng(1).integers(0, src.config.vocab_size, N)
    ref = float_logits(src, ids)                                            # [N, V]
    assert np.abs(ref).max() > 1.0

    def model():
        return DecoderForward(src.config, DenseWeights(src.tensors, src.config), CONTEXT)

    np.testing.assert_allclose(model().forward(ids, 0, np.arange(N)), ref, atol=1e-4, rtol=0)
    m = model()
    m.forward(ids[:13], 0, np.array([12]))
    np.testing.assert_allclose(m.forward(ids[13:], 13, np.arange(N - 13)), ref[13:], atol=1e-4, rtol=0)
    m = model()
    steps = np.stack([m.forward(ids[i:i + 1], i, np.array([0]))[0] for i in range(N)])
    np.testing.assert_allclose(steps, ref, atol=1e-4, rtol=0)


def test_the_window_matters(source):
    """Without the window the same weights give other logits after position 8 (and the same before)."""
    ids = np.random.default_rng(1).integers(0, source.config.vocab_size, N)
    ref = float_logits(source, ids)
    wide = with_config(source, sliding_window=CONTEXT)
    out = DecoderForward(wide.config, DenseWeights(wide.tensors, wide.config), CONTEXT).forward(ids, 0, np.arange(N))
    np.testing.assert_allclose(out[:8], ref[:8], atol=1e-4, rtol=0)
    assert np.abs(out[8:] - ref[8:]).max(axis=-1).min() > 1e-2


def test_window_layers_keep_a_ring_of_window_positions_and_room_for_a_reply(source):
    """Rings of W - 1 + W // 2 = 11 positions: a pass may start 4 positions before the end (a reply of up to 4
    tokens run again), and there gives the logits of a fresh prefill; earlier it is refused by the floor."""
    cfg = source.config
    m = DecoderForward(cfg, DenseWeights(source.tensors, cfg), CONTEXT)
    per_position = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert [k.shape[1] for k in m.cache.keys] == [11, 11, CONTEXT]
    assert m.cache.nbytes == per_position * (11 + 11 + CONTEXT)
    assert m.cache.ring == 8
    assert [m.cache.floor(end) for end in (5, 11, 12, 30)] == [0, 0, 8, 26]
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, N)
    fresh = DecoderForward(cfg, DenseWeights(source.tensors, cfg), CONTEXT).forward(ids, 0, np.arange(N))
    m.forward(ids[:30], 0, np.array([29]))
    again = m.forward(ids[26:], 26, np.arange(N - 26))                   # over positions 26..29 it wrote
    np.testing.assert_allclose(again, fresh[26:], atol=1e-5, rtol=0)
    m.forward(ids[:30], 0, np.array([29]))
    for i in range(26, N):                                              # token by token from the floor
        np.testing.assert_allclose(m.forward(ids[i:i + 1], i, np.array([0]))[0], fresh[i], atol=1e-5, rtol=0)


def backend_logits(bundle: Bundle, backend: str, ids, stepwise: bool = False, **kw) -> np.ndarray:
    from edge_runtime.backends import make_backend
    from edge_runtime.quality.verify import all_logits, stepwise_logits

    b = make_backend(backend, bundle, CONTEXT, 1, **kw)
    return stepwise_logits(b, ids) if stepwise else all_logits(b, ids)


@pytest.mark.parametrize("backend", ["ort", "numpy"])
def test_fp32_bundle_matches_the_float_model(tiny_bundle, source, backend):
    """The exported graph and the NumPy backend against transformers: logits, prefill and stepwise past the
    window, and greedy ids."""
    from edge_runtime.quality.verify import greedy_ids
    from export.quality.reference import FloatReference

    bundle = Bundle.open(tiny_bundle("tiny:gemma3", "fp32"))
    assert bundle.manifest["format_version"] == FORMAT_VERSION
    assert [layer["window"] for layer in bundle.manifest["decoder"]["layers"]] == [8, 8, None]
    ids = np.random.default_rng(2).integers(0, source.config.vocab_size, N)
    ref = FloatReference(source)
    want = ref.logits(ids)
    np.testing.assert_allclose(backend_logits(bundle, backend, ids), want, atol=2e-4, rtol=0)
    np.testing.assert_allclose(backend_logits(bundle, backend, ids, stepwise=True), want, atol=2e-4, rtol=0)
    from edge_runtime.backends import make_backend

    prompt = [int(t) for t in ids[:5]]
    assert greedy_ids(make_backend(backend, bundle, CONTEXT, 1), prompt, 30) == ref.greedy(prompt, 30)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_presets_verify_and_cross_check(tiny_bundle, quant):
    """int8/int4 bundles pass edge-run verify on both backends and the NumPy-vs-ORT cross-check."""
    from edge_runtime.quality.cross_check import cross_check
    from edge_runtime.quality.verify import verify

    path = tiny_bundle("tiny:gemma3", quant)
    for backend in ("ort", "numpy"):
        res = verify(path, backend=backend, threads=1)
        assert res.ok, (backend, res.failed)
    res = cross_check(path, threads=1)
    assert res.ok, res.lines()


def test_ort_window_buffers_shift_within_their_plan(tiny_bundle, source):
    """Under ONNX Runtime the window layers' buffers hold W - 1 + W // 2 = 11 positions; the memory plan counts
    exactly those, a rewind the buffers still hold equals a fresh prefill, and one they no longer hold is
    refused."""
    from edge_runtime.backends import make_backend
    from edge_runtime.errors import EdgeError
    from edge_runtime.memory import budget

    bundle = Bundle.open(tiny_bundle("tiny:gemma3", "fp32"))
    b = make_backend("ort", bundle, CONTEXT, 1)
    assert [a.shape[2] for a in b.kv_arrays()] == [11] * 4 + [CONTEXT] * 2
    plan = budget.plan_session(bundle, CONTEXT, "ort")
    windows = budget.layer_windows(bundle.manifest)
    assert plan["kv_cache"] == b.kv_nbytes() + budget.window_rotary_bytes(
        bundle.config, CONTEXT, "float32", windows)
    ids = np.random.default_rng(3).integers(0, source.config.vocab_size, N)
    b.forward(ids, 0, np.array([N - 1]))
    fresh = make_backend("ort", bundle, CONTEXT, 1).forward(ids, 0, np.arange(N))
    np.testing.assert_allclose(b.forward(ids[N - 2:], N - 2, np.arange(2)), fresh[N - 2:], atol=1e-5, rtol=0)
    with pytest.raises(EdgeError, match="prefill from 0"):
        b.forward(ids[20:], 20, np.array([0]))
