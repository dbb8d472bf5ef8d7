"""Errors the runtime raises on bad input; the CLIs print them as one line and exit non-zero."""


class EdgeError(Exception):
    """Base class: a user-facing problem with a one-line message (never a bug)."""

    exit_code = 2


class BundleError(EdgeError):
    """A bundle is missing a file, fails its checksum, or has a manifest we cannot read."""


class UnsupportedModelError(EdgeError):
    """The architecture or graph contract is not one this runtime or exporter knows."""


class ContextOverflowError(EdgeError):
    """The prompt (or prompt + generation under overflow='error') does not fit the context."""


class SamplingError(EdgeError):
    """A sampling argument is out of range."""


class MemoryBudgetError(EdgeError):
    """The memory plan exceeds the budget; the message carries the breakdown."""

    def __init__(self, message: str, plan=None, max_context: int | None = None):
        super().__init__(message)
        self.plan = plan
        self.max_context = max_context


class FidelityError(EdgeError):
    """A bundle is further from its float reference than allowed."""


class EdgeWarning(UserWarning):
    """Something was adjusted rather than refused (e.g. threads capped at the CPU count); the CLIs print it as
    one `warning:` line."""
