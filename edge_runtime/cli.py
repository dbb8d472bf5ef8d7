"""`edge-run`: the command line. `edge-run BUNDLE "prompt"` streams an answer; other subcommands dispatch to
the modules named in COMMANDS. Every EdgeError becomes one `edge-run: error: ...` line and exit code 2."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .errors import EdgeError

# Subcommand -> module defining `add_arguments(parser)` and `run(args) -> int` (its docstring is the help).
# `edge-run BUNDLE ...` without a subcommand means `run`.
COMMANDS = {
    "run": "edge_runtime.cli",
    "verify": "edge_runtime.verify",
    "budget": "edge_runtime.budget_cli",
    "chat": "edge_runtime.chat_cli",
    "serve": "edge_runtime.serve_cli",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import backends
    from .generate import OVERFLOW_POLICIES

    p.add_argument("bundle", help="bundle folder (made by edge-export)")
    p.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' or omitted reads standard input")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="send the prompt as a user message through the chat template "
                           "(default if the bundle has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="feed the prompt as plain text")
    p.add_argument("--system", help="system message (chat mode)")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, default=0, help="0 = off")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", nargs="+", action="extend", default=[], metavar="S",
                   help="stop strings (not printed)")
    r = p.add_argument_group("runtime")
    r.add_argument("--backend", default="auto", choices=backends.choices())
    r.add_argument("--threads", type=int, metavar="N")
    r.add_argument("--context", type=int, metavar="N", help="KV-cache size in tokens")
    r.add_argument("--budget", metavar="SIZE", help="memory budget, e.g. 200MB (context chosen to fit)")
    r.add_argument("--kv-dtype", choices=("float32", "float16"),
                   help="KV-cache precision (default: the bundle's default graph, or the memory plan's choice)")
    r.add_argument("--overflow", choices=OVERFLOW_POLICIES, default="error",
                   help="when prompt + answer exceed the context (default: error)")
    r.add_argument("--no-verify", dest="verify", action="store_false", help="skip the checksum pass")
    r.add_argument("--no-stats", dest="stats", action="store_false", help="do not print the stats line")


def _prompt(args, model):
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    chat = args.chat if args.chat is not None else bool(model.chat_template)
    if not chat:
        return text
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return messages + [{"role": "user", "content": text}]


def run(args) -> int:
    """Stream an answer to a prompt."""
    from . import load
    from .sampling import validate
    from .stats import parse_size

    validate(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty,
             args.max_new_tokens)
    budget = parse_size(args.budget) if args.budget is not None else None
    model = load(args.bundle, backend=args.backend, threads=args.threads, context=args.context,
                 memory_budget=budget, kv_dtype=args.kv_dtype, verify=args.verify, overflow=args.overflow)
    stream = model.stream(_prompt(args, model), max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)
    for response in stream:
        sys.stdout.write(response.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        print(stream.stats.line(), file=sys.stderr)
    return 0


def _split_command(argv: list[str]) -> tuple[str, list[str]]:
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    return "run", argv


def main(argv: Sequence[str] | None = None) -> int:
    name, rest = _split_command(list(sys.argv[1:] if argv is None else argv))
    module = importlib.import_module(COMMANDS[name])
    others = ", ".join(f"edge-run {c} ..." for c in COMMANDS if c != "run")
    parser = argparse.ArgumentParser(
        prog="edge-run" if name == "run" else f"edge-run {name}",
        description=(module.run.__doc__ or "").strip(),
        epilog=f"other commands: {others}" if others else None)
    module.add_arguments(parser)
    args = parser.parse_intermixed_args(rest)
    try:
        return module.run(args)
    except EdgeError as e:
        print(f"edge-run: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): silence the flush at exit, as the Python docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
