"""How many threads a model runs with: the CPUs this process may use, capped for the default. Imports only
edge_runtime.errors, so backends and commands may ask without importing the model."""
from __future__ import annotations

import os
import warnings

from .errors import EdgeError, EdgeWarning

MAX_DEFAULT_THREADS = 4  # beyond the big cores of a phone, more threads only add contention


def available_cpus() -> int:
    """The CPUs this process may actually use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    return min(available_cpus(), MAX_DEFAULT_THREADS)


def check_threads(threads: int | None, name: str = "threads") -> int:
    """The thread count to run with: default_threads() for None, else `threads` capped at available_cpus()
    (more threads than CPUs only add contention and per-thread buffers), with an EdgeWarning saying so.
    name: how the caller's users spell the argument (a flag for a CLI)."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise EdgeError(f"{name} must be a positive integer, got {threads!r}")
    cpus = available_cpus()
    if threads > cpus:
        warnings.warn(EdgeWarning(f"threads {threads} capped at {cpus}, the CPUs available to this process"),
                      stacklevel=3)
        return cpus
    return threads
