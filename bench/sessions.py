"""Chat sessions against re-prefilling, on SmolLM2 int4: a 6-turn conversation, each backend in a fresh process.

    .venv/bin/python bench/sessions.py                      # both backends, the int4 bundle (exported if needed)
    .venv/bin/python bench/sessions.py --backends ort --bundle PATH --new-tokens 32
    .venv/bin/python bench/sessions.py --exact              # the exact graph (float32 activations)
    .venv/bin/python bench/sessions.py --reuse-decoded      # faster turns, replies equal only to rounding

Per backend: the conversation once through a Session (the KV cache kept between turns) and once re-prefilled
from scratch every turn (model.clear_cache(), then generate(all messages)); greedy replies must be identical
turn by turn. Reported: time to first token of each turn both ways and turn 6's ratio (the acceptance bar is
<= 0.25), tokens reused, peak RSS against the memory plan of the loaded context, and whether a session saved
before turn 6 and loaded back (Model.load_session) answers turn 6 identically. Exit code 1 if a check fails.
A bundle without a chat template (a base model, as Gemma 3 270M) holds the conversation as raw text instead:
each turn's prompt is the last prompt, its reply and the next question, reused as a prefix by Model.generate
(no session file then).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = ROOT / "cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a helpful assistant. Answer in a few sentences."
TURNS = [
    "What is a small language model?",
    "Why would someone run one on a phone instead of in the cloud?",
    "What limits how long a conversation can be on a phone?",
    "How does a KV cache speed up text generation?",
    "Give me one tip to make answers come faster.",
    "Summarize our conversation in one sentence.",
]
TTFT_BAR = 0.25


def load_exact(bundle: str, backend: str, threads: int):
    """The model on the bundle's exact graph (float32 activations and KV; NumPy computes the same)."""
    from edge_runtime import backends
    from edge_runtime.format.bundle import Bundle
    from edge_runtime.model import DEFAULT_CONTEXT, Model
    from edge_runtime.tokenizer.tokenizer import Tokenizer

    b = Bundle.open(bundle)
    engine = backends.make_backend(backend, b, min(b.max_context, DEFAULT_CONTEXT), threads, float_activations=True)
    return Model(b, Tokenizer.from_bundle(b), engine)


def one(bundle: str, backend: str, threads: int, new_tokens: int, exact: bool = False,
        reuse_decoded: bool = False) -> dict:
    """The whole comparison for one backend in this process; a JSON-ready dict."""
    import edge_runtime

    model = load_exact(bundle, backend, threads) if exact else edge_runtime.load(bundle, backend=backend,
                                                                                  threads=threads)
    model.reuse_decoded = reuse_decoded
    if not model.chat_template:
        return raw_text(model, backend, threads, new_tokens)
    session = model.session(system=SYSTEM)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "chat.session"
        for i, q in enumerate(TURNS):
            if i == len(TURNS) - 1:
                session.save(saved)
            g = session.generate(q, max_new_tokens=new_tokens)
            rows.append({"session_ttft": g.stats.prefill_s, "session_ids": g.token_ids,
                         "prompt": g.stats.prompt_tokens, "cached": g.stats.cached_tokens})
        messages = [{"role": "system", "content": SYSTEM}]
        for row, q in zip(rows, TURNS):
            messages.append({"role": "user", "content": q})
            model.clear_cache()
            g = model.generate(messages, max_new_tokens=new_tokens)
            messages.append({"role": "assistant", "content": g.text})
            row.update(reprefill_ttft=g.stats.prefill_s, reprefill_ids=g.token_ids)
        restored = model.load_session(saved)
        again = restored.generate(TURNS[-1], max_new_tokens=new_tokens)
    label = backend + (" exact graph" if exact else "") + (", decoded keys/values reused" if reuse_decoded else "")
    return {"backend": label, "context": model.context, "rows": rows,
            "restored_same": again.token_ids == rows[-1]["session_ids"],
            "restored_cached": again.stats.cached_tokens, **peak_and_plan(model, threads)}


def raw_text(model, backend: str, threads: int, new_tokens: int) -> dict:
    """one() for a bundle without a chat template: the conversation as one growing raw text."""
    rows, prompts, text = [], [], SYSTEM
    for q in TURNS:
        text += "\n\n" + q + "\n"
        g = model.generate(text, max_new_tokens=new_tokens)
        prompts.append(text)
        rows.append({"session_ttft": g.stats.prefill_s, "session_ids": g.token_ids,
                     "prompt": g.stats.prompt_tokens, "cached": g.stats.cached_tokens})
        text += g.text
    for row, prompt in zip(rows, prompts):
        model.clear_cache()
        g = model.generate(prompt, max_new_tokens=new_tokens)
        row.update(reprefill_ttft=g.stats.prefill_s, reprefill_ids=g.token_ids)
    return {"backend": backend + ", raw text (no chat template)", "context": model.context, "rows": rows,
            "restored_same": None, "restored_cached": 0, **peak_and_plan(model, threads)}


def peak_and_plan(model, threads: int) -> dict:
    """This process's peak RSS and the memory plan of the model as loaded, in MB."""
    from edge_runtime.generation.stats import MB, peak_rss_bytes
    from edge_runtime.memory import budget

    plan = budget.plan_session(model.bundle, model.context, backend=model.backend.name,
                               kv_dtype=model.backend.kv_dtype, prefill_chunk=model.prefill_chunk,
                               threads=threads)
    return {"peak_mb": peak_rss_bytes() / MB, "plan_mb": plan.total / MB}


def report(r: dict) -> bool:
    print(f"\n## {r['backend']} (context {r['context']})\n")
    print("| turn | prompt tok | cached tok | TTFT session ms | TTFT re-prefill ms | ratio | same greedy reply |")
    print("|---|---|---|---|---|---|---|")
    same_all = True
    for i, row in enumerate(r["rows"], 1):
        same = row["session_ids"] == row["reprefill_ids"]
        same_all &= same
        ratio = row["session_ttft"] / row["reprefill_ttft"]
        print(f"| {i} | {row['prompt']} | {row['cached']} | {row['session_ttft'] * 1e3:.1f} | "
              f"{row['reprefill_ttft'] * 1e3:.1f} | {ratio:.2f} | {'yes' if same else 'NO'} |")
    last = r["rows"][-1]
    ratio = last["session_ttft"] / last["reprefill_ttft"]
    within = r["peak_mb"] <= r["plan_mb"]
    print(f"\nturn 6 TTFT ratio (session / re-prefill): {ratio:.3f} (bar {TTFT_BAR}) "
          f"{'ok' if ratio <= TTFT_BAR else 'FAIL'}")
    print(f"greedy replies identical on all turns: {'yes' if same_all else 'NO'}")
    print(f"peak RSS {r['peak_mb']:.1f} MB vs plan {r['plan_mb']:.1f} MB: {'within' if within else 'OVER'}")
    if r["restored_same"] is not None:
        print(f"save before turn 6, load_session, turn 6: {'identical' if r['restored_same'] else 'DIFFERENT'} "
              f"({r['restored_cached']} tokens from the file's cache)")
    return ratio <= TTFT_BAR and same_all and within and r["restored_same"] is not False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="default: bundles/smollm2-int4 (exported if needed)")
    ap.add_argument("--backends", default="ort,numpy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--exact", action="store_true",
                    help="run the exact graph (float32 activations) instead of the default one")
    ap.add_argument("--reuse-decoded", action="store_true",
                    help="also reuse the keys/values written while decoding (Model.reuse_decoded)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one backend, print JSON
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.bundle, args.one, args.threads, args.new_tokens, args.exact,
                             args.reuse_decoded)))
        return 0
    bundle = args.bundle
    if bundle is None:
        from export.version import ensure_bundle

        bundle = str(ensure_bundle(str(MODEL), ROOT / "bundles/smollm2-int4", "--quant", "int4"))
    print(f"# Sessions vs re-prefill: {len(TURNS)} turns, {args.new_tokens} new tokens each, greedy, "
          f"{args.threads} threads, {bundle}")
    ok = True
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--one", backend, "--bundle", bundle, "--threads", str(args.threads),
               "--new-tokens", str(args.new_tokens)] + (["--exact"] if args.exact else []) \
            + (["--reuse-decoded"] if args.reuse_decoded else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        ok &= report(json.loads(out.strip().splitlines()[-1]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
