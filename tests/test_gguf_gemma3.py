"""Reading Gemma 3 GGUF metadata: config keys as Hugging Face spells them, what llama.cpp fixes in code."""
from __future__ import annotations

import pytest

from export.sources.gguf import config_dict

gguf = pytest.importorskip("gguf")


def gemma3_fields(tmp_path, **extra):
    """GGUF metadata of Gemma 3 270M, as llama.cpp's converter writes it (no tensors)."""
    w = gguf.GGUFWriter(tmp_path / "g.gguf", "gemma3")
    w.add_context_length(32768)
    w.add_embedding_length(640)
    w.add_block_count(18)
    w.add_feed_forward_length(2048)
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_key_length(256)
    w.add_value_length(256)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(512)
    for key, value in extra.items():
        w.add_uint32(f"gemma3.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(tmp_path / "g.gguf").fields


def test_gemma3_config(tmp_path):
    cfg = config_dict(gemma3_fields(tmp_path), "gemma3", 262144, tied=True)
    assert cfg["model_type"] == "gemma3_text"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]) == (18, 640, 4, 1, 256, 2048, 262144)
    assert (cfg["rms_norm_eps"], cfg["rope_theta"], cfg["rope_local_base_freq"]) == (1e-6, 1e6, 10000.0)
    assert cfg["sliding_window"] == 512 and cfg["query_pre_attn_scalar"] == 256
    # one global layer in six: layers 5, 11, 17
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert cfg["tie_word_embeddings"] and not cfg["attention_bias"]


def test_gemma3_global_period_from_metadata(tmp_path):
    cfg = config_dict(gemma3_fields(tmp_path, **{"attention.sliding_window_pattern": 3}), "gemma3", 10, True)
    assert cfg["layer_types"][:6] == ["sliding_attention", "sliding_attention", "full_attention"] * 2
