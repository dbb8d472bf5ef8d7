"""Distillation: a shallower / narrower student cut from the teacher, trained on the teacher's cached top-k.

    out = distill("cache/models/SmolLM2-135M-Instruct.Q4_1.gguf", layers=18, minutes=30, out_dir="build/student")
    load_source(out)  # a Hugging Face folder, exported like any model

May import torch, export.sources, export.quality, export.version, edge_runtime.spec and edge_runtime.quality;
never the pipeline.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from edge_runtime.spec import spec_for

from . import dist as distmod
from . import train as training
from .data import (
    TeacherCache,
    build_cache,
    fingerprint,
    overlapping_rows,
    pack,
    read_texts,
    synthesize,
)
from .domains import EVAL_DOMAINS, public_texts
from .precision import resolve_precision
from .prune import drop_layers, prune_mlp, select_layers
from .train import CHECKPOINT, TrainConfig

DEFAULT_CACHE = Path(__file__).resolve().parents[2] / "cache" / "distill"
# Of a `minutes` budget, the teacher may spend up to this share writing training text (then training starts
# with what it wrote; a later run continues the text).
TEXT_SHARE = 0.4
PLAN = "distill.json"
CALIBRATION_ROWS = 16  # training rows whose hidden states rank the layers (16 x 256 tokens for the demo)
DataItem = Union[str, Path]  # "synthetic" (teacher-written), "public" (domains.public_texts) or a UTF-8 text file


@dataclass
class Teacher:
    source: object  # export.sources.SourceModel
    model: torch.nn.Module  # transformers causal LM, fp32, eval mode
    tokenizer: object  # tokenizers.Tokenizer
    fingerprint: str

    @property
    def eos_id(self) -> int | None:
        eos = self.source.tokenizer_meta.get("eos_token_ids") or []
        return eos[0] if eos else None


def load_teacher(spec) -> Teacher:
    """The teacher from a load_source() spec (GGUF, HF folder, tiny:<arch>) or an already loaded SourceModel."""
    from tokenizers import Tokenizer

    from ..quality.reference import build_torch_model
    from ..sources import load_source

    source = load_source(spec) if isinstance(spec, (str, Path)) else spec
    model = build_torch_model(source)
    model.config._attn_implementation = "sdpa"  # same math as eager, faster on CPU for training
    return Teacher(source, model, Tokenizer.from_str(source.tokenizer_json), fingerprint(model))


def training_rows(teacher: Teacher, data: Sequence[DataItem], seq_len: int, *, seed: int, cache_root: Path,
                  synthetic_samples: int, synthetic_tokens: int,
                  heldout: Sequence[str] | None = None) -> np.ndarray:
    """[n, seq_len] token rows of the training text, minus any row that shares 32 tokens with evaluation text
    (`heldout`, default: every evaluation domain's)."""
    texts: list[str] = []
    for item in data:
        if item == "synthetic":
            texts += written_texts(text_path(teacher, synthetic_samples, synthetic_tokens, seed, cache_root))
        elif item == "public":
            texts += [t for kind in public_texts().values() for t in kind]
        else:
            texts += read_texts([Path(item)])
    rows = pack(texts, teacher.tokenizer, seq_len, teacher.eos_id)
    if heldout is None:
        heldout = [t for d in EVAL_DOMAINS for t in d.load()]
    return rows[~overlapping_rows(rows, pack(heldout, teacher.tokenizer, 1, teacher.eos_id).ravel())]


def text_path(teacher: Teacher, n: int, new_tokens: int, seed: int, cache_root: Path) -> Path:
    return Path(cache_root) / f"teacher-text-{teacher.fingerprint}-{n}x{new_tokens}-s{seed}.json"


def written_texts(path: Path) -> list[str]:
    """The teacher's texts at `path`, or those of the interrupted run beside it (synthetic_texts)."""
    for p in (path, path.with_suffix(".partial.json")):
        if p.exists():
            return json.loads(p.read_text(encoding="utf-8"))
    raise FileNotFoundError(f"no teacher-written text at {path}")


def synthetic_texts(teacher: Teacher, n: int, new_tokens: int, seed: int, cache_root: Path,
                    deadline: float | None = None) -> list[str]:
    """Teacher-written texts, generated once and kept as JSON next to the top-k caches. Past `deadline` (a
    time.perf_counter()) generation stops between batches: the texts so far are kept as `<key>.partial.json`
    and used, and a later call continues them."""
    path = text_path(teacher, n, new_tokens, seed, cache_root)
    if path.exists():
        return written_texts(path)
    partial = path.with_suffix(".partial.json")
    done = written_texts(path) if partial.exists() else []
    meta = teacher.source.tokenizer_meta
    texts = synthesize(teacher.model, teacher.tokenizer, n, new_tokens, seed=seed,
                       pad_id=meta.get("pad_token_id") or 0, eos_ids=meta.get("eos_token_ids") or (),
                       chat=chat_renderer(meta), done=done, deadline=deadline)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path if len(texts) >= n else partial
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(texts), encoding="utf-8")
    tmp.replace(target)
    if target == path:
        partial.unlink(missing_ok=True)
    return texts


def chat_renderer(meta: dict):
    """question -> the prompt text of the teacher's chat template (None when the teacher has no template)."""
    from ..sources import render_chat

    if not meta.get("chat_template"):
        return None
    return lambda question: render_chat(meta, question)


def make_student(teacher: Teacher, calib: Sequence[torch.Tensor], keep: Sequence[int] | None,
                 layers: int | None, mlp_ratio: float | None, iterative: int) -> tuple[torch.nn.Module, list[int]]:
    """The teacher minus its least influential layers (or exactly `keep`), MLPs narrowed to mlp_ratio."""
    n_layers = teacher.model.config.num_hidden_layers
    if keep is None:
        keep = select_layers(teacher.model, calib, layers or n_layers, step=iterative)
    student = drop_layers(teacher.model, keep)
    if mlp_ratio is not None:
        prune_mlp(student, calib, mlp_ratio)
    return student, list(keep)


def near_removed(keep: Sequence[int], n_layers: int) -> list[int]:
    """Student layer indices next to a removed teacher layer: where the residual stream changed most."""
    gone = set(range(n_layers)) - set(keep)
    return [j for j, i in enumerate(keep) if i - 1 in gone or i + 1 in gone]


def trained_layers(spec: str | Sequence[int], keep: Sequence[int], n_layers: int) -> list[int] | None:
    """Student layers to train for the `train_layers` argument (None: all of them)."""
    if spec == "all":
        return None
    if spec == "near":
        return near_removed(keep, n_layers)
    return [int(i) for i in spec]


def distill(teacher_source, *, layers: int | None = None, mlp_ratio: float | None = None,
            data: DataItem | Sequence[DataItem] = ("synthetic",), minutes: float | None = None,
            steps: int | None = None, out_dir, seed: int = 0, resume: bool = True, temperature: float = 1.0,
            alpha: float = 1.0, loss: str = "fkl", lr: float = 5e-4, batch_size: int = 4, seq_len: int = 256,
            top_k: int = 64, iterative: int = 0, train_layers: str | Sequence[int] = "all",
            train_embeddings: bool = False, synthetic_samples: int = 64, synthetic_tokens: int = 256,
            threads: int | None = None, cache_dir: Path | None = None, checkpoint_every: int = 25,
            warmup_steps: int = 10, progress: bool = True, device: str = "cpu", micro_batch: int | None = None,
            stop_after: int | None = None, precision: str = "fp32", teacher_precision: str = "fp32",
            heldout: Sequence[str] | None = None) -> Path:
    """Distill `teacher_source` into a student saved as a Hugging Face folder at out_dir; returns out_dir.

    layers: decoder layers to keep (the least influential are dropped; iterative > 0 drops that many at a time
    and re-measures). mlp_ratio: keep this fraction of MLP channels (most important by activation x weight).
    data: "synthetic" (text the teacher writes from text starts of several domains and from chat prompts),
    "public" (READMEs, licenses, source and docstrings of the environment's third-party packages) and/or text
    file paths; rows that overlap the evaluation domains (or the texts `heldout`) are dropped. Budget: `minutes`
    of wall time for the whole call (data preparation included) and/or `steps`.
    loss: fkl | rkl | jsd at `temperature`, mixed with next-token CE as alpha * T^2 * KD + (1 - alpha) * CE
    (alpha 1: pure distillation toward the teacher, the default).
    train_layers: "all", "near" (only the student layers next to a removed one) or student layer indices.
    resume: continue from out_dir/checkpoint.pt if present (same layer choice, step, optimizer and RNG), whatever
    world size wrote it. stop_after: pause after this global step (the schedule still spans `steps`).
    batch_size is global: under torchrun each of the world's ranks trains on batch_size / world rows per step,
    in micro-batches of micro_batch rows; rank 0 prepares the data and the teacher cache, the others read them.
    device: "cpu" or "cuda" (each rank its own GPU). precision: fp32, bf16 (autocast; the weights, the optimizer
    and the teacher's cache stay fp32) or auto (bf16 where the device has native bf16 arithmetic).
    teacher_precision: the same choices for the teacher's forward over the training text (its top-k targets).
    """
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    d = distmod.setup(device)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    items = [data] if isinstance(data, (str, Path)) else list(data)

    teacher = load_teacher(teacher_source)
    teacher.model.to(d.device)
    if d.main and "synthetic" in items:  # the teacher writes its texts once; the other ranks read them
        deadline = None if minutes is None else start + TEXT_SHARE * minutes * 60.0
        synthetic_texts(teacher, synthetic_samples, synthetic_tokens, seed, cache_root, deadline)
    distmod.barrier(d)
    rows = training_rows(teacher, items, seq_len, seed=seed, cache_root=cache_root,
                         synthetic_samples=synthetic_samples, synthetic_tokens=synthetic_tokens, heldout=heldout)
    if len(rows) == 0:
        raise ValueError(f"no training text: {items} gave fewer than {seq_len} tokens")
    teacher_precision = resolve_precision(teacher_precision, d.device)
    cache = build_cache(teacher.model, rows, cache_root, k=top_k, teacher_fp=teacher.fingerprint, dist=d,
                        precision=teacher_precision)
    teacher.model.to("cpu")

    plan_file = out_dir / PLAN
    resuming = resume and (out_dir / CHECKPOINT).exists() and plan_file.exists()
    keep = json.loads(plan_file.read_text())["keep"] if resuming else None
    distmod.barrier(d)  # every rank has read the plan before rank 0 rewrites it below
    calib = [torch.from_numpy(cache.tokens[i:i + batch_size].astype(np.int64))
             for i in range(0, min(CALIBRATION_ROWS, len(cache)), batch_size)]
    student, keep = make_student(teacher, calib, keep, layers, mlp_ratio, iterative)
    chosen = trained_layers(train_layers, keep, teacher.model.config.num_hidden_layers)

    prep = time.perf_counter() - start
    cfg = TrainConfig(steps=steps, minutes=None if minutes is None else max(minutes - prep / 60.0, 0.0),
                      stop_after=stop_after, batch_size=batch_size, micro_batch=micro_batch, lr=lr,
                      warmup_steps=warmup_steps, temperature=temperature,
                      alpha=alpha, loss=loss, train_embeddings=train_embeddings, train_layers=chosen,
                      checkpoint_every=checkpoint_every, seed=seed,
                      precision=resolve_precision(precision, d.device))
    plan = {"teacher": teacher.source.origin, "teacher_fingerprint": teacher.fingerprint, "keep": keep,
            "layers": len(keep), "mlp_width": student.config.intermediate_size, "data": [str(d) for d in items],
            "train_rows": len(cache), "seq_len": seq_len, "cache": str(cache.path),
            "teacher_precision": teacher_precision,
            "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"}, "world_size": d.world}
    if d.main:
        write_plan(plan_file, plan)
    state = training.train(student, cache, cfg, out_dir, resume=resume, progress=progress, dist=d)
    plan.update(steps_done=state["step"], train_seconds=state["elapsed"], prep_seconds=prep,
                final_loss=state["history"][-1][1:] if state["history"] else None,
                wall_seconds=time.perf_counter() - start)
    if d.main:
        write_plan(plan_file, plan)
        save_student(student.to("cpu"), teacher, out_dir, plan)
    distmod.barrier(d)
    return out_dir


def write_plan(path: Path, plan: dict) -> None:
    """distill.json replaced in one rename: a reader (another rank, a resume) never sees it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1, default=str))
    os.replace(tmp, path)


def student_source(student: torch.nn.Module, teacher: Teacher, plan: dict):
    """The trained student as a SourceModel: the teacher's config with fewer layers / a narrower MLP."""
    from ..sources import SourceModel

    kinds = getattr(student.config, "layer_types", None)  # the kept layers' own kinds (prune.drop_layers)
    cfg = dataclasses.replace(teacher.source.config, num_hidden_layers=student.config.num_hidden_layers,
                              intermediate_size=student.config.intermediate_size,
                              layer_types=tuple(kinds) if teacher.source.config.layer_types else None)
    state = student.state_dict()
    tensors = {n: state[n].detach().float().numpy().copy() for n in spec_for(cfg).tensor_names()}
    origin = {"format": "distilled", "teacher": teacher.source.origin, "keep": plan["keep"]}
    return SourceModel(cfg, tensors, teacher.source.tokenizer_json, dict(teacher.source.tokenizer_meta), origin)


def save_student(student: torch.nn.Module, teacher: Teacher, out_dir: Path, plan: dict) -> None:
    """config.json, model.safetensors, tokenizer.json, tokenizer_config.json (readable by load_source)."""
    from ..sources.hf import save_hf_folder

    save_hf_folder(student_source(student, teacher, plan), out_dir)


__all__ = ["TeacherCache", "TrainConfig", "distill", "load_teacher", "make_student", "student_source"]
