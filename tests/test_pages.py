"""Page-level memory helpers (edge_runtime.memory.pages)."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from edge_runtime.memory import pages

MB = 2**20
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux features")


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def _mapping_rss(path) -> int:
    target, total, cur = str(path.resolve()), 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5 and ":" not in line.split()[0]:
                cur = line.rstrip("\n").endswith(target)
            elif cur and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@linux
def test_reserve_is_zeroed_writable_and_resident_only_where_written():
    before = _rss()
    buf = pages.reserve((2, 64, 8192, 16), np.float16)  # 32 MiB, the shape of a small KV cache
    assert buf.shape == (2, 64, 8192, 16) and buf.dtype == np.float16 and buf.flags.c_contiguous
    assert buf.flags.writeable and not buf[:, :, ::512].any()
    assert _rss() - before < 4 * MB  # reserved, not resident
    buf[0] = 1.0  # half of it
    grown = _rss() - before
    assert 14 * MB < grown < 20 * MB
    assert (buf[0] == 1).all() and not buf[1].any()


@linux
def test_paging_out_reclaims_a_mapped_file_while_its_block_runs_and_keeps_the_data(tmp_path):
    import time

    path = tmp_path / "weights.bin"
    data = np.random.default_rng(1).integers(0, 255, size=16 * MB, dtype=np.uint8)
    data.tofile(path)
    other = pages.reserve((8 * MB,), np.uint8)
    other[::4096] = 7  # private pages beside it: left as they are
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    with pages.paging_out(path, interval=0.001):
        assert int(mapped.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # read while the pager runs
        time.sleep(0.05)
        during = _mapping_rss(path)
    assert pages.can_page_out() == (during < 4 * MB)  # reclaimed where the kernel takes MADV_PAGEOUT
    assert np.array_equal(mapped, data) and (other[::4096] == 7).all()


def test_reserve_of_nothing():
    assert pages.reserve((0, 4), np.float32).shape == (0, 4)


@linux
def test_file_pages_release_drops_residency_and_keeps_the_data(tmp_path):
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 255, size=16 * MB, dtype=np.uint8)
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    assert int(mapped.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page read once
    assert _mapping_rss(path) > 12 * MB
    assert pages.FilePages(path).release() >= 16 * MB
    assert _mapping_rss(path) < 1 * MB
    assert np.array_equal(mapped[::4096], data[::4096])  # pages come back from the file, identical
    assert pages.FilePages(tmp_path / "not-mapped.bin").release() == 0


@linux
def test_file_pages_release_again_and_skip_what_is_no_longer_mapped(tmp_path):
    """FilePages finds the mappings once and drops them on every release; a span unmapped since (its address
    range free for other memory) is skipped, not advised."""
    import mmap

    path = tmp_path / "weights.bin"
    np.arange(8 * MB, dtype=np.uint8).tofile(path)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(m, np.uint8)
    view.sum(dtype=np.int64)
    held = pages.FilePages(path)
    assert len(held.spans) == 1
    for _ in range(2):  # read back in between: the same spans drop the pages again
        assert held.release() >= 8 * MB and _mapping_rss(path) < 1 * MB
        assert int(view[::4096].sum(dtype=np.int64)) == int((np.arange(0, 8 * MB, 4096) % 256).sum())
    del view
    m.close()
    assert held.release() == 0


@linux
def test_a_mapping_with_private_changes_is_left_alone(tmp_path):
    path = tmp_path / "w.bin"
    np.zeros(MB, np.uint8).tofile(path)
    cow = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: changes live only in this process
    cow[:4096] = 7
    pages.FilePages(path).release()
    assert cow[0] == 7


def test_trim_heap_returns_freed_heap_and_is_a_no_op_without_glibc(monkeypatch):
    import ctypes

    chunks = [bytes(4096) for _ in range(20_000)]  # small blocks: malloc's heap, not mmap
    del chunks
    assert pages.trim_heap() is True  # glibc here: the freed blocks went back to the system
    monkeypatch.setattr(ctypes, "CDLL", lambda name: types.SimpleNamespace())  # a libc without malloc_trim
    assert pages.trim_heap() is False
    monkeypatch.setattr(sys, "platform", "darwin")
    assert pages.trim_heap() is False
