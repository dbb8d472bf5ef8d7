"""The in-domain ceiling of the distillation demo: the same recipe, budget and student, trained on the evaluation
domain itself.

The demo's student trains on text the teacher writes and is scored on domains it never saw. Here it trains on the
first 90% of CPython's pydoc topics (by key) instead, with the teacher's top-k over that text, and is scored on
the last 10%: the easiest case any recipe can have, since the evaluation text is the training text's own kind.
A student that misses the demo's bar here, in the same minutes, cannot be expected to meet it on domains it
never trained on. The pruned student before any training is scored too, for the distance training covered.

    python bench/distill_ceiling.py --minutes 30 --out build/student-ceiling
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time budget, as the demo's")
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--out", type=Path, default=ROOT / "build/student-ceiling")
    ap.add_argument("--cache-dir", type=Path, default=None, help="teacher caches (default: cache/distill)")
    args = ap.parse_args(argv)

    from export.distill import distill, load_teacher
    from export.distill.data import pack, pydoc_split
    from export.distill.demo import DEFAULT_TEACHER, RECIPE
    from export.distill.prune import drop_layers
    from export.distill.report import EVAL_WINDOW, compare, meets_bar
    from export.sources import load_source

    train_texts, heldout = pydoc_split()
    args.out.mkdir(parents=True, exist_ok=True)
    text_file = args.out / "pydoc-train.txt"
    text_file.write_text("\n\n".join(train_texts), encoding="utf-8")
    recipe = {k: v for k, v in RECIPE.items() if not k.startswith("synthetic")}
    recipe["data"] = (str(text_file),)

    t0 = time.perf_counter()
    distill(ROOT / DEFAULT_TEACHER, layers=args.layers, minutes=args.minutes, out_dir=args.out, resume=False,
            cache_dir=args.cache_dir, heldout=heldout, **recipe)
    wall = time.perf_counter() - t0

    teacher = load_teacher(ROOT / DEFAULT_TEACHER)
    student = load_teacher(load_source(str(args.out))).model
    windows = pack(heldout, teacher.tokenizer, EVAL_WINDOW, teacher.eos_id)
    keep = json.loads((args.out / "distill.json").read_text())["keep"]
    untrained = drop_layers(teacher.model, keep)
    rows = {"pruned, untrained": compare(teacher.model, untrained, windows),
            f"trained in-domain ({wall / 60:.1f} min)": compare(teacher.model, student, windows)}
    print(f"\nIn-domain ceiling: {args.layers}-layer student, held-out tail of pydoc topics "
          f"({len(windows)} windows of {EVAL_WINDOW} tokens), trained on the rest of pydoc topics\n")
    print("| student | teacher PPL | student PPL | PPL ratio | KLD | top-1 | bar |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['teacher_ppl']:.2f} | {r['student_ppl']:.2f} | {r['ppl_ratio']:.2f} | "
              f"{r['kld']:.3f} | {r['top1']:.1%} | {'met' if meets_bar(r) else 'GAP'} |")
    (args.out / "ceiling.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
