"""The knowledge-distillation loop: student vs the teacher's cached top-k, with checkpoints that resume exactly.

The batch order, the learning rate and the loss depend only on (seed, step), so a run stopped at a checkpoint
and resumed gives the same weights as one that never stopped, at any world size: under torch.distributed each rank
takes its slice of the global batch (in micro-batches if asked), DDP averages the gradients, and the update equals
the one-process update on the whole batch up to float rounding.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import dist as distmod
from .data import TeacherCache
from .dist import Dist
from .precision import autocast, checked

LOSSES = ("fkl", "rkl", "jsd")
CHECKPOINT = "checkpoint.pt"
TAIL_FLOOR = 1e-6  # the top k of an fp16 cache can sum to a hair over 1


@dataclass
class TrainConfig:
    steps: int | None = None  # stop after this many optimizer steps ...
    minutes: float | None = None  # ... or after this much training time, whichever comes first
    stop_after: int | None = None  # pause after this step; the learning-rate schedule still spans `steps`
    batch_size: int = 8  # global: rows per optimizer step summed over all ranks
    micro_batch: int | None = None  # rows per forward pass on one rank (None: the rank's whole share)
    lr: float = 2e-4
    min_lr_fraction: float = 0.1  # cosine decay ends at lr * this
    warmup_steps: int = 10
    weight_decay: float = 0.0
    temperature: float = 2.0
    alpha: float = 0.9  # loss = alpha * T^2 * KD + (1 - alpha) * CE on the text
    loss: str = "fkl"
    train_embeddings: bool = False  # tied and 28M of SmolLM2's 135M: frozen saves their gradient
    train_layers: Sequence[int] | None = None  # student decoder layers to train (None: all)
    checkpoint_every: int = 50
    seed: int = 0
    grad_clip: float = 1.0
    precision: str = "fp32"  # bf16: forward and backward under bf16 autocast; weights and optimizer stay fp32
    extra: dict = field(default_factory=dict)  # free-form notes kept with the checkpoint


def kd_loss(logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, temperature: float,
            kind: str = "fkl") -> torch.Tensor:
    """kd_from_logp of the student's logits [B, T, V]."""
    return kd_from_logp(torch.log_softmax(logits, dim=-1), top_ids, top_logp, temperature, kind)


def kd_from_logp(s_full: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, temperature: float,
                 kind: str = "fkl") -> torch.Tensor:
    """Mean per-position divergence between teacher and student over the teacher's top k plus one tail bucket.

    s_full [B, T, V] student log-probs; top_ids [B, T, k] int64; top_logp [B, T, k] teacher log-probs
    (full softmax at temperature 1).
    Both distributions are folded onto k + 1 outcomes (each top-k token, "anything else"), which is exact at
    temperature 1 and never asks the student to move the teacher's tail mass into the top k (renormalizing the
    top k would, and on uncertain positions that makes the student over-confident). The temperature is then
    applied to the k + 1 log-probs of both sides alike.
    fkl = KL(teacher || student), rkl = KL(student || teacher), jsd = Jensen-Shannon.
    """
    t_logp = _with_tail(top_logp.float()) / temperature  # [B, T, k+1]
    s_logp = _with_tail(s_full.gather(-1, top_ids)) / temperature
    t_logp, s_logp = torch.log_softmax(t_logp, dim=-1), torch.log_softmax(s_logp, dim=-1)
    if kind == "fkl":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    if kind == "rkl":
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1).mean()
    if kind == "jsd":
        m_logp = torch.logaddexp(t_logp, s_logp) - math.log(2.0)
        kl_t = (t_logp.exp() * (t_logp - m_logp)).sum(-1)
        kl_s = (s_logp.exp() * (s_logp - m_logp)).sum(-1)
        return (0.5 * (kl_t + kl_s)).mean()
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def _with_tail(top_logp: torch.Tensor) -> torch.Tensor:
    """[..., k] log-probs -> [..., k+1]: the last entry is log(1 - sum of the k probabilities)."""
    rest = -torch.expm1(torch.logsumexp(top_logp, dim=-1, keepdim=True))  # [..., 1]
    return torch.cat([top_logp, torch.log(rest.clamp_min(TAIL_FLOOR))], dim=-1)


def ce_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of logits [B, T, V] on ids [B, T] (the last position has no target)."""
    return ce_from_logp(torch.log_softmax(logits, dim=-1), ids)


def ce_from_logp(s_full: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return -s_full[:, :-1].gather(-1, ids[:, 1:, None]).mean()


def batch_rows(n_rows: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Row indices of batch `step`: epochs are fresh permutations seeded by (seed, epoch), read in order."""
    out = []
    pos = step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n_rows)
        perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
        take = perm[offset:offset + batch - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return np.asarray(out)


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_fraction as progress goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return cfg.lr * (cfg.min_lr_fraction + (1.0 - cfg.min_lr_fraction) * cos)


def set_trainable(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Freeze everything but the chosen decoder layers (+ final norm, + embeddings if asked); return the rest."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.model.layers
    chosen = range(len(layers)) if cfg.train_layers is None else cfg.train_layers
    for i in chosen:
        for p in layers[i].parameters():
            p.requires_grad_(True)
    model.model.norm.weight.requires_grad_(True)
    if cfg.train_embeddings:
        model.model.embed_tokens.weight.requires_grad_(True)  # also lm_head when tied (same Parameter)
        model.lm_head.weight.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)


def rank_slices(cfg: TrainConfig, d: Dist) -> list[slice]:
    """This rank's micro-batches, as slices of the global batch [cfg.batch_size] rows."""
    if cfg.batch_size % d.world:
        raise ValueError(f"the global batch ({cfg.batch_size}) must be a multiple of the world size ({d.world})")
    share = cfg.batch_size // d.world
    micro = min(cfg.micro_batch or share, share)
    if share % micro:
        raise ValueError(f"the per-rank batch ({share}) must be a multiple of micro_batch ({micro})")
    first = d.rank * share
    return [slice(first + i, first + i + micro) for i in range(0, share, micro)]


def train(student: torch.nn.Module, cache: TeacherCache, cfg: TrainConfig, ckpt_dir: Path, *,
          resume: bool = True, progress: bool = True, dist: Dist | None = None) -> dict:
    """Distill into `student` (in place) from the cached teacher; returns {"step", "elapsed", "history"}.

    Checkpoints go to ckpt_dir/checkpoint.pt every cfg.checkpoint_every steps and at the end (written by rank 0);
    with resume=True an existing checkpoint is loaded first (weights, optimizer, step, elapsed time, RNG), whatever
    world size wrote it. `dist` (default: the current process group, or one process) places this rank.
    """
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
    checked(cfg.precision)
    if cfg.steps is None and cfg.minutes is None:
        raise ValueError("give a budget: steps or minutes")
    d = dist or distmod.current()
    slices = rank_slices(cfg, d)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    student.to(d.device)
    optimizer = make_optimizer(set_trainable(student, cfg), cfg)
    state = {"step": 0, "elapsed": 0.0, "history": []}
    if resume and (ckpt_dir / CHECKPOINT).exists():
        state = load_checkpoint(ckpt_dir / CHECKPOINT, student, optimizer, d.device)
    model = wrap(student, d)
    student.train()
    budget = math.inf if cfg.minutes is None else cfg.minutes * 60.0
    max_steps = cfg.steps if cfg.steps is not None else 10**9
    last = min(max_steps, cfg.stop_after or max_steps)
    bar = tqdm(total=cfg.steps, initial=state["step"], desc="distill", unit="step", disable=not (progress and d.main))
    dt = 0.0
    while state["step"] < last and state["elapsed"] + dt < budget:  # + dt: the next step must fit too
        t0 = time.perf_counter()
        prog = max(state["step"] / max_steps, state["elapsed"] / budget)
        lr = lr_at(cfg, state["step"], prog)
        losses = distmod.mean(d, train_step(model, optimizer, cache, cfg, state["step"], lr, slices, d.device))
        dt = distmod.maximum(d, time.perf_counter() - t0)  # every rank sees the same clock: they stop together
        state["step"] += 1
        state["elapsed"] += dt
        state["history"].append([state["step"], *losses])
        bar.update(1)
        bar.set_postfix(loss=f"{losses[0]:.3f}", kd=f"{losses[1]:.3f}", ce=f"{losses[2]:.3f}",
                        tok_s=f"{cfg.batch_size * cache.tokens.shape[1] / dt:.0f}")
        if state["step"] % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt_dir / CHECKPOINT, student, optimizer, state, cfg, d)
    bar.close()
    save_checkpoint(ckpt_dir / CHECKPOINT, student, optimizer, state, cfg, d)
    student.eval()
    return state


def wrap(student: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP around the student when there are several ranks (it averages gradients in backward)."""
    if not d.active:
        return student
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=ids)


def train_step(model, optimizer, cache: TeacherCache, cfg: TrainConfig, step: int, lr: float,
               slices: list[slice] | None = None, device: torch.device | None = None):
    """One optimizer step on global batch `step` (this rank's `slices` of it); returns this rank's
    (loss, kd, ce) as floats, each the mean over its rows."""
    rows = batch_rows(len(cache), cfg.batch_size, step, cfg.seed)  # [batch_size], the same on every rank
    slices = slices or [slice(0, cfg.batch_size)]
    share = sum(s.stop - s.start for s in slices)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    totals = [0.0, 0.0, 0.0]
    for i, sl in enumerate(slices):
        weight = (sl.stop - sl.start) / share  # micro-batch means add up to the rank's mean
        sync = i == len(slices) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():  # DDP all-reduces on the last micro-batch
            parts = micro_step(model, cache, cfg, np.sort(rows[sl]), weight, device)  # sorted: faster memmap reads
        totals = [t + weight * p for t, p in zip(totals, parts)]
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
    optimizer.step()
    return totals


def micro_step(model, cache: TeacherCache, cfg: TrainConfig, rows: np.ndarray, weight: float,
               device: torch.device | None) -> list[float]:
    """Forward and backward of `rows` with the loss scaled by `weight`; returns the unscaled (loss, kd, ce)."""
    dev = device or torch.device("cpu")
    ids = torch.from_numpy(cache.tokens[rows].astype(np.int64)).to(dev)  # [B, T]
    top_ids = torch.from_numpy(cache.top_ids[rows].astype(np.int64)).to(dev)  # [B, T, k]
    top_logp = torch.from_numpy(cache.top_logp[rows].astype(np.float32)).to(dev)  # [B, T, k]
    with autocast(cfg.precision, dev):
        logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    s_full = torch.log_softmax(logits, dim=-1)  # shared by both losses: one pass over the vocabulary
    zero = logits.new_zeros(())
    kd = kd_from_logp(s_full, top_ids, top_logp.to(logits.dtype), cfg.temperature, cfg.loss) if cfg.alpha > 0 \
        else zero
    ce = ce_from_logp(s_full, ids) if cfg.alpha < 1 else zero
    loss = cfg.alpha * cfg.temperature ** 2 * kd + (1.0 - cfg.alpha) * ce
    (loss * weight).backward()
    return [loss.item(), kd.item(), ce.item()]


def save_checkpoint(path: Path, model, optimizer, state: dict, cfg: TrainConfig, dist: Dist | None = None) -> None:
    """torch.save of plain state dicts (loadable with weights_only=True), written atomically by rank 0.

    Nothing in it depends on the world size: the data cursor is the global step, the optimizer state is the
    one every rank holds (DDP keeps them identical).
    """
    d = dist or distmod.current()
    if d.main:
        _write_checkpoint(path, model, optimizer, state, cfg)
    distmod.barrier(d)  # nobody reads or moves on before the file is whole


def _write_checkpoint(path: Path, model, optimizer, state: dict, cfg: TrainConfig) -> None:
    blob = {
        "model": {k: v.cpu() for k, v in model.state_dict().items()},
        "optimizer": _to_cpu(optimizer.state_dict()),
        "step": state["step"],
        "elapsed": state["elapsed"],
        "history": state["history"],
        "torch_rng": torch.get_rng_state(),
        "config": {k: v for k, v in asdict(cfg).items() if k != "train_layers"},
        "train_layers": None if cfg.train_layers is None else list(cfg.train_layers),
    }
    tmp = Path(str(path) + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer, device: torch.device | None = None) -> dict:
    """Weights and optimizer state from `path` into model / optimizer; returns {"step", "elapsed", "history"}."""
    blob = torch.load(path, weights_only=True, map_location=device or "cpu")
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"].cpu())
    return {"step": blob["step"], "elapsed": blob["elapsed"], "history": blob["history"]}


def _to_cpu(obj):
    """A state dict with every tensor moved to the CPU (a checkpoint loads on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
