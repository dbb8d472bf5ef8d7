"""`edge-run budget BUNDLE --budget 200MB --context 2048`: the memory plan of a session, component by component,
beside what a fresh process that loads the bundle and generates actually used (peak RSS, VmHWM)."""
from __future__ import annotations

import argparse
import sys

from ..errors import EdgeError
from ..generation.stats import MB, format_size, parse_size

# measured stage -> the plan components it holds
STAGE_COMPONENTS = (
    ("runtime", ("runtime",), "Python and libraries imported"),
    ("tokenizer", ("tokenizer",), "tokenizer.json parsed"),
    ("backend", ("weights", "kv_cache"), "load: weights resident, KV cache reserved (resident as it fills)"),
    ("prefill", ("mapped", "activations", "logits"), "peak of prefill over what load left"),
    ("decode", (), "growth while decoding"),
)


def configure(p: argparse.ArgumentParser) -> None:
    from .. import backends

    p.add_argument("bundle", help="bundle folder (made by edge-export)")
    p.add_argument("--budget", metavar="SIZE", help="memory budget, e.g. 200MB (context, KV dtype and prefill "
                                                    "chunk are chosen to fit)")
    p.add_argument("--context", type=int, metavar="N", help="KV-cache size in tokens (default: the largest "
                                                            "that fits the budget, else 2048)")
    p.add_argument("--backend", default="auto", choices=backends.choices())
    p.add_argument("--kv-dtype", choices=("float32", "float16"))
    p.add_argument("--prompt-tokens", type=int, default=500, metavar="N")
    p.add_argument("--new-tokens", type=int, default=128, metavar="N")
    p.add_argument("--overflow", choices=("error", "truncate", "slide"), default="slide",
                   help="context policy of the measured session (default slide)")
    p.add_argument("--plan-only", action="store_true", help="print the plan, do not measure")


def run(args) -> int:
    """Print the memory plan of a session and, unless --plan-only, the measured peak of a fresh process."""
    from ..format.bundle import Bundle
    from ..memory import budget
    from ..memory.testing import ChildError, measure_generation

    bundle = Bundle.open(args.bundle, verify=False)
    limit = parse_size(args.budget) if args.budget is not None else None
    backend = budget.resolve_backend(bundle, args.backend, limit, args.context, args.kv_dtype)
    if limit is not None:
        plan = budget.plan(bundle, limit, context=args.context, backend=backend, kv_dtype=args.kv_dtype)
    else:
        context = args.context or min(bundle.max_context, 2048)
        plan = budget.plan_session(bundle, context, backend, args.kv_dtype)
    print(f"{args.bundle}: {backend}, context {plan.context}, kv {plan.kv_dtype}, prefill chunk "
          f"{plan.prefill_chunk}" + (f", budget {format_size(limit)}" if limit is not None else ""))
    if args.plan_only:
        print(plan.table())
        return 0
    try:
        m = measure_generation(args.bundle, args.prompt_tokens, args.new_tokens, context=plan.context,
                               backend=backend, kv_dtype=plan.kv_dtype, overflow=args.overflow,
                               memory_budget=limit)
    except ChildError as e:
        raise EdgeError(str(e)) from None
    print(compare(plan, m))
    print(f"measured: {args.prompt_tokens}-token prompt + {m.new_tokens} new tokens in a fresh process "
          f"({m.backend}, context {m.context}"
          + (f", decode {m.decode_tps:.1f} tok/s" if m.decode_tps else "") + ")")
    if limit is not None and m.peak > limit:
        print(f"over budget: measured peak {format_size(m.peak)} > {format_size(limit)}", file=sys.stderr)
        return 1
    return 0


def _mb(nbytes: float) -> float:
    """MB rounded for a table column; a tiny negative difference shows as 0.0, not -0.0."""
    return round(nbytes / MB, 1) or 0.0


def compare(plan, m) -> str:
    """Plan beside measurement, one row per measured stage with the plan components it holds."""
    rows = [f"  {'stage':<11}{'plan MB':>9}{'measured MB':>13}  components"]
    for stage, names, note in STAGE_COMPONENTS:
        planned = sum(plan[n] for n in names)
        shown = " + ".join(f"{n} {_mb(plan[n]):.1f}" for n in names)
        rows.append(f"  {stage:<11}{_mb(planned):9.1f}{_mb(m.stages.get(stage, 0)):13.1f}  "
                    f"{shown + '; ' if shown else ''}{note}")
    rows.append(f"  {'load peak':<11}{_mb(plan.load_peak):9.1f}{'':>13}  load transient "
                f"{_mb(plan.load_transient):.1f} planned, {_mb(m.stages.get('load_transient', 0)):.1f} measured")
    delta = (m.peak / plan.total - 1) * 100 if plan.total else 0.0
    rows.append(f"  {'peak':<11}{_mb(plan.total):9.1f}{_mb(m.peak):13.1f}  measured {delta:+.1f}% vs plan")
    return "\n".join(rows)
