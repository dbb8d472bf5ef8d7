"""Terminal chat on a phone (Termux): a multi-turn conversation with a bundle inside a device profile's memory.

    python android_demo/chat.py BUNDLE [--profile phone-3gb] [--backend auto|numpy|ort]

The conversation goes to stdout; the banner, the stats line after each answer and command output go to stderr.
Commands: /reset (forget the conversation), /stats, /budget, /quit; Ctrl-C stops the current answer and keeps
the app. When stdin is not a terminal, lines are read from it one by one (scripted use, e.g. the arm64 check).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

if __package__ in (None, ""):  # run as a script (python android_demo/chat.py): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edge_runtime
from android_demo.profiles import DEFAULT_PROFILE, PROFILES, Profile, describe, get_profile
from edge_runtime.cli.chat import read_lines
from edge_runtime.errors import ContextOverflowError, EdgeError, MemoryBudgetError
from edge_runtime.generation.stats import MB, GenerationStats, parse_size, peak_rss_bytes
from edge_runtime.threads import default_threads

PROG = "chat"
# SmolLM2's model card suggests a low temperature with nucleus sampling for chat.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9


def load_model(bundle: str, profile: Profile, backend: str, threads: int, context: int | None = None,
               budget: int | None = None, verify: bool = True) -> edge_runtime.Model:
    """Load `bundle` inside the profile's budget with its context, or the largest context that fits.

    Raises MemoryBudgetError (whose message is the planner's breakdown) when not even the smallest context
    fits. An explicit `context` is required as is (no fallback).
    """
    budget = profile.budget if budget is None else budget
    wanted = context if context is not None else min(profile.context, _max_context(bundle))
    opts = {"backend": backend, "threads": threads, "memory_budget": budget, "verify": verify}
    try:
        return edge_runtime.load(bundle, context=wanted, **opts)
    except MemoryBudgetError:
        if context is not None:
            raise
    return edge_runtime.load(bundle, context=None, **opts)  # the planner's largest context that fits


def _max_context(bundle: str) -> int:
    from edge_runtime.format.bundle import Bundle

    return Bundle.open(bundle, verify=False).max_context


@dataclass
class Settings:
    max_new_tokens: int = 256
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    repetition_penalty: float = 1.0
    seed: int | None = None
    print_ids: bool = False


@dataclass
class Totals:
    turns: int = 0
    new_tokens: int = 0
    decode_s: float = 0.0
    interrupted: int = 0
    last: GenerationStats | None = None


@dataclass
class ChatSession:
    """The conversation, an edge_runtime Session (its KV cache kept between turns, so a turn prefills only
    what is new), and its bookkeeping."""

    model: edge_runtime.Model
    profile: Profile
    budget: int
    settings: Settings = field(default_factory=Settings)
    system: str | None = None
    totals: Totals = field(default_factory=Totals)
    session: edge_runtime.Session | None = None

    def __post_init__(self) -> None:
        if self.session is None:
            self.session = self.model.session(self.system)

    @property
    def messages(self) -> list:
        return self.session.messages

    def reset(self) -> None:
        self.session.reset()

    def head(self) -> list:
        return self.session.head()

    def fit(self, messages: list) -> tuple[list, int]:
        """Drop the oldest exchanges until prompt + answer fit the context; (messages, exchanges dropped)."""
        dropped = 0
        while True:
            n = len(self.model.encode_prompt(self.head() + messages))
            if n + self.settings.max_new_tokens - 1 <= self.model.context:
                return messages, dropped
            if len(messages) <= 1:
                raise ContextOverflowError(
                    f"this message is {n} tokens; with {self.settings.max_new_tokens} new tokens it needs more "
                    f"than the context of {self.model.context} (shorten it or lower --max-new-tokens)")
            messages, dropped = messages[2:], dropped + 1

    def ask(self, text: str, out: TextIO, info: TextIO) -> edge_runtime.ResponseStream | None:
        """Stream the answer to `text` onto `out`; returns the stream (None if the message did not fit)."""
        try:
            messages, dropped = self.fit(self.messages + [{"role": "user", "content": text}])
        except ContextOverflowError as e:
            print(f"[{e}]", file=info)
            return None
        if dropped:
            print(f"[forgot the {dropped} oldest exchange(s) to fit the context of {self.model.context}]",
                  file=info)
            self.session.messages = messages[:-1]
        s = self.settings
        seed = None if s.seed is None else s.seed + self.totals.turns  # reproducible, yet new each turn
        out.write("bot> ")
        out.flush()
        stream = None
        interrupted = False
        try:
            stream = self.session.stream(text, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                         top_p=s.top_p, seed=seed, repetition_penalty=s.repetition_penalty)
            for response in stream:
                out.write(response.text)
                out.flush()
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # no more forward passes; the partial answer joins the conversation
                interrupted = True
        out.write("\n")
        self._record(stream, interrupted, out, info)
        return stream

    def _record(self, stream, interrupted: bool, out: TextIO, info: TextIO) -> None:
        if stream is None or not (stream.text or stream.token_ids):
            print("[stopped before the first token: message not kept]", file=info)
            return
        finish = "interrupted" if interrupted else stream.finish_reason
        t = self.totals
        t.turns, t.last = t.turns + 1, stream.stats
        t.new_tokens += stream.stats.new_tokens
        t.decode_s += stream.stats.decode_s
        t.interrupted += interrupted
        if self.settings.print_ids:
            print("ids: " + " ".join(str(i) for i in stream.token_ids), file=out)
        out.flush()
        print(self.stats_line(stream.stats, finish), file=info)

    def stats_line(self, st: GenerationStats, finish: str | None) -> str:
        rate = st.decode_tps
        speed = f"{rate:.1f} tok/s" if rate is not None else "- tok/s"
        prefill = f"{st.prefill_tps:.0f} tok/s" if st.prefill_tps else "-"
        used = st.peak_rss_mb / (self.budget / MB)
        return (f"[{st.new_tokens} tok ({finish}), {speed} | prompt {st.prompt_tokens} tok "
                f"({st.cached_tokens} cached) at {prefill} | "
                f"peak {st.peak_rss_mb:.0f} MB of {self.budget / MB:.0f} MB budget ({used:.0%})]")


def show_stats(session: ChatSession, info: TextIO) -> None:
    t, m = session.totals, session.model
    history = len(m.encode_prompt(session.head() + session.messages)) if session.messages else 0
    rate = f"{(t.new_tokens - t.turns) / t.decode_s:.1f} tok/s" if t.decode_s > 0 else "-"
    print(f"[session: {t.turns} answers ({t.interrupted} interrupted), {t.new_tokens} tokens, decode {rate}; "
          f"history {len(session.messages)} messages = {history} of {m.context} context tokens]", file=info)
    if t.last is not None:
        print(f"[last answer: {t.last.line()}]", file=info)
    print(f"[peak RSS {peak_rss_bytes() / MB:.1f} MB, budget {session.budget / MB:.0f} MB]", file=info)


def show_budget(session: ChatSession, info: TextIO) -> None:
    """The planner's breakdown for this session next to what the process has actually used."""
    from edge_runtime.memory import budget

    m, p = session.model, session.profile
    plan = budget.plan_session(m.bundle, m.context, backend=m.backend.name,
                               kv_dtype=getattr(m.backend, "kv_dtype", None), prefill_chunk=m.prefill_chunk,
                               threads=getattr(m.backend, "threads", 1), budget=session.budget)
    print(f"[profile {describe(p)}]", file=info)
    print(f"[context {m.context} (profile wants {p.context}, bundle allows {m.bundle.max_context}); "
          f"KV cache allocated {m.backend.kv_nbytes() / MB:.1f} MB; planned peak:]", file=info)
    print(plan.table(), file=info)
    peak = peak_rss_bytes()
    print(f"[measured peak RSS so far {peak / MB:.1f} MB = {peak / session.budget:.0%} of the budget]", file=info)


def reset(session: ChatSession, info: TextIO) -> None:
    session.reset()
    print("[conversation cleared]", file=info)


COMMANDS: dict[str, Callable[[ChatSession, TextIO], None]] = {
    "/reset": reset,
    "/stats": show_stats,
    "/budget": show_budget,
}
HELP = "commands: /reset /stats /budget /quit; Ctrl-C stops an answer, Ctrl-D or /quit leaves"


def run_loop(session: ChatSession, lines: Iterator[str], out: TextIO, info: TextIO) -> int:
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text.startswith("/"):
            command = COMMANDS.get(text.split()[0])
            if command is None:
                print(f"[unknown command {text.split()[0]}; {HELP}]", file=info)
            else:
                command(session, info)
            continue
        session.ask(text, out, info)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="bundle folder (made by edge-export)")
    ap.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES),
                    help=f"device profile: memory budget and context (default {DEFAULT_PROFILE})")
    ap.add_argument("--budget", metavar="SIZE", help="override the profile's memory budget, e.g. 300MB")
    ap.add_argument("--context", type=int, metavar="N", help="override the profile's context (tokens)")
    ap.add_argument("--backend", default="auto", choices=("auto", "numpy", "ort"),
                    help="auto: ONNX Runtime if it imports, else NumPy")
    ap.add_argument("--threads", type=int, metavar="N", help="default: the profile's, at most the cores here")
    ap.add_argument("--system", help="system message")
    ap.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="always the most likely token (temperature 0)")
    mode.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    ap.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--print-ids", action="store_true", help="print each answer's token ids (ids: ...)")
    ap.add_argument("--no-verify", dest="verify", action="store_false", help="skip the bundle checksum pass")
    return ap


def make_session(args) -> ChatSession:
    from edge_runtime.generation.sampling import validate

    profile = get_profile(args.profile)
    temperature = 0.0 if args.greedy else args.temperature
    validate(temperature, 0, args.top_p, 0.0, args.repetition_penalty, args.max_new_tokens)
    budget = parse_size(args.budget) if args.budget is not None else profile.budget
    threads = args.threads or min(profile.threads, default_threads())
    model = load_model(args.bundle, profile, args.backend, threads, args.context, budget,
                       args.verify)
    settings = Settings(args.max_new_tokens, temperature, args.top_p, args.repetition_penalty, args.seed,
                        args.print_ids)
    return ChatSession(model, profile, budget, settings, system=args.system)


def refusal(args, e: MemoryBudgetError) -> str:
    """One message: which profile refused the bundle, the planner's verdict and its table."""
    table = f"\n{e.plan.table()}" if e.plan is not None else ""
    return f"{PROG}: {args.bundle} does not fit device profile {args.profile}: {e}{table}"


def banner(session: ChatSession) -> str:
    m = session.model
    cfg = m.bundle.manifest
    quant = (cfg.get("quantization") or {}).get("preset", "?")
    return (f"[{Path(m.bundle.root).name} ({cfg.get('architecture')}, {quant}) | profile {session.profile.name}, "
            f"budget {session.budget / MB:.0f} MB, context {m.context} | backend {m.backend.name}, "
            f"tokenizer {m.tokenizer.kind} | loaded in {m.load_s:.2f} s]\n[{HELP}]")


def main(argv=None, stdin: TextIO | None = None, out: TextIO | None = None,
         info: TextIO | None = None) -> int:
    stdin, out, info = stdin or sys.stdin, out or sys.stdout, info or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        session = make_session(args)
    except MemoryBudgetError as e:
        print(refusal(args, e), file=info)
        return e.exit_code
    except EdgeError as e:
        print(f"{PROG}: error: {e}", file=info)
        return e.exit_code
    print(banner(session), file=info)
    try:
        return run_loop(session, read_lines(stdin, out, echo=True), out, info)
    except EdgeError as e:
        print(f"{PROG}: error: {e}", file=info)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
