"""End-to-end distillation demo: SmolLM2-135M -> a shallower student, then the held-out report.

    python -m export.distill.demo --minutes 30 --layers 18 --out build/student
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_TEACHER = "cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"

# The recipe found by short runs on this 2-core machine (see the distillation notes in the final report).
RECIPE = {"data": ("pydoc",), "temperature": 1.0, "alpha": 0.5, "loss": "fkl", "lr": 5e-4, "batch_size": 4,
          "seq_len": 256, "top_k": 64, "iterative": 0, "train_layers": "all", "train_embeddings": False}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="GGUF file, HF folder or tiny:<arch>")
    p.add_argument("--layers", type=int, default=18, help="decoder layers the student keeps")
    p.add_argument("--mlp-ratio", type=float, default=None, help="fraction of MLP channels to keep")
    p.add_argument("--minutes", type=float, default=30.0, help="wall-time budget of the distillation")
    p.add_argument("--steps", type=int, default=None, help="optimizer-step budget")
    p.add_argument("--out", type=Path, default=Path("build/student"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--eval-windows", type=int, default=None, help="limit the held-out windows of the report")
    p.add_argument("--recipe", type=json.loads, default={}, help='JSON overrides, e.g. \'{"lr": 1e-3}\'')
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import torch

    from ..sources import load_source
    from . import distill, load_teacher
    from .report import compare, format_report, heldout_windows

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = distill(args.teacher, layers=args.layers, mlp_ratio=args.mlp_ratio, minutes=args.minutes,
                  steps=args.steps, out_dir=args.out, seed=args.seed, resume=not args.fresh,
                  threads=args.threads, **{**RECIPE, **args.recipe})
    distill_seconds = time.perf_counter() - t0
    teacher = load_teacher(args.teacher)
    student = load_teacher(load_source(str(out)))
    windows = heldout_windows(teacher.tokenizer, teacher.eos_id, max_windows=args.eval_windows)
    result = compare(teacher.model, student.model, windows)
    result.update(distill_seconds=distill_seconds, recipe={**RECIPE, **args.recipe}, out=str(out))
    (Path(out) / "report.json").write_text(json.dumps(result, indent=1, default=str))
    print(format_report(result))
    print(f"distillation wall time {distill_seconds / 60:.1f} min; student at {out}")
    return result


if __name__ == "__main__":
    main()
