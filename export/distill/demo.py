"""End-to-end distillation demo: SmolLM2-135M -> a shallower student, then the held-out report.

    python -m export.distill --minutes 30 --layers 18 --out build/student
    torchrun --nproc_per_node 2 -m export.distill --minutes 30 --layers 18 --out build/student
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_TEACHER = "cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"

# Pure distillation (alpha 1: no task cross-entropy) on text the teacher writes from text starts of several
# domains and from chat prompts, plus public text of the environment's packages (READMEs, licenses, code,
# docstrings); the evaluation domains are other sources (domains.py). The teacher writes slowly, reading public
# text is cheap: the student trains on more distinct text for fewer epochs, which generalizes better than many
# passes over a few texts. Where bf16 is native, the teacher's top-k pass runs in it too: more text per minute.
RECIPE = {"data": ("synthetic", "public"), "synthetic_samples": 192, "synthetic_tokens": 160, "temperature": 1.0,
          "alpha": 1.0, "loss": "fkl", "lr": 5e-4, "batch_size": 4, "seq_len": 256, "top_k": 64, "iterative": 0,
          "train_layers": "all", "train_embeddings": False, "precision": "auto", "teacher_precision": "auto"}


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
    p.add_argument("--eval-windows", type=int, default=None, help="held-out windows per domain (default: all)")
    p.add_argument("--no-report", action="store_true", help="train and save the student only")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (under torchrun: each rank its own GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch: rows per step over all ranks")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per forward pass on one rank")
    p.add_argument("--stop-after", type=int, default=None, help="pause after this step (resume continues)")
    p.add_argument("--cache-dir", type=Path, default=None, help="teacher caches (default: cache/distill)")
    p.add_argument("--recipe", type=json.loads, default={}, help='JSON overrides, e.g. \'{"lr": 1e-3}\'')
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    """Distill (on every rank), then the held-out report (on rank 0); returns the report or None."""
    import torch

    from . import dist as distmod
    from . import distill

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = {**RECIPE, **args.recipe}
    if args.batch_size:
        recipe["batch_size"] = args.batch_size
    t0 = time.perf_counter()
    out = distill(args.teacher, layers=args.layers, mlp_ratio=args.mlp_ratio, minutes=args.minutes,
                  steps=args.steps, out_dir=args.out, seed=args.seed, resume=not args.fresh, threads=args.threads,
                  device=args.device, micro_batch=args.micro_batch, stop_after=args.stop_after,
                  cache_dir=args.cache_dir, **recipe)
    d = distmod.current()
    distmod.teardown(d)
    if args.no_report or not d.main:
        return None
    return report(args, out, time.perf_counter() - t0, recipe)


def report(args, out: Path, distill_seconds: float, recipe: dict) -> dict:
    """The held-out comparison of teacher and student, printed and written to out/report.json."""
    from ..sources import load_source
    from . import load_teacher
    from .report import evaluate, format_report

    teacher = load_teacher(args.teacher)
    student = load_teacher(load_source(str(out)))
    result = evaluate(teacher.model, student.model, teacher.tokenizer, teacher.source.tokenizer_meta,
                      max_windows=args.eval_windows)
    result.update(distill_seconds=distill_seconds, recipe=recipe, out=str(out))
    (Path(out) / "report.json").write_text(json.dumps(result, indent=1, default=str))
    print(format_report(result))
    print(f"distillation wall time {distill_seconds / 60:.1f} min; student at {out}")
    return result


def run(argv=None) -> None:
    """main() with user errors as one line on stderr and exit code 2."""
    from edge_runtime.errors import EdgeError

    try:
        main(argv)
    except (EdgeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
