"""Resident memory at page granularity: buffers committed as they are written, and weight-file pages let go.

Peak RSS is what the phone's low-memory killer watches, and both helpers here lower it without changing a
single value the model computes:

* `reserve(shape, dtype)`: a zeroed array on fresh anonymous pages. The whole size is reserved (the memory
  plan counts all of it), but the kernel maps a page only when it is first written, so a KV cache of 2048
  positions holding 628 costs the pages of 628.
* `trim_heap()`: hand the C heap's free pages back to the system (glibc malloc_trim): parsing tokenizer.json
  frees many short-lived objects, which would otherwise stay counted in RSS for the session.
* `paging_out(path)`: while ONNX Runtime builds a session (and prepacks every weight from the mapped file
  into its own buffers), a thread asks the kernel to reclaim the file's pages it has read (MADV_PAGEOUT), so
  the file and the packed copies are not both resident at the load peak. Reclaiming never changes a value:
  clean file pages are read again on access, and memory that is not the file's (an address range the loader
  unmapped and reused meanwhile) is at most swapped out, so the thread needs no coordination with the loader.
* `FilePages(path).release()`: drop this process's clean pages of a memory-mapped
  file. ONNX Runtime maps weights.bin, reads every weight once to prepack it into its own buffers, and keeps
  mapped what it reads in place: the embedding table GatherBlockQuantized gathers from, the norms, the rotary
  tables. A gathered row brings in the kernel's fault-around window of the file around it, so without a release
  those pages add up with every new token id. Dropped clean pages are re-read from the file on the next access,
  identical.
"""
from __future__ import annotations

import contextlib
import functools
import math
import mmap
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_MADV_RANDOM, _MADV_DONTNEED, _MADV_PAGEOUT = 1, 4, 21  # Linux <sys/mman.h> (PAGEOUT: Linux 5.4+)
PAGEOUT_INTERVAL = 0.001  # seconds between two passes of paging_out's thread
# A read fault on a file mapping maps the page-cache pages around it too: Linux's fault_around_bytes default.
FAULT_AROUND = 64 * 1024
# Decode steps between two releases of a weight file's pages by a backend that gathers rows in place (ORT).
RELEASE_STEPS = 64
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


def _madvise():
    """libc's madvise through ctypes, or None (not Linux, or no libc to call)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _mappings(path: Path) -> set[tuple[int, int]]:
    """(start, end) of every mapping of `path` now (/proc/self/maps: cheap, unlike smaps)."""
    target = str(path.resolve())
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        return {(int(m[1], 16), int(m[2], 16)) for m in map(_MAPS_LINE.match, f) if m and m[4] == target}


class FilePages:
    """This process's clean mappings of one file, found once (smaps); release() drops their pages.

    Linux only (elsewhere, and on any failure, it holds no mapping and does nothing: memory is then as without
    it). A mapping with a privately changed page is left out, since dropping it would lose that change, and
    release() skips a span that no longer maps the file (unmapped, its address range may hold other memory).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.madvise = _madvise()
        try:
            self.spans = _clean_mappings(self.path) if self.madvise is not None else []
        except OSError:
            self.spans = []

    def release(self) -> int:
        """madvise(MADV_DONTNEED) every span still mapping the file; returns the bytes of address space advised."""
        if not self.spans:
            return 0
        try:
            live = _mappings(self.path)
        except OSError:
            return 0
        done = 0
        for start, end in self.spans:
            if (start, end) not in live:
                continue
            # MADV_RANDOM first: no read-ahead around a gathered row when it is read back
            self.madvise(start, end - start, _MADV_RANDOM)
            if self.madvise(start, end - start, _MADV_DONTNEED) == 0:
                done += end - start
        return done


@functools.cache
def can_page_out() -> bool:
    """Whether this kernel takes MADV_PAGEOUT (tried on a page of this process's own)."""
    madvise = _madvise()
    if madvise is None:
        return False
    import ctypes

    buf = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
    try:
        buf[0] = 1
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))  # the view is gone after this line
        return madvise(address, mmap.PAGESIZE, _MADV_PAGEOUT) == 0
    finally:
        buf.close()


@contextlib.contextmanager
def paging_out(path: Path, interval: float = PAGEOUT_INTERVAL) -> Iterator[None]:
    """Within the block, a thread pages out every mapping of `path` each `interval` seconds (module docstring);
    where madvise cannot be called (not Linux) or the kernel has no MADV_PAGEOUT, the block runs as without."""
    madvise = _madvise()
    if madvise is None or not can_page_out():
        yield
        return
    done = threading.Event()

    def run() -> None:
        while not done.wait(interval):
            try:
                spans = _mappings(path)
            except OSError:
                return
            for start, end in spans:
                madvise(start, end - start, _MADV_PAGEOUT)

    thread = threading.Thread(target=run, name="edge-runtime-pageout", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


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
