"""torch.distributed for distillation: the process group torchrun describes, or one process when it describes none.

Every rank runs the same code; `Dist` says which rank this is, how many there are and on which device to compute.
gloo on CPU, nccl on CUDA. One process (no WORLD_SIZE in the environment) needs no process group at all.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as td

from edge_runtime.errors import EdgeError

# Rank 0 alone builds the teacher's data while the others wait at a barrier: that can take a long while.
GROUP_TIMEOUT = datetime.timedelta(hours=6)


class DeviceError(EdgeError):
    """The requested device does not exist on this machine."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 and td.is_available() and td.is_initialized()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """torch.device for "cpu", "cuda" (this rank's GPU) or "cuda:N"; a one-line DeviceError where none exists."""
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise DeviceError(f"--device must be cpu or cuda[:N], got {name!r}")
    if not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA GPU is visible to torch on this machine (use --device cpu)")
    return torch.device(name if ":" in name else f"cuda:{local_rank % torch.cuda.device_count()}")


def setup(device: str = "cpu") -> Dist:
    """This process's place in the run: joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not td.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        td.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=GROUP_TIMEOUT)
    if td.is_available() and td.is_initialized():
        rank, world = td.get_rank(), td.get_world_size()
    return Dist(rank, world, dev)


def current(device: torch.device | str = "cpu") -> Dist:
    """The Dist of an already initialized process group (or of one process)."""
    dev = torch.device(device)
    if td.is_available() and td.is_initialized():
        return Dist(td.get_rank(), td.get_world_size(), dev)
    return Dist(0, 1, dev)


def barrier(d: Dist) -> None:
    if d.active:
        td.barrier()


def mean(d: Dist, values: list[float]) -> list[float]:
    """The mean of `values` over all ranks (identical on every rank)."""
    if not d.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(d))
    td.all_reduce(t)
    return (t / d.world).tolist()


def maximum(d: Dist, value: float) -> float:
    """The largest `value` over all ranks, so that every rank takes the same time-budget decision."""
    if not d.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device(d))
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return float(t.item())


def _comm_device(d: Dist) -> torch.device:
    return d.device if td.get_backend() == "nccl" else torch.device("cpu")


def teardown(d: Dist) -> None:
    """Leave the process group this module joined (a no-op for one process)."""
    if d.active:
        td.destroy_process_group()
