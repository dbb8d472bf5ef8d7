"""The float reference: the source model's fp32 weights in transformers' own code for its family."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_runtime.errors import UnsupportedModelError
from edge_runtime.format.config import ModelConfig
from edge_runtime.spec import spec_for, supported

from ..sources.source import SourceModel


def hf_config_dict(cfg: ModelConfig, meta: dict | None = None) -> dict:
    """A transformers config.json for `cfg` (fp32, from its DecoderSpec); token ids come from tokenizer meta."""
    if not supported(cfg.model_type):
        raise UnsupportedModelError(f"architecture '{cfg.model_type}' has no float reference")
    if cfg.model_type == "llama" and cfg.attention_bias:
        # transformers' Llama puts the bias on o_proj too, which our tensor list does not carry.
        raise UnsupportedModelError("llama with attention_bias is not supported")
    d = spec_for(cfg).hf_config()
    if meta:
        eos = list(meta.get("eos_token_ids") or [])
        d.update(bos_token_id=meta.get("bos_token_id"), pad_token_id=meta.get("pad_token_id"),
                 eos_token_id=eos[0] if len(eos) == 1 else eos or None)
    return d


def build_torch_model(source: SourceModel):
    """transformers causal LM holding the source's fp32 weights (eager attention, eval mode)."""
    import torch
    import transformers

    spec = spec_for(source.config)
    conf = hf_config_dict(source.config, source.tokenizer_meta)
    conf_cls, model_cls = (getattr(transformers, n) for n in spec.hf_classes)
    hf_conf = conf_cls(**{k: v for k, v in conf.items() if k not in ("architectures", "model_type")})
    hf_conf._attn_implementation = "eager"
    # Build on the meta device and adopt the numpy buffers (assign=True): no random init, no 4-byte copy.
    with torch.device("meta"):
        model = model_cls(hf_conf)
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in source.tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    allowed = {"lm_head.weight"} if source.config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise UnsupportedModelError(f"float reference: missing {missing}, unexpected {unexpected}")
    if source.config.tie_word_embeddings:
        model.tie_weights()
    rebuild_buffers(model, hf_conf)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UnsupportedModelError(f"float reference: {left[0]} was not loaded")
    return model.eval()


def rebuild_buffers(model, hf_conf) -> None:
    """Non-persistent buffers no state dict carries, rebuilt on the CPU: every rotary module's inv_freq (Gemma 3
    has a local one too) and Gemma's embedding scale (sqrt(hidden), a float32 scalar as transformers makes it)."""
    import copy

    import torch

    inner = model.model
    for name in ("rotary_emb", "rotary_emb_local"):
        module = getattr(inner, name, None)
        if module is None:
            continue
        conf = hf_conf
        if name == "rotary_emb_local":  # as Gemma3TextModel builds it
            conf = copy.deepcopy(hf_conf)
            conf.rope_theta, conf.rope_scaling = conf.rope_local_base_freq, {"rope_type": "default"}
        setattr(inner, name, type(module)(config=conf))
    embed = inner.embed_tokens
    if getattr(embed, "embed_scale", None) is not None and embed.embed_scale.is_meta:
        embed.embed_scale = torch.tensor(hf_conf.hidden_size ** 0.5)


class FloatReference:
    """fp32 transformers forward pass of a SourceModel: logits and greedy decoding to compare bundles against."""

    def __init__(self, source: SourceModel, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        self.source = source
        self.torch_model = build_torch_model(source)

    def logits(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 [S, vocab] logits of every position of one sequence."""
        import torch

        x = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1)  # [1, S]
        with torch.no_grad():
            out = self.torch_model(input_ids=x, use_cache=False)
        return out.logits[0].float().numpy()

    def greedy(self, ids: Sequence[int] | np.ndarray, max_new_tokens: int, eos_ids: Sequence[int] = ()) -> list[int]:
        """Up to max_new_tokens argmax tokens after `ids` (stops after emitting one of eos_ids, which is kept)."""
        import torch

        x = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1)  # [1, S]
        stop, out, past = {int(e) for e in eos_ids}, [], None
        with torch.no_grad():
            for _ in range(max_new_tokens):
                res = self.torch_model(input_ids=x, past_key_values=past, use_cache=True)
                past = res.past_key_values
                token = int(torch.argmax(res.logits[0, -1]))
                out.append(token)
                if token in stop:
                    break
                x = torch.tensor([[token]])
        return out

    def greedy_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     eos_ids: Sequence[int] = ()) -> list[list[int]]:
        """greedy() of several prompts in one batch (left-padded, masked): one forward per step for all of them.

        Each reply stops after its first eos id (kept). Padding changes float rounding, so a near-tie may break
        differently than greedy() alone: for text to score, not for reference.json."""
        import torch

        width = max(len(p) for p in prompts)
        x = torch.zeros((len(prompts), width), dtype=torch.int64)          # [B, S]
        mask = torch.zeros_like(x)
        for i, p in enumerate(prompts):
            x[i, width - len(p):] = torch.as_tensor(list(p))
            mask[i, width - len(p):] = 1
        eos = [int(e) for e in eos_ids] or None
        with torch.no_grad():
            out = self.torch_model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens,
                                            do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else 0)
        replies = []
        for row in out[:, width:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if eos and t in eos), len(row))
            replies.append(row[:cut])
        return replies
