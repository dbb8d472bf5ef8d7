"""What a generation cost: token counts, timings, peak resident memory, and the one-line summary."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from ..errors import EdgeError

MB = 1 << 20  # sizes are binary (MiB) throughout, as ps and top report them

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MB, "mb": MB, "mib": MB,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def peak_rss_bytes() -> int:
    """The process's peak resident set size (VmHWM), the figure a phone's low-memory killer looks at."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    import resource  # no /proc (macOS): ru_maxrss is bytes there, kB on other Unixes

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def parse_size(text: str | int) -> int:
    """'200MB', '1.5G', '512MiB', '4096' -> bytes (K/M/G are binary: 200MB = 200 * 2**20); at least 1 byte."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise EdgeError(f"cannot read size {text!r:.40} (examples: 200MB, 1.5GB, 4096)")
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size < 1:
        raise EdgeError(f"a size must be at least 1 byte, got {text!r:.40}")
    return size


def format_size(nbytes: float) -> str:
    """'93.1 MB', '12.0 KB', '0 MB': a non-zero size never prints as '0.0 MB', nor a tiny negative as '-0.0'."""
    if nbytes == 0:
        return "0 MB"
    if abs(nbytes) >= 0.05 * MB:
        return f"{nbytes / MB:.1f} MB"
    if abs(nbytes) >= 0.05 * 1024:
        return f"{nbytes / 1024:.1f} KB"
    return f"{int(nbytes)} bytes"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0   # prompt in, first token sampled
    decode_s: float = 0.0    # first token to last token
    load_s: float = 0.0
    peak_rss_mb: float = 0.0
    slides: int = 0          # times overflow="slide" dropped the older half of the context
    backend: str = ""
    cached_tokens: int = 0     # prompt tokens whose keys/values the cache already held (not run again)
    prefilled_tokens: int = 0  # tokens run through prefill passes (the prompt's new part, and slides)

    @property
    def prefill_tps(self) -> float | None:
        n = self.prefilled_tokens or self.prompt_tokens
        return n / self.prefill_s if self.prefill_s > 0 else None

    @property
    def decode_tps(self) -> float | None:
        # The first new token comes out of prefill, so decode speed counts the tokens after it.
        n = self.new_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None

    def line(self) -> str:
        """e.g. 'prompt 31 tok (24 cached), prefill 402.1 tok/s | 64 new tok, decode 38.0 tok/s | ...'."""
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        parts = [
            f"prompt {self.prompt_tokens} tok{cached}, prefill {_rate(self.prefill_tps)}",
            f"{self.new_tokens} new tok, decode {_rate(self.decode_tps)}",
            f"peak RSS {self.peak_rss_mb:.1f} MB",
            f"load {self.load_s:.2f} s",
        ]
        if self.slides:
            parts.append(f"context slid {self.slides}x")
        if self.backend:
            parts.append(self.backend)
        return " | ".join(parts)


def _rate(tps: float | None) -> str:
    return f"{tps:.1f} tok/s" if tps is not None else "- tok/s"
