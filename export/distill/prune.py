"""Making the student: drop the decoder layers with the least block influence and narrow the MLPs.

Block influence (ShortGPT, Men et al. 2024): BI_i = 1 - mean_t cos(x_t, y_t), where x is the hidden state that
enters layer i and y the one that leaves it. A layer that barely turns the residual stream is the cheapest to
drop; dropping every other layer instead destroys the model (SmolLM2-135M: PPL 17 -> ~700,000).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

# MatMulNBits needs K to be a multiple of the block size (<= 128): down_proj's K is the MLP width.
MLP_MULTIPLE = 128


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _set_layers(model: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Point the model at `layers` (HF decoders run `layers[: config.num_hidden_layers]`).

    Nothing here is Llama-only: a family whose layers differ (sliding vs full attention, as in Mistral, Qwen2 or
    Gemma 3) keeps each layer's own kind, and config.layer_types follows the kept layers.
    """
    model.model.layers = nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i  # the KV cache slot; only used with use_cache=True
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [getattr(layer, "attention_type", "full_attention") for layer in layers]


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """BI of every decoder layer of `model` over the token batches ([B, T] int64) -> [n_layers] float64."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]  # [B, T, D]
            y = output[0] if isinstance(output, tuple) else output  # [B, T, D]
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, T]
            sums[i] += (1.0 - cos).double().sum()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return sums / max(count, 1)


def select_layers(model: nn.Module, batches: Sequence[torch.Tensor], n_keep: int, *, step: int = 0) -> list[int]:
    """Indices (into the original layers, ascending) of the `n_keep` layers to keep.

    step == 0: one pass, drop the n_layers - n_keep lowest-BI layers. step > 0: iterative, drop `step` layers,
    re-measure BI on the thinner model, repeat; slower but each choice sees the stream the student will have.
    """
    layers = list(decoder_layers(model))
    n = len(layers)
    if not 1 <= n_keep <= n:
        raise ValueError(f"n_keep must be in [1, {n}], got {n_keep}")
    keep = list(range(n))
    n_config = model.config.num_hidden_layers
    try:
        while len(keep) > n_keep:
            _set_layers(model, [layers[i] for i in keep])
            bi = block_influence(model, batches)
            n_drop = len(keep) - n_keep if step <= 0 else min(step, len(keep) - n_keep)
            drop = set(torch.argsort(bi)[:n_drop].tolist())
            keep = [k for j, k in enumerate(keep) if j not in drop]
    finally:
        _set_layers(model, layers)
        model.config.num_hidden_layers = n_config
    return keep


def drop_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A deep copy of `model` with only the decoder layers `keep` (ascending original indices)."""
    student = copy.deepcopy(model)
    layers = decoder_layers(student)
    _set_layers(student, [layers[i] for i in keep])
    return student


@torch.no_grad()
def mlp_channel_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer [intermediate] importance: mean |act(gate) * up| of a channel times the norm of its down column.

    That product is the average size of the channel's contribution to the residual stream (Wanda-style:
    activation x weight), so the smallest ones matter least.
    """
    layers = decoder_layers(model)
    acts = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]

    def hook(i):
        def fn(module, args):
            h = args[0]  # [B, T, intermediate]: input of down_proj = act(gate) * up
            acts[i] += h.abs().double().sum(dim=(0, 1))
        return fn

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [a * layer.mlp.down_proj.weight.double().norm(dim=0) for a, layer in zip(acts, layers)]


def mlp_width(intermediate: int, ratio: float) -> int:
    """The pruned MLP width: ratio of the original, rounded to a multiple of MLP_MULTIPLE (at least one)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"mlp_ratio must be in (0, 1], got {ratio}")
    width = round(intermediate * ratio / MLP_MULTIPLE) * MLP_MULTIPLE
    return min(intermediate, max(width, min(MLP_MULTIPLE, intermediate)))


@torch.no_grad()
def prune_mlp(model: nn.Module, batches: Sequence[torch.Tensor], ratio: float) -> nn.Module:
    """Narrow every MLP in place to mlp_width(intermediate, ratio) channels, keeping the most important ones."""
    width = mlp_width(model.config.intermediate_size, ratio)
    if width == model.config.intermediate_size:
        return model
    scores = mlp_channel_importance(model, batches)
    for layer, score in zip(decoder_layers(model), scores):
        keep = torch.sort(torch.argsort(score, descending=True)[:width]).values
        mlp = layer.mlp
        mlp.gate_proj = _take_rows(mlp.gate_proj, keep)
        mlp.up_proj = _take_rows(mlp.up_proj, keep)
        mlp.down_proj = _take_cols(mlp.down_proj, keep)
        mlp.intermediate_size = width
    model.config.intermediate_size = width
    return model


def _take_rows(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    out = nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None, dtype=linear.weight.dtype)
    out.weight.copy_(linear.weight[idx])
    if linear.bias is not None:
        out.bias.copy_(linear.bias[idx])
    return out


def _take_cols(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    out = nn.Linear(len(idx), linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype)
    out.weight.copy_(linear.weight[:, idx])
    if linear.bias is not None:
        out.bias.copy_(linear.bias)
    return out
