"""The arithmetic of the teacher's and the student's forward passes: fp32, or bf16 under autocast where the
device multiplies bf16 natively ("auto"). Weights, optimizer state and caches stay fp32 either way.

May import torch only.
"""
from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16")


def checked(precision: str) -> str:
    """`precision` itself, if it is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """"auto" -> "bf16" where the device multiplies bf16 natively (AVX512-BF16 or AMX CPUs, bf16 GPUs), else
    "fp32"; elsewhere bf16 is emulated and slower than fp32. Other values are checked and returned."""
    if precision != "auto":
        return checked(precision)
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = [getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16" if any(native) else "fp32"


def autocast(precision: str, device: torch.device):
    """The forward's autocast context: bf16 matmuls with fp32 accumulation, or none."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=checked(precision) == "bf16")
