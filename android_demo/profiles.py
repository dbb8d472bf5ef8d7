"""Device profiles for the phone chat demo: how much memory the app may use and how much context it asks for."""
from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.errors import EdgeError
from edge_runtime.generation.stats import MB


@dataclass(frozen=True)
class Profile:
    name: str
    budget: int    # bytes the whole process may hold resident (weights touched, KV cache, interpreter)
    context: int   # tokens of KV cache wanted; the planner may settle for fewer when they do not fit
    threads: int   # big cores worth using: the little ones slow a matmul split across all of them
    note: str


# Budgets are what Android's low-memory killer leaves a foreground app on such a phone, with room for the
# launcher and a browser tab: roughly a third of the RAM, less on the smallest devices.
PROFILES = {p.name: p for p in (
    Profile("phone-2gb", 512 * MB, 1024, 2, "Android Go class, 4 little cores"),
    Profile("phone-3gb", 1024 * MB, 2048, 4, "entry-level phone, 2 big + 6 little cores"),
    Profile("phone-4gb", 1536 * MB, 4096, 4, "mid-range phone"),
    Profile("phone-8gb", 3072 * MB, 8192, 4, "flagship phone"),
    Profile("watch-2gb", 160 * MB, 512, 2, "Wear OS watch: too small for SmolLM2-135M under Python"),
)}
DEFAULT_PROFILE = "phone-3gb"


def get_profile(name: str) -> Profile:
    """The profile called `name`, or an EdgeError listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise EdgeError(f"unknown device profile {name!r} (known: {', '.join(PROFILES)})") from None


def describe(p: Profile) -> str:
    return f"{p.name}: budget {p.budget / MB:.0f} MB, context {p.context}, {p.threads} threads ({p.note})"
