"""Checksums of a bundle's files, checked in a background thread while the loader does other work.

`Bundle.path(name)` waits for that file's checksum before handing its path out, so nothing reads a file before
it is verified; a mismatch is raised there (and by `wait_all`, which `edge_runtime.load` calls before it
returns, so a corrupted file is refused even when this load never reads it). Files are hashed smallest first:
the tokenizer and graphs are ready early, the weights last.

hashlib and file reads release the GIL, so hashing the weights overlaps the pure-Python tokenizer parse. Each
time the thread takes the GIL back it may wait a switch interval (5 ms) behind the parse, so it reads in large
chunks into one reused buffer: few GIL round trips, one transient buffer (freed before the weights are read).

Imports: the standard library and edge_runtime.errors only.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from ..errors import BundleError

CHUNK = 16 << 20


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(min(chunk, max(1, os.fstat(f.fileno()).st_size)))
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def mismatch(root: Path, name: str) -> str:
    return f"bundle {root}: checksum mismatch for {name} (file altered or corrupted)"


class Verification:
    """name -> (path, expected sha256), hashed by one daemon thread; `wait(name)` blocks until that file is done."""

    def __init__(self, root: Path, files: Mapping[str, tuple[Path, str]]):
        self.root = root
        self._files = dict(files)
        self._done = {name: threading.Event() for name in self._files}
        self._errors: dict[str, str] = {}
        self._verified: set[str] = set()
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-runtime-verify", daemon=True)
        self._thread.start()

    def _size(self, name: str) -> int:
        try:
            return self._files[name][0].stat().st_size
        except OSError:
            return 0

    def _run(self) -> None:
        # every event is set whatever happens, and only a matching hash counts as verified (wait)
        for name in sorted(self._files, key=self._size):
            path, expected = self._files[name]
            try:
                if self._cancelled.is_set():
                    self._errors[name] = f"bundle {self.root}: {name} was not checked (the load was abandoned)"
                elif sha256_file(path) == expected:
                    self._verified.add(name)
                else:
                    self._errors[name] = mismatch(self.root, name)
            except Exception as e:  # noqa: BLE001 - reported by wait(), never lost with the thread
                self._errors[name] = f"bundle {self.root}: cannot read {name} ({getattr(e, 'strerror', None) or e})"
            finally:
                self._done[name].set()

    def cancel(self) -> None:
        """Stop after the file being hashed (a load that failed): no work left behind in the process."""
        self._cancelled.set()

    def wait(self, name: str) -> None:
        """Return once `name` is verified; BundleError if its checksum did not match. Unlisted names pass."""
        event = self._done.get(name)
        if event is None:
            return
        event.wait()
        if name not in self._verified:
            raise BundleError(self._errors.get(name, f"bundle {self.root}: could not check {name}'s checksum"))

    def wait_all(self) -> None:
        for name in self._files:
            self.wait(name)
