"""Memory plan against measurement, each in a fresh process: SmolLM2-135M (int4 and int8 bundles, ONNX Runtime) or
the bundles given.

    .venv/bin/python bench/memory.py                 # plan vs measured, contexts 512 / 2048 / 8192, int4 and int8
    .venv/bin/python bench/memory.py --long 5000     # also 5,000 tokens with overflow="slide" at context 512
    .venv/bin/python bench/memory.py --backend numpy --kv-dtype float16 --contexts 512,2048
    .venv/bin/python bench/memory.py --bundle bundles/gemma3-exact   # any bundle's plan vs measured

Two workloads per context: "full" fills the context (prompt = context - 16, then 16 new tokens), the worst
case the plan bounds; "500+128" is the issue's phone scenario. Then the 240 MB budget question, and how long a
load under an impossible budget takes to fail. Peak RSS is VmHWM; memory figures are stable on a shared
machine, speed figures are not.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_runtime.errors import MemoryBudgetError
from edge_runtime.format.bundle import Bundle
from edge_runtime.generation.stats import MB
from edge_runtime.memory import budget
from edge_runtime.memory.testing import ChildError, measure_generation
from export.version import ensure_bundle as ensure_exported

MODEL = ROOT / "cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLES = ROOT / "bundles"
CONTEXTS = (512, 2048, 8192)
FULL_NEW = 16
TOLERANCE = 0.10
BUDGET_MB = 240  # the phone question: SmolLM2 int4 at context 2048 within this budget (as `make budget`)


def ensure_bundle(quant: str) -> Path:
    return ensure_exported(str(MODEL), BUNDLES / f"smollm2-{quant}", "--quant", quant)


def row(quant, bundle, context, prompt, new, backend, threads, kv_dtype=None) -> tuple[str, bool]:
    plan = budget.plan_session(Bundle.open(bundle, verify=False), context, backend, kv_dtype)
    m = measure_generation(bundle, prompt, new, context=context, backend=backend, overflow="slide",
                           threads=threads, kv_dtype=kv_dtype)
    err = m.peak / plan.total - 1
    tps = f"{m.decode_tps:.1f}" if m.decode_tps else "-"
    ok = abs(err) <= TOLERANCE
    return (f"| {quant} {plan.kv_dtype} | {context} | {prompt}+{new} | {plan.total / MB:.1f} | {m.peak / MB:.1f} "
            f"| {err * 100:+.1f}% "
            f"| {m.stages['runtime'] / MB:.1f} | {m.stages['tokenizer'] / MB:.1f} | {m.stages['backend'] / MB:.1f} "
            f"| {m.stages['prefill'] / MB:.1f} | {m.slides} | {tps} |"), ok


def plan_vs_measured(bundles: dict, backend, threads, contexts=CONTEXTS, kv_dtype=None) -> bool:
    """bundles: row label -> bundle folder."""
    print("\n## Plan vs measured peak RSS (fresh process per row)\n")
    print("| bundle | context | prompt+new | plan MB | measured MB | vs plan | runtime | tokenizer | load | "
          "prefill peak | slides | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    all_ok = True
    for quant, bundle in bundles.items():
        for context in contexts:
            line, ok = row(quant, bundle, context, context - FULL_NEW, FULL_NEW, backend, threads, kv_dtype)
            print(line, flush=True)
            all_ok &= ok
            line, _ = row(quant, bundle, context, 500, 128, backend, threads, kv_dtype)
            print(line, flush=True)
    print(f"\nfull-context rows within +-{TOLERANCE:.0%} of the plan: {'yes' if all_ok else 'NO'} "
          "(the 500+128 rows use less than the plan when the context is larger than the session needs)")
    return all_ok


def budget_question(backend) -> None:
    print(f"\n## The {BUDGET_MB} MB question (SmolLM2-135M int4, context 2048)\n")
    b = Bundle.open(ensure_bundle("int4"), verify=False)
    for kind, be in ((backend, backend), ("numpy", "numpy")):
        try:
            p = budget.plan(b, BUDGET_MB * MB, context=2048, backend=be)
            print(f"- {kind}: fits: {p.summary()}")
        except MemoryBudgetError as e:
            print(f"- {kind}: {e}")
        least = budget.plan_session(b, budget.MIN_CONTEXT, be, budget.kv_dtype_choices(b, be)[-1],
                                    budget.PREFILL_CHUNKS[-1])
        print(f"  smallest possible session ({kind}, context {budget.MIN_CONTEXT}): {least.total / MB:.1f} MB = "
              f"{least.summary()}")
    try:
        m = measure_generation(ensure_bundle("int4"), 500, 128, context=2048, backend="auto",
                               memory_budget=BUDGET_MB * MB)
    except ChildError as e:  # no backend's plan fits: the load refuses, which is the answer
        reason = str(e).split(": ", 1)[-1]
        print(f"- load(memory_budget='{BUDGET_MB}MB', context=2048), backend auto: refused: {reason}")
        return
    print(f"- load(memory_budget='{BUDGET_MB}MB', context=2048), backend auto -> {m.backend}: 500+128 tokens measured "
          f"{m.peak / MB:.1f} MB peak (prefill chunk {m.prefill_chunk}, decode {m.decode_tps or 0:.1f} tok/s)")


def fail_fast() -> None:
    print("\n## A budget below the minimum fails at load, before anything large is allocated\n")
    code = ("import time, edge_runtime; from edge_runtime.generation.stats import peak_rss_bytes\n"
            "t = time.perf_counter()\n"
            "try:\n    edge_runtime.load(%r, memory_budget='60MB', context=2048, verify=False)\n"
            "except edge_runtime.MemoryBudgetError as e:\n"
            "    print(f'{time.perf_counter() - t:.3f} s, peak RSS {peak_rss_bytes() / 2**20:.1f} MB: {e}')")
    p = subprocess.run([sys.executable, "-c", code % str(ensure_bundle("int4"))], capture_output=True, text=True,
                       cwd=ROOT, check=False)
    print(f"- load(memory_budget='60MB'): {(p.stdout or p.stderr).strip()}")


def long_session(tokens: int, backend: str, threads) -> None:
    print(f"\n## {tokens} generated tokens with overflow='slide' (int4, context 512)\n")
    bundle = ensure_bundle("int4")
    plan = budget.plan_session(Bundle.open(bundle, verify=False), 512, backend)
    t = time.perf_counter()
    m = measure_generation(bundle, 500, tokens, context=512, backend=backend, overflow="slide", threads=threads)
    print(f"- {m.new_tokens} tokens, {m.slides} slides, {time.perf_counter() - t:.0f} s: peak RSS {m.peak / MB:.1f} "
          f"MB, plan {plan.total / MB:.1f} MB, growth while decoding {m.stages['decode'] / MB:.1f} MB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", default="int4,int8")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-dtype", choices=("float32", "float16"), help="default: each bundle's default graph")
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--long", type=int, default=0, metavar="TOKENS", help="also a long slide session")
    ap.add_argument("--bundle", type=Path, action="append", default=[],
                    help="plan vs measured for this bundle instead of the SmolLM2 ones (repeatable); the SmolLM2 "
                         "budget sections are then skipped")
    args = ap.parse_args(argv)
    bundles = ({b.name: b for b in args.bundle} if args.bundle
               else {q: ensure_bundle(q) for q in args.quants.split(",")})
    ok = plan_vs_measured(bundles, args.backend, args.threads, [int(c) for c in args.contexts.split(",")],
                          args.kv_dtype)
    if args.bundle:
        return 0 if ok else 1
    budget_question(args.backend)
    fail_fast()
    if args.long:
        long_session(args.long, args.backend, args.threads)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
