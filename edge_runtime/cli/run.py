"""`edge-run run BUNDLE [PROMPT]` (or `edge-run BUNDLE [PROMPT]`): stream an answer to a prompt."""
from __future__ import annotations

import argparse
import sys

from ..errors import EdgeError


def configure(p: argparse.ArgumentParser) -> None:
    from ..generation.generate import OVERFLOW_POLICIES

    p.add_argument("bundle", help="bundle folder (made by edge-export)")
    p.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' or omitted reads standard input")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="send the prompt as a user message through the chat template "
                           "(default if the bundle has one)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="feed the prompt as plain text")
    p.add_argument("--system", help="system message (chat mode)")
    s = add_sampling_arguments(p)
    s.add_argument("--stop", nargs="+", action="extend", default=[], metavar="S",
                   help="stop strings (not printed)")
    r = add_runtime_arguments(p, "200MB (context chosen to fit)")
    r.add_argument("--overflow", choices=OVERFLOW_POLICIES, default="error",
                   help="when prompt + answer exceed the context (default: error)")
    r.add_argument("--no-stats", dest="stats", action="store_false", help="do not print the stats line")


def add_sampling_arguments(p: argparse.ArgumentParser):
    """The sampling group shared by run and chat (load_model checks the values); returns the group."""
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, default=0, help="0 = off")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int, help="random seed of sampling (an integer >= 0)")
    return s


def add_runtime_arguments(p: argparse.ArgumentParser, budget_example: str):
    """The runtime group shared by run, chat and serve (what load() takes); returns the group."""
    from .. import backends

    r = p.add_argument_group("runtime")
    r.add_argument("--backend", default="auto", choices=backends.choices())
    r.add_argument("--threads", type=int, metavar="N", help="compute threads (at most the CPUs available)")
    r.add_argument("--context", type=int, metavar="N", help="KV-cache size in tokens")
    r.add_argument("--budget", metavar="SIZE", help=f"memory budget, e.g. {budget_example}")
    r.add_argument("--kv-dtype", choices=("float32", "float16"),
                   help="KV-cache precision (default: the bundle's default graph, or the memory plan's choice)")
    r.add_argument("--no-verify", dest="verify", action="store_false", help="skip the checksum pass")
    return r


def read_prompt(arg: str) -> str:
    """The prompt text: the argument, or standard input for '-'; EdgeError unless it is valid UTF-8."""
    if arg == "-":
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EdgeError(f"standard input is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})"
                            ) from None
    return utf8_argument(arg, "the prompt argument")


def utf8_argument(text: str, what: str) -> str:
    """`text` itself; EdgeError if it came from argv bytes that are not UTF-8 (they arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EdgeError(f"{what} is not UTF-8 text (character {e.start})") from None
    return text


def _prompt(args, model):
    text = read_prompt(args.prompt)
    chat = args.chat if args.chat is not None else bool(model.chat_template)
    if not chat:
        return text
    system = utf8_argument(args.system, "--system") if args.system else None
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": text}]


def load_model(args):
    """The Model the generation options ask for, after checking the sampling arguments (before the load)."""
    from .. import load
    from ..generation.sampling import validate
    from ..generation.stats import parse_size

    validate(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty,
             args.max_new_tokens)
    budget = parse_size(args.budget) if args.budget is not None else None
    return load(args.bundle, backend=args.backend, threads=args.threads, context=args.context,
                memory_budget=budget, kv_dtype=args.kv_dtype, verify=args.verify, overflow=args.overflow)


def run(args) -> int:
    """Stream an answer to a prompt."""
    model = load_model(args)
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
