"""`edge-run`: the command line, one module per subcommand in this folder.

A subcommand is registered with `add_subcommand(name, help, module)`; the module defines `configure(parser)`
(its arguments) and `run(args) -> int` (its exit code). `edge-run BUNDLE [PROMPT]` without a subcommand means
`run`; a bundle folder whose name is a subcommand runs as `edge-run run verify` or `edge-run ./verify`.
Errors from parsing and from the commands go through cli.errors.run_guarded (one line, exit 1/2).
May import every runtime package; of it, only cli.errors is imported elsewhere (edge-export shares its error path).
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import DEBUG_FLAG, DEBUG_HELP, ArgumentParser, run_guarded, wants_debug

PROG = "edge-run"
DEFAULT = "run"


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    module: str  # defines configure(parser) and run(args) -> int; imported only when used or for -h


SUBCOMMANDS: dict[str, Subcommand] = {}


def add_subcommand(name: str, help: str, module: str) -> None:
    """Register `edge-run NAME ...`, implemented by `module` (see the module docstring)."""
    SUBCOMMANDS[name] = Subcommand(name, help, module)


add_subcommand("run", "stream an answer to a prompt (the default command)", "edge_runtime.cli.run")
add_subcommand("verify", "re-run the bundle's float-reference probes against its export figures",
               "edge_runtime.cli.verify")
add_subcommand("cross-check", "check the NumPy backend and ONNX Runtime against each other on the exact graph",
               "edge_runtime.cli.cross_check")
add_subcommand("budget", "the memory plan of a session beside a measured run", "edge_runtime.cli.budget")
add_subcommand("chat", "an interactive conversation that keeps its KV cache between turns", "edge_runtime.cli.chat")
add_subcommand("serve", "the OpenAI chat-completions API on a local HTTP port", "edge_runtime.cli.serve")


def build_parser(only: str | None = None) -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    """The top-level parser and one sub-parser per subcommand (only `only`'s arguments configured)."""
    top = ArgumentParser(
        prog=PROG, description="Run a quantized language model bundle made by edge-export.",
        epilog=f"`{PROG} BUNDLE [PROMPT]` means `{PROG} run BUNDLE [PROMPT]`; a bundle folder named like a "
               f"command runs as `{PROG} run NAME` or `{PROG} ./NAME`.")
    subs = top.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}
    for cmd in SUBCOMMANDS.values():
        p = subs.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
        if only in (None, cmd.name):
            importlib.import_module(cmd.module).configure(p)
        parsers[cmd.name] = p
    top.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return top, parsers


def split_command(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(subcommand, its arguments): the first word when it names one, else `run`; None: the top-level help.
    A leading --debug moves after the subcommand (`edge-run --debug verify B` = `edge-run verify B --debug`)."""
    argv = list(argv)
    lead = []
    while argv and argv[0] == DEBUG_FLAG:
        lead.append(argv.pop(0))
    if argv and argv[0] in SUBCOMMANDS:
        return argv[0], argv[1:] + lead
    if not argv or argv[0] in ("-h", "--help"):
        return None, argv
    return DEFAULT, argv + lead


def _dispatch(argv: list[str]) -> int:
    name, rest = split_command(argv)
    top, parsers = build_parser(only=name)
    if name is None:
        top.print_help(sys.stdout if rest else sys.stderr)
        return 0 if rest else 2
    args = parsers[name].parse_intermixed_args(rest)
    return importlib.import_module(SUBCOMMANDS[name].module).run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `edge-run`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_guarded(PROG, lambda: _dispatch(argv), debug=wants_debug(argv))
