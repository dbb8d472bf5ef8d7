"""`edge-run verify BUNDLE`: re-run the bundle's float-reference probes, compare with the figures of its export."""
from __future__ import annotations

import argparse
import sys

from ..errors import EdgeError


def configure(p: argparse.ArgumentParser) -> None:
    from .. import backends

    p.add_argument("bundle", help="bundle folder (made by edge-export)")
    p.add_argument("--backend", default="auto", choices=backends.choices())
    p.add_argument("--threads", type=int, metavar="N", help="compute threads (at most the CPUs available)")
    p.add_argument("--cross", action="store_true", help="the same as `edge-run cross-check BUNDLE`")


def print_result(res, out=None) -> None:
    """The checks of a verify.VerifyResult, one per line, then the greedy prefixes."""
    out = out or sys.stdout
    r = res.report
    print(f"verify {res.bundle}: backend {res.backend}, {r.positions} probe positions ({r.kl_method} KL), "
          f"{len(r.greedy_prefix or [])} greedy prompts", file=out)
    for c in res.checks:
        print(c.line(), file=out)
    if r.greedy_prefix:
        pairs = " ".join(f"{a}/{b}" for a, b in zip(r.greedy_prefix, r.greedy_tokens))
        print(f"  greedy prefix per prompt: {pairs}", file=out)
    if res.baseline is None:
        print("  (no export baseline in the manifest: absolute limits used)", file=out)


def run(args) -> int:
    """Re-run the bundle's float-reference probes and compare with the figures recorded at export."""
    from ..quality.verify import fmt_metric, verify

    if args.cross:
        if args.backend != "auto":
            raise EdgeError("cross-check runs both backends: leave out --backend")
        from .cross_check import run as cross_run

        return cross_run(args)
    res = verify(args.bundle, backend=args.backend, threads=args.threads)
    print_result(res)
    if res.ok:
        print("verify: PASS")
        return 0
    worst = next(c for c in res.checks if not c.ok)
    print(f"verify: FAIL: {', '.join(res.failed)} ({worst.metric} {fmt_metric(worst.metric, worst.value)} "
          f"past limit {fmt_metric(worst.metric, worst.limit)})", file=sys.stderr)
    return 1
