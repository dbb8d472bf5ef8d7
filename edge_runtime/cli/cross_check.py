"""`edge-run cross-check BUNDLE`: the NumPy backend and ONNX Runtime against each other on the exact graph."""
from __future__ import annotations

import argparse
import sys


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder (made by edge-export)")
    p.add_argument("--threads", type=int, metavar="N", help="compute threads (at most the CPUs available)")


def run(args) -> int:
    """Print the figures of the two executors; exit 1 when any limit is missed."""
    from ..quality.cross_check import cross_check
    from ..threads import check_threads

    res = cross_check(args.bundle, threads=check_threads(args.threads))
    for line in res.lines():
        print(line)
    if res.ok:
        print("cross-check: PASS")
        return 0
    print("cross-check: FAIL: the two executors disagree on the exact graph", file=sys.stderr)
    return 1
