"""Progress of a long export on stderr (one tqdm bar over named steps), shared by both exporters."""
from __future__ import annotations

import sys
import time


class Steps:
    """Progress on stderr: one tqdm bar over the pipeline's steps on a terminal, only the log lines elsewhere
    (quiet when progress is off)."""

    def __init__(self, names, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():  # a bar redrawn into a log file or pipe is one line per redraw
            from tqdm import tqdm

            self.bar = tqdm(total=len(names), desc="export", unit="step", file=sys.stderr, leave=True,
                            bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}] {postfix}")
        self.t0 = time.perf_counter()

    def start(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, msg: str) -> None:
        """A line on stderr that does not break the bar (silent when progress is off)."""
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        elif self.enabled:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
