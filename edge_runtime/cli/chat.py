"""`edge-run chat BUNDLE`: an interactive conversation over a Session (the KV cache kept between turns).

Commands: /reset, /save FILE, /load FILE, /stats, /help; Ctrl-C stops an answer, Ctrl-D (or /quit) leaves.
Answers go to stdout; the stats line after each answer, command output and errors to stderr. When stdin is not
a terminal its lines are read one by one (scripted use).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from ..errors import EdgeError

HELP = "commands: /reset /save FILE /load FILE /stats /help /quit; Ctrl-C stops an answer, Ctrl-D leaves"


def configure(p: argparse.ArgumentParser) -> None:
    from ..generation.generate import OVERFLOW_POLICIES
    from .run import add_runtime_arguments, add_sampling_arguments

    p.add_argument("bundle", help="bundle folder (made by edge-export)")
    p.add_argument("--system", help="system message")
    p.add_argument("--load", metavar="FILE", help="continue a session saved with /save")
    add_sampling_arguments(p)
    r = add_runtime_arguments(p, "200MB (context chosen to fit)")
    r.add_argument("--overflow", choices=OVERFLOW_POLICIES, default="slide",
                   help="when the conversation outgrows the context (default: slide, dropping the oldest turns)")
    r.add_argument("--no-stats", dest="stats", action="store_false", help="no stats line after each answer")

def read_lines(stdin=None, out=None, echo: bool = False) -> Iterator[str]:
    """The user's lines: typed at a prompt (with line editing), or read from a script, then written to `out` after
    the prompt when `echo` (so a scripted transcript reads like a typed one)."""
    stdin, out = stdin or sys.stdin, out or sys.stderr
    if not stdin.isatty():
        for line in stdin:
            line = line.rstrip("\r\n")
            if echo:
                out.write(f"you> {line}\n")
            yield line
        return
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    while True:
        try:
            yield input("you> ")
        except KeyboardInterrupt:  # at the prompt, Ctrl-C only clears the line
            out.write("\n")
        except EOFError:
            out.write("\n")
            return


def answer(session, text: str, args) -> None:
    stream = session.stream(text, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed)
    try:
        for response in stream:
            sys.stdout.write(response.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()  # the partial answer stays in the conversation
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        print(f"[{stream.finish_reason or 'interrupted'}] {stream.stats.line()}", file=sys.stderr)


def command(session, line: str):
    """Run a /command; returns the session to continue with (a /load replaces it)."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name == "/reset":
        session.reset()
        print("[conversation cleared]", file=sys.stderr)
    elif name in ("/save", "/load") and not arg:
        print(f"[{name} needs a file name]", file=sys.stderr)
    elif name == "/save":
        print(f"[saved {len(session.cached_ids)} cached tokens to {session.save(arg)}]", file=sys.stderr)
    elif name == "/load":
        session = session.model.load_session(arg)
        print(f"[loaded {len(session.messages)} messages, {len(session.cached_ids)} cached tokens]",
              file=sys.stderr)
    elif name == "/stats":
        m = session.model
        print(f"[{len(session.messages)} messages; the cache holds {len(m._cache.ids)} of {m.context} tokens; "
              f"KV cache {m.backend.kv_nbytes() / 2**20:.1f} MB]", file=sys.stderr)
    else:
        print(f"[{HELP}]", file=sys.stderr)
    return session


def run(args) -> int:
    """Chat with a bundle in the terminal; the conversation keeps its KV cache between turns."""
    from .run import load_model, utf8_argument

    model = load_model(args)

    system = utf8_argument(args.system, "--system") if args.system else None
    session = model.load_session(args.load) if args.load else model.session(system=system)
    print(f"[{model.bundle.root.name}: {model._describe()}]\n[{HELP}]", file=sys.stderr)
    for line in read_lines():
        text = line.strip()
        if text in ("/quit", "/exit"):
            break
        if not text:
            continue
        try:
            if text.startswith("/"):
                session = command(session, text)
            else:
                answer(session, text, args)
        except EdgeError as e:  # a bad turn or file: say so and keep the conversation
            print(f"edge-run chat: error: {e}", file=sys.stderr)
    return 0
