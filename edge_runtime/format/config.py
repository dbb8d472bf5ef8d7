"""Model dimensions shared by the exporter, the graph builder and both runtime backends.

Field names keep the Hugging Face `config.json` spelling so that a config loads without a rename table.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    sliding_window: Optional[int] = None  # keys a windowed layer attends to (edge_runtime.spec: which layers)
    rope_scaling: Optional[Mapping[str, Any]] = None  # HF rope_scaling ("linear" supported)
    # Gemma 3 (None elsewhere)
    layer_types: Optional[tuple] = None  # "sliding_attention" | "full_attention" per layer
    rope_local_base_freq: Optional[float] = None  # rope base of the sliding-window layers
    query_pre_attn_scalar: Optional[float] = None  # attention scores scaled by its -1/2 power
    attn_logit_softcapping: Optional[float] = None  # scores -> c * tanh(scores / c)
    final_logit_softcapping: Optional[float] = None  # logits -> c * tanh(logits / c)

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a manifest entry or a Hugging Face config.json (extra keys ignored)."""
        d = dict(d)
        if "head_dim" not in d or d["head_dim"] is None:
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d["num_attention_heads"]
        if d.get("model_type") == "qwen2" and "attention_bias" not in d:
            d["attention_bias"] = True
        if d.get("layer_types") is not None:
            d["layer_types"] = tuple(d["layer_types"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

