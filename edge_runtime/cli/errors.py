"""The one place where an exception becomes what a command-line user sees: one `PROG: error: ...` line and an
exit code (2: the input or the bundle is wrong, 1: the run failed), a traceback only under --debug.

Both `edge-run` and `edge-export` run their work through `run_guarded`, and parse their arguments with
`ArgumentParser`, whose errors take the same path."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from ..errors import EdgeError

DEBUG_FLAG = "--debug"
DEBUG_HELP = "show the Python traceback of an error"


class UsageError(EdgeError):
    """The command line itself is wrong (unknown option, bad value)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} -h)")


def wants_debug(argv: Sequence[str]) -> bool:
    """Whether --debug is among the options (before any `--`), known before parsing can fail."""
    options = argv[:list(argv).index("--")] if "--" in argv else argv
    return DEBUG_FLAG in options


def one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def describe(error: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ended a command."""
    if isinstance(error, EdgeError):
        return error.exit_code, one_line(str(error))
    if isinstance(error, MemoryError):
        return 1, "out of memory"
    if isinstance(error, OSError):
        where = f": {error.filename}" if error.filename else ""
        return 1, one_line(f"{error.strerror or error}{where}")
    return 1, one_line(f"internal error ({type(error).__name__}: {error}); rerun with {DEBUG_FLAG} "
                       f"for the traceback")


def _show_warning(prog: str):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {one_line(str(message))}", file=file or sys.stderr)
    return show


def _silence_stdout() -> None:
    # The reader went away (e.g. `| head`): silence the flush at exit, as the Python docs advise.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run_guarded(prog: str, body: Callable[[], int], debug: bool = False, interrupted: str = "") -> int:
    """Run a command's body; map whatever it raises to one stderr line and an exit code.

    Ctrl-C exits 130 (printing `interrupted` when given); a closed stdout pipe exits 1 quietly.
    """
    warnings.showwarning = _show_warning(prog)
    try:
        return body()
    except KeyboardInterrupt:
        if interrupted:
            print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except Exception as e:  # noqa: BLE001 - this is the one place every failure is turned into a message
        if debug:
            traceback.print_exc()
        code, message = describe(e)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code
