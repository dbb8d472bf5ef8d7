"""Model sources: tiny models, GGUF reading (names, Q/K un-permutation, quant blocks), tokenizers, float reference."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_runtime.errors import UnsupportedModelError
from edge_runtime.spec import spec_for
from export.quality.reference import FloatReference
from export.sources import load_source, render_chat
from export.sources.fetch import default_model_path
from export.sources.gguf import unpermute_order
from export.sources.hf import read_hf_folder, save_hf_folder

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
TINY_SPECS = ("tiny:llama", "tiny:qwen2", "tiny:mistral", "tiny:llama-untied", "tiny:gemma3")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tokenizer(source):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(source.tokenizer_json)


def chat_ids(source, text="What is an assignment statement?"):
    return tokenizer(source).encode(render_chat(source.tokenizer_meta, text), add_special_tokens=False).ids


# --- tiny sources and the float reference -------------------------------------------------------------------


@pytest.mark.parametrize("spec", TINY_SPECS)
def test_tiny_source_and_reference(spec):
    src = load_source(spec)
    assert list(src.tensors) == spec_for(src.config).tensor_names()
    assert all(t.dtype == np.float32 for t in src.tensors.values())
    assert 300 <= src.config.vocab_size <= 512
    assert src.config.tie_word_embeddings == ("lm_head.weight" not in src.tensors)
    assert src.config.attention_bias == (src.config.model_type == "qwen2")
    ids = chat_ids(src)
    ref = FloatReference(src)
    logits = ref.logits(ids)
    assert logits.shape == (len(ids), src.config.vocab_size) and logits.dtype == np.float32
    out = ref.greedy(ids, 6)
    # The KV-cache path must agree with full recomputation: each token is the argmax after its prefix.
    full = ref.logits(ids + out[:-1])
    assert out == [int(t) for t in full[len(ids) - 1:].argmax(-1)]
    assert load_source(spec).origin["sha256"] == src.origin["sha256"]  # seeded


def test_tiny_variants_and_bad_specs():
    assert load_source("tiny:mistral-tied").config.tie_word_embeddings
    assert not load_source("tiny:qwen2-untied").config.tie_word_embeddings
    for bad in ("tiny:gpt2", "tiny:llama-half", "/nonexistent/model.gguf"):
        with pytest.raises(UnsupportedModelError):
            load_source(bad)


@pytest.mark.parametrize("spec", ("tiny:llama", "tiny:qwen2", "tiny:mistral", "tiny:gemma3"))
def test_hf_folder_round_trip_matches_transformers(spec, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = load_source(spec)
    save_hf_folder(src, tmp_path)
    back = read_hf_folder(tmp_path)
    assert back.config == src.config
    assert back.tokenizer_meta == src.tokenizer_meta
    assert all(np.array_equal(back.tensors[n], src.tensors[n]) for n in src.tensors)
    ids = chat_ids(src)
    assert chat_ids(back) == ids

    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "What is an assignment statement?"}]
    bos = [src.tokenizer_meta["bos_token_id"]] if src.tokenizer_meta["add_bos_token"] else []
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True) == ids
    assert hf_tok("a b").input_ids == bos + tokenizer(src).encode("a b").ids

    model = AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(FloatReference(src).logits(ids), want, rtol=1e-5, atol=1e-5)


def test_hf_folder_outside_llama_family_goes_to_optimum_or_is_rejected(tmp_path):
    save_hf_folder(load_source("tiny:llama"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    assert load_source(str(tmp_path)).origin["exporter"] == "optimum"  # known to transformers: fallback path
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="made-up-arch")))
    with pytest.raises(UnsupportedModelError, match="made-up-arch"):
        load_source(str(tmp_path))


# --- GGUF: names, Q/K permutation, quant blocks ----------------------------------------------------------


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute, as llama.cpp applies it to q_proj / k_proj."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, src, arch, qtype_of, permute=True, gguf_arch=None):
    """Write a tiny HF-layout model as llama.cpp would: GGUF names, Q/K rows permuted, chosen quant types."""
    cfg, meta = src.config, src.tokenizer_meta
    arch_enum = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(path, gguf_arch or arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tok = json.loads(src.tokenizer_json)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["id"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in specials else 1 for _, i in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    if meta["bos_token_id"] is not None:
        w.add_bos_token_id(meta["bos_token_id"])
    w.add_eos_token_id(meta["eos_token_ids"][0])
    w.add_pad_token_id(meta["pad_token_id"])
    w.add_add_bos_token(meta["add_bos_token"])
    w.add_chat_template(meta["chat_template"])
    for name, t in src.tensors.items():
        if permute and ".q_proj." in name:
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        if permute and ".k_proj." in name:
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        qtype = qtype_of(name) if t.ndim == 2 else Q.F32
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        w.add_tensor(gname, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unpermute_order_inverts_llama_cpp_permute():
    w = np.arange(24 * 3).reshape(24, 3)
    for n_head in (1, 2, 3, 6):
        assert np.array_equal(llama_cpp_permute(w, n_head)[unpermute_order(24, n_head)], w)


@pytest.mark.parametrize("spec,arch", [("tiny:llama-untied", "llama"), ("tiny:qwen2", "qwen2")])
def test_gguf_f32_reads_back_exactly(spec, arch, tmp_path):
    src = load_source(spec)
    path = write_gguf(tmp_path / "m.gguf", src, arch, lambda n: Q.F32, permute=arch == "llama")
    back = load_source(str(path))
    assert back.config == src.config
    assert set(back.tensors) == set(src.tensors)
    for name, t in src.tensors.items():
        assert np.array_equal(back.tensors[name], t), name
    assert back.tokenizer_meta == src.tokenizer_meta
    text = "x = [1, 2, 3]  # naïve café\n\tif a: b()"
    assert tokenizer(back).encode(text).ids == tokenizer(src).encode(text).ids
    assert back.origin["format"] == "gguf" and len(back.origin["sha256"]) == 64
    assert back.gguf_blocks == {}


def block_formula(b):
    """The documented meaning of GGUFBlocks: W = d*q + m (q4_1), d*(q-8) (q4_0), d*(q-128) (q8_0)."""
    d = b.d[..., None]
    if b.kind == "q4_1":
        return d * b.q + b.m[..., None]
    if b.kind == "q4_0":
        return d * (b.q.astype(np.float32) - 8)
    return d * (b.q.astype(np.float32) - 128)


def test_gguf_quant_blocks_match_gguf_dequantize(tmp_path):
    src = load_source("tiny:llama-untied")
    kinds = {"down_proj": Q.Q4_0, "o_proj": Q.Q8_0, "embed_tokens": Q.Q8_0, "lm_head": Q.F16}

    def qtype_of(name):
        return next((q for k, q in kinds.items() if k in name), Q.Q4_1)

    back = load_source(str(write_gguf(tmp_path / "q.gguf", src, "llama", qtype_of)))
    for name, t in src.tensors.items():
        qtype = qtype_of(name) if t.ndim == 2 else Q.F32
        # Quant blocks run along rows, so quantizing the permuted matrix and un-permuting equals quantizing W.
        want = gguf.quants.dequantize(gguf.quants.quantize(t, qtype), qtype).reshape(t.shape)
        assert np.array_equal(back.tensors[name], want), name
        kind = {Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q8_0: "q8_0"}.get(qtype)
        if kind is None:
            assert name not in back.gguf_blocks
            continue
        b = back.gguf_blocks[name]
        n, k = t.shape
        assert b.kind == kind and b.d.shape == (n, k // 32) and b.q.shape == (n, k // 32, 32)
        assert (b.m is not None) == (kind == "q4_1")
        assert b.q.dtype == np.uint8
        if kind != "q8_0":
            assert b.q.max() <= 15
        assert np.array_equal(block_formula(b).reshape(n, k), want), name
    # The float reference of the dequantized GGUF stays close to the original tiny model.
    ids = chat_ids(src)
    a, b = FloatReference(src).logits(ids), FloatReference(back).logits(ids)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_gguf_unknown_architecture(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", load_source("tiny:llama"), "llama", lambda n: Q.F32, gguf_arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_source(str(path))


# --- the real model: tokenizer from GGUF metadata, coherent greedy answer ------------------------------------


@pytest.fixture(scope="module")
def real():
    return load_source(str(default_model_path()))


def test_real_gguf_config(real):
    c = real.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        "llama", 30, 576, 9, 3)
    assert (c.head_dim, c.intermediate_size, c.vocab_size, c.rope_theta) == (64, 1536, 49152, 100000.0)
    assert c.tie_word_embeddings and "lm_head.weight" not in real.tensors
    assert real.gguf_blocks["model.embed_tokens.weight"].kind == "q8_0"
    assert sum(b.kind == "q4_1" for b in real.gguf_blocks.values()) == 210


def test_real_tokenizer_round_trip(real):
    from pydoc_data.topics import topics

    tok = tokenizer(real)
    text = "\n".join(topics[k] for k in sorted(topics))
    assert tok.decode(tok.encode(text).ids) == text
    for s in ("naïve café — 日本語の文章 🙂👍🏽", "  two  spaces\t\ttabs\r\n", "Ünïcödé ÆØÅ ß ﬁ", "x=1_000_000; y≠z"):
        assert tok.decode(tok.encode(s).ids) == s
    # SmolLM2 splits digits one by one (Digits(individual_digits=True) before byte-level BPE).
    assert tok.encode("2024").tokens == ["2", "0", "2", "4"]
    assert tok.encode(" the").ids == [tok.token_to_id("Ġthe")]  # merges applied, not just bytes


def test_real_special_tokens_and_chat_template(real):
    tok, meta = tokenizer(real), real.tokenizer_meta
    assert (meta["bos_token_id"], meta["eos_token_ids"], meta["pad_token_id"]) == (1, [2], 2)
    assert meta["add_bos_token"] is False
    for i, s in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
        assert tok.encode(s).ids == [i]
    prompt = render_chat(meta, "Hi")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt).ids
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    assert tok.decode(ids, skip_special_tokens=False) == prompt


def test_real_model_greedy_is_coherent(real):
    ids = chat_ids(real, "What is the capital of France?")
    out = FloatReference(real, threads=1).greedy(ids, 16, eos_ids=real.tokenizer_meta["eos_token_ids"])
    assert "Paris" in tokenizer(real).decode(out)
