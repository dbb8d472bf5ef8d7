"""Resident memory at page granularity: buffers committed as they are written, and weight-file pages let go.

Peak RSS is what the phone's low-memory killer watches, and both helpers here lower it without changing a
single value the model computes:

* `reserve(shape, dtype)`: a zeroed array on fresh anonymous pages. The whole size is reserved (the memory
  plan counts all of it), but the kernel maps a page only when it is first written, so a KV cache of 2048
  positions holding 628 costs the pages of 628.
* `trim_heap()`: hand the C heap's free pages back to the system (glibc malloc_trim). Parsing tokenizer.json
  frees ~10 MB of short-lived objects right after load; without this they stay counted in RSS for the session.
* `release_file_pages(path)`: drop this process's clean pages of a memory-mapped file. ONNX Runtime maps
  weights.bin, reads every weight once to prepack it into its own buffers, and keeps the mapping of what it
  reads in place (the embedding GatherBlockQuantized gathers from); those pages stay resident although a step
  reads only a few rows. Dropped clean pages are re-read from the file on the next access, identical.
"""
from __future__ import annotations

import math
import mmap
import re
import sys
from pathlib import Path

import numpy as np

_MADV_RANDOM, _MADV_DONTNEED = 1, 4  # Linux <sys/mman.h>
_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s+(.*)$")


def reserve(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zero-filled C-contiguous array whose pages become resident only when written."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    if count * dtype.itemsize == 0:
        return np.zeros(shape, dtype)
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: no lazily committed anonymous mapping to ask for
        return np.zeros(shape, dtype)
    # Private anonymous (Python adds MAP_ANONYMOUS for fd -1): reads of unwritten pages see the shared zero
    # page, a write maps one page. (The default, shared, is shmem-backed: a mere read would commit a page.)
    buf = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE)
    return np.frombuffer(buf, dtype, count).reshape(shape)


def _clean_mappings(path: Path) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of `path` with no privately modified page.

    A page this process changed in a private file mapping became an anonymous copy (smaps "Anonymous");
    "Private_Dirty" would also count unwritten page-cache pages of a freshly written file, which are safe.
    """
    target = str(path.resolve())
    spans, cur, dirty = [], None, 0
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _MAPS_LINE.match(line)
            if m:
                if cur is not None and dirty == 0:
                    spans.append(cur)
                cur = (int(m[1], 16), int(m[2], 16)) if m[4] == target else None
                dirty = 0
            elif cur is not None and line.startswith("Anonymous:"):
                dirty += int(line.split()[1])
    if cur is not None and dirty == 0:
        spans.append(cur)
    return spans


def release_file_pages(path: Path) -> int:
    """madvise(MADV_DONTNEED) every clean mapping of `path`; returns the bytes of address space advised.

    Linux only (elsewhere, and on any failure, it does nothing: memory is then as without it). A mapping
    with a privately changed page is left alone, since dropping it would lose that change.
    """
    if not sys.platform.startswith("linux"):
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        spans = _clean_mappings(Path(path))
    except (OSError, AttributeError):
        return 0
    done = 0
    for start, end in spans:
        # MADV_RANDOM first: a gathered row then faults in its own page, not the 64 KB fault-around window
        madvise(start, end - start, _MADV_RANDOM)
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            done += end - start
    return done


def trim_heap() -> bool:
    """glibc malloc_trim(0): return free heap pages to the system; False where there is no glibc (musl,
    Android's bionic, macOS), which is then simply as without it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))
