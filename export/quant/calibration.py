"""The float model run over calibration windows with a hook on the input of chosen matmuls: the one loop behind
GPTQ's Hessians and the activation scales of smoothing and sensitivity."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence


def each_matmul_input(torch_model, windows: Sequence[Sequence[int]], keys: Mapping[str, str],
                      visit: Callable[[str, object], None]) -> None:
    """Run `torch_model` on every window and call visit(key, x) with each hooked module's input x, float64
    [tokens, K]. keys: module name -> key; modules sharing a key and reading the same tensor in a window (q/k/v,
    gate/up) are visited once."""
    import torch

    seen: set = set()
    hooks = []
    for mod_name, mod in torch_model.named_modules():
        key = keys.get(mod_name)
        if key is None:
            continue

        def hook(_m, args, key=key):
            if (key, id(args[0])) in seen:
                return
            seen.add((key, id(args[0])))
            visit(key, args[0].detach().reshape(-1, args[0].shape[-1]).double())  # [tokens, K]
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for ids in windows:
                seen.clear()
                torch_model(input_ids=torch.as_tensor([list(ids)]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
