"""DecoderSpec: one decoder family declared once (tensor names, fused units, what feeds each matmul, sizes,
norms, attention pattern, rope), from which the exporter, both backends and the memory planner derive.

A family is a subclass that sets a few class attributes and overrides a hook or two (see llama.py, gemma3.py).
Everything here is plain Python over a ModelConfig, so the runtime imports it without torch or onnx.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

from ..format.config import ModelConfig

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

# llama.cpp block tensor -> Hugging Face module suffix, for the families whose blocks read like Llama's.
GGUF_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL = {"token_embd.weight": EMBED, "output_norm.weight": FINAL_NORM, "output.weight": LM_HEAD}


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer type: base `theta`, positions divided by `factor` (HF "linear" scaling)."""

    theta: float
    factor: float = 1.0

    def to_dict(self) -> dict:
        return {"theta": self.theta, "factor": self.factor}


@dataclass(frozen=True)
class Unit:
    """One matmul of the graph: the HF weights it multiplies by, row-concatenated in this order.

    fused: the bundle name of the concatenated initializer (None for a single weight). input: the activation
    the matmul reads; units with the same input read one tensor (GPTQ's Hessians, smoothing's statistics).
    """

    label: str               # "layers.3.qkv", "embed", "lm_head"
    names: tuple
    fused: Optional[str]
    input: Optional[str]     # "3.attn_in"; None for the embedding (a lookup, not a matmul)
    in_features: int


@dataclass(frozen=True)
class Layer:
    """The tensors and attention pattern of one decoder block, by role (HF names).

        x = attn_norm(h); a = o(attention(q_norm(q(x)), k_norm(k(x)), v(x))); h += attn_out_norm(a)
        x = mlp_norm(h);  m = down(act(gate(x)) * up(x));                     h += mlp_out_norm(m)

    Norms marked None are absent in the family. window: keys a query sees (itself included), None: all.
    """

    index: int
    q: str
    k: str
    v: str
    o: str
    gate: str
    up: str
    down: str
    attn_norm: str                    # feeds q/k/v
    mlp_norm: str                     # feeds gate/up
    attn_out_norm: Optional[str]      # on the attention output, before the residual add (Gemma)
    mlp_out_norm: Optional[str]       # on the MLP output, before the residual add (Gemma)
    q_norm: Optional[str]             # per head over head_dim, before rope (Gemma 3)
    k_norm: Optional[str]
    qkv_bias: Optional[tuple]         # (q bias, k bias, v bias) names (Qwen2)
    window: Optional[int]
    rope: Rope

    @property
    def norms(self) -> tuple:
        return tuple(n for n in (self.attn_norm, self.q_norm, self.k_norm, self.attn_out_norm, self.mlp_norm,
                                 self.mlp_out_norm) if n)


class DecoderSpec:
    """The facts of one decoder family over one config; subclasses set the class attributes below."""

    family: ClassVar[str]                       # model_type
    hf_classes: ClassVar[tuple]                 # (transformers config class, causal-LM class)
    gguf_arch: ClassVar[Optional[str]] = None   # general.architecture of its GGUF files
    gguf_block: ClassVar[dict] = GGUF_LLAMA_BLOCK
    gguf_permuted_qk: ClassVar[bool] = False    # convert_hf_to_gguf.py permuted Q/K rows (llama rope layout)
    activation: ClassVar[str] = "silu"          # the MLP's gate activation: "silu" | "gelu_tanh"
    norm_offset: ClassVar[float] = 0.0          # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    always_qkv_bias: ClassVar[bool] = False

    def __init__(self, config: ModelConfig):
        self.config = config

    # -- hooks -------------------------------------------------------------------------------------------------

    def window(self, i: int) -> Optional[int]:
        """Keys layer i attends to (the query's own included), None for all of them."""
        return None

    def rope(self, i: int) -> Rope:
        return Rope(float(self.config.rope_theta), rope_factor(self.config.rope_scaling))

    def embed_scale(self) -> Optional[float]:
        """A factor applied to the looked-up embedding rows (Gemma: sqrt(hidden)), None for none."""
        return None

    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.config.head_dim)

    def attn_softcap(self) -> Optional[float]:
        """c of the attention scores' c * tanh(scores / c), None for none."""
        return self.config.attn_logit_softcapping

    def layer_norm_names(self, i: int) -> dict:
        """Role -> HF name of the norms of layer i (roles of Layer; absent roles left out)."""
        p = f"model.layers.{i}."
        return {"attn_norm": p + "input_layernorm.weight", "mlp_norm": p + "post_attention_layernorm.weight"}

    def hf_config_extra(self) -> dict:
        """Family keys of transformers' config.json beyond the shared shape (hf_config)."""
        return {"hidden_act": "silu"}

    # -- derived -----------------------------------------------------------------------------------------------

    @property
    def qkv_bias(self) -> bool:
        return self.always_qkv_bias or self.config.attention_bias

    @functools.cached_property
    def layers(self) -> tuple:
        return tuple(self._layer(i) for i in range(self.config.num_hidden_layers))

    def _layer(self, i: int) -> Layer:
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        norms = self.layer_norm_names(i)
        bias = tuple(a + f"{p}_proj.bias" for p in "qkv") if self.qkv_bias else None
        return Layer(index=i, q=a + "q_proj.weight", k=a + "k_proj.weight", v=a + "v_proj.weight",
                     o=a + "o_proj.weight", gate=m + "gate_proj.weight", up=m + "up_proj.weight",
                     down=m + "down_proj.weight", attn_norm=norms["attn_norm"], mlp_norm=norms["mlp_norm"],
                     attn_out_norm=norms.get("attn_out_norm"), mlp_out_norm=norms.get("mlp_out_norm"),
                     q_norm=norms.get("q_norm"), k_norm=norms.get("k_norm"), qkv_bias=bias,
                     window=self.window(i), rope=self.rope(i))

    @property
    def head(self) -> str:
        """The lm_head's weight: the embedding table itself when tied."""
        return EMBED if self.config.tie_word_embeddings else LM_HEAD

    @property
    def windows(self) -> tuple:
        return tuple(layer.window for layer in self.layers)

    def shared_window(self) -> Optional[tuple[int, Rope]]:
        """(window, rope) of every sliding-window layer when they share one window and one rope (their KV
        buffers then shift together, kv_capacity), None when there are none or they differ."""
        kinds = {(ly.window, ly.rope) for ly in self.layers if ly.window is not None}
        return next(iter(kinds)) if len(kinds) == 1 else None

    @property
    def ropes(self) -> tuple:
        """The distinct rope settings, the first layer's first (one rotary table each in the graph)."""
        return tuple(dict.fromkeys(layer.rope for layer in self.layers))

    def tensor_names(self) -> list[str]:
        """HF names of every float tensor, in file order."""
        names = [EMBED]
        for ly in self.layers:
            names.append(ly.attn_norm)
            for w, b in zip((ly.q, ly.k, ly.v), ly.qkv_bias or (None,) * 3):
                names += [w] + ([b] if b else [])
            names += [n for n in (ly.q_norm, ly.k_norm) if n]
            names += [ly.o] + [n for n in (ly.attn_out_norm, ly.mlp_norm) if n]
            names += [ly.gate, ly.up, ly.down] + ([ly.mlp_out_norm] if ly.mlp_out_norm else [])
        names.append(FINAL_NORM)
        if not self.config.tie_word_embeddings:
            names.append(LM_HEAD)
        return names

    def shapes(self) -> dict[str, tuple]:
        """HF shape of every tensor of tensor_names(), [out, in] for linear weights."""
        c = self.config
        h, f, d = c.hidden_size, c.intermediate_size, c.head_dim
        out = {EMBED: (c.vocab_size, h), FINAL_NORM: (h,)}
        if not c.tie_word_embeddings:
            out[LM_HEAD] = (c.vocab_size, h)
        for ly in self.layers:
            out.update({ly.q: (c.q_dim, h), ly.k: (c.kv_dim, h), ly.v: (c.kv_dim, h), ly.o: (h, c.q_dim),
                        ly.gate: (f, h), ly.up: (f, h), ly.down: (h, f)})
            out.update({n: (h,) for n in (ly.attn_norm, ly.mlp_norm, ly.attn_out_norm, ly.mlp_out_norm) if n})
            out.update({n: (d,) for n in (ly.q_norm, ly.k_norm) if n})
            if ly.qkv_bias:
                out.update(zip(ly.qkv_bias, ((c.q_dim,), (c.kv_dim,), (c.kv_dim,))))
        return {n: out[n] for n in self.tensor_names()}

    def norm_names(self) -> list[str]:
        """Every RMSNorm weight (the ones norm_offset applies to)."""
        return [n for ly in self.layers for n in ly.norms] + [FINAL_NORM]

    def units(self) -> list[Unit]:
        """Every matmul, fused as the graph builder fuses them (q/k/v, gate/up), then the embedding / lm_head."""
        c, out = self.config, []
        for ly in self.layers:
            i, a, m = ly.index, f"model.layers.{ly.index}.self_attn.", f"model.layers.{ly.index}.mlp."
            out += [Unit(f"layers.{i}.qkv", (ly.q, ly.k, ly.v), a + "qkv_proj.weight", f"{i}.attn_in", c.hidden_size),
                    Unit(f"layers.{i}.o", (ly.o,), None, f"{i}.o_in", c.q_dim),
                    Unit(f"layers.{i}.gate_up", (ly.gate, ly.up), m + "gate_up_proj.weight", f"{i}.mlp_in",
                         c.hidden_size),
                    Unit(f"layers.{i}.down", (ly.down,), None, f"{i}.down_in", c.intermediate_size)]
        out.append(Unit("embed", (EMBED,), None, "lm_head_in" if c.tie_word_embeddings else None, c.hidden_size))
        if not c.tie_word_embeddings:
            out.append(Unit("lm_head", (LM_HEAD,), None, "lm_head_in", c.hidden_size))
        return out

    def in_features(self) -> dict[str, int]:
        """HF name -> K of every quantizable matrix (the embedding is quantized along hidden)."""
        return {n: u.in_features for u in self.units() for n in u.names}

    def hf_config(self) -> dict:
        """A transformers config.json for the config (fp32), without token ids."""
        c = self.config
        d = {"architectures": [self.hf_classes[1]], "model_type": self.family, "vocab_size": c.vocab_size,
             "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
             "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
             "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
             "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
             "tie_word_embeddings": c.tie_word_embeddings, "torch_dtype": "float32"}
        if c.rope_scaling:
            d["rope_scaling"] = dict(c.rope_scaling)
        d.update(self.hf_config_extra())
        return d

    def manifest(self, fused: Optional[set] = None) -> dict:
        """The manifest's `decoder` entry: what a runtime reads instead of guessing (docs/bundle-format.md).

        fused: the fused initializers the graph holds (a unit of mixed quantization is not fused).
        """
        units = [{"label": u.label, "names": list(u.names),
                  "fused": u.fused if u.fused and (fused is None or u.fused in fused) else None}
                 for u in self.units()]
        return {"family": self.family, "activation": self.activation, "norm_offset_folded": self.norm_offset,
                "embed_scale": self.embed_scale(), "attn_scale": self.attn_scale(),
                "attn_softcap": self.attn_softcap(),
                "final_softcap": self.config.final_logit_softcapping,
                "layers": [{"window": ly.window, "rope": ly.rope.to_dict()} for ly in self.layers],
                "units": units}


def shift_stride(window: int) -> int:
    """Most new positions one pass writes into a shifting window buffer, and the longest reply after which a
    conversation resumes at its last prompt's end (see kv_capacity)."""
    return max(1, int(window) // 2)


def kv_capacity(window: Optional[int], context: int) -> int:
    """Positions a layer's KV cache holds: the whole context, or for a sliding-window layer
    window - 1 + shift_stride(window), on both backends. A pass needs the window - 1 keys before it; the
    stride more let a reply of up to stride tokens be decoded after a prompt and the next turn still resume at
    that prompt's end. ONNX Runtime's buffer shifts (GroupQueryAttention writes positions in order, it cannot
    wrap: backends/ort/window.py), the NumPy backend's is a ring (position p in slot p % capacity)."""
    return context if window is None else min(int(window) - 1 + shift_stride(window), context)


def rope_factor(scaling) -> float:
    """The position divisor of a rope_scaling entry: 1 for none/default, the factor for "linear"."""
    from ..errors import UnsupportedModelError

    if not scaling:
        return 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return 1.0
    if kind == "linear":
        return float(scaling["factor"])
    raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (default and linear are)")
