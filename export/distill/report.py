"""Teacher vs student on held-out domains and chat prompts: perplexity, KL divergence to the teacher, top-1.

Each evaluation domain (domains.EVAL_DOMAINS, sources the student never trained on) is scored on its own; both
models see the very same token windows. On the evaluation chat prompts the teacher answers greedily and the
student is scored on that answer (teacher-forced top-1 and KLD) and on its own greedy answer (the tokens it
reproduces before the first difference). The metrics are edge_runtime.quality.fidelity's, so the figures are the
ones the exporter reports.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from edge_runtime.quality import fidelity
from edge_runtime.sessions.state import common_prefix

from .data import pack
from .domains import EVAL_CHAT_PROMPTS, EVAL_DOMAINS

EVAL_WINDOW = 256
CHAT_TOKENS = 48  # greedy answer length compared on each evaluation chat prompt
TARGET_PPL_RATIO, TARGET_TOP1 = 1.5, 0.70  # the acceptance bar of the distillation demo, per domain


def nll_sum(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed next-token NLL of ids [T] under logits [T, V] (T - 1 predictions)."""
    return float(np.log(fidelity.perplexity(logits[:-1], ids[1:])) * (len(ids) - 1))


def domain_windows(tokenizer, eos_id: int | None, window: int = EVAL_WINDOW,
                   max_windows: int | None = None) -> dict[str, np.ndarray]:
    """{domain name: [n, window] int32 token windows} of every evaluation domain (never trained on).

    With max_windows, the windows are spread evenly over the domain rather than taken from its start.
    """
    out = {}
    for d in EVAL_DOMAINS:
        rows = pack(d.load(), tokenizer, window, eos_id)
        if max_windows is not None and len(rows) > max_windows:
            rows = rows[np.linspace(0, len(rows) - 1, max_windows).round().astype(int)]
        out[d.name] = rows
    return out


def heldout_windows(tokenizer, eos_id: int | None, window: int = EVAL_WINDOW, max_windows: int | None = None):
    """[n, window] windows of the first evaluation domain."""
    return domain_windows(tokenizer, eos_id, window, max_windows)[EVAL_DOMAINS[0].name]


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _logits(model, ids: np.ndarray) -> np.ndarray:
    return model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], use_cache=False).logits[0].float().numpy()


@torch.no_grad()
def compare(teacher, student, windows: np.ndarray, desc: str | None = None) -> dict:
    """Held-out figures for teacher and student over the same windows [n, T] (or a list of 1-D id arrays);
    with `desc`, a progress bar of that name."""
    t0 = time.perf_counter()
    nll_t = nll_s = 0.0
    kld = top1 = 0.0
    count = 0
    for ids in tqdm(windows, desc=desc, unit="window", disable=desc is None):
        lt, ls = _logits(teacher, ids), _logits(student, ids)  # [T, V] each
        nll_t += nll_sum(lt, ids)
        nll_s += nll_sum(ls, ids)
        kld += fidelity.kl_divergence(lt, ls) * len(ids)
        top1 += fidelity.top1_agreement(lt, ls) * len(ids)
        count += len(ids)
    preds = count - len(windows)  # next-token predictions scored for perplexity
    ppl_t, ppl_s = float(np.exp(nll_t / preds)), float(np.exp(nll_s / preds))
    return {
        "teacher_params": n_params(teacher), "student_params": n_params(student),
        "teacher_layers": teacher.config.num_hidden_layers, "student_layers": student.config.num_hidden_layers,
        "teacher_mlp": teacher.config.intermediate_size, "student_mlp": student.config.intermediate_size,
        "eval_windows": len(windows), "eval_window": int(len(windows[0])), "eval_tokens": int(count),
        "teacher_ppl": ppl_t, "student_ppl": ppl_s, "ppl_ratio": ppl_s / ppl_t,
        "kld": kld / count, "top1": top1 / count,
        "seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def greedy(model, ids: list[int], new_tokens: int, eos_ids) -> list[int]:
    """The model's greedy continuation of ids, stopped after an end-of-sequence token."""
    x = torch.tensor([ids])  # [1, T]
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                         eos_token_id=list(eos_ids) or None, pad_token_id=(list(eos_ids) or [0])[0])
    return out[0, len(ids):].tolist()


@torch.no_grad()
def chat_eval(teacher, student, tokenizer, meta: dict, new_tokens: int = CHAT_TOKENS) -> dict | None:
    """Greedy agreement on the evaluation chat prompts (None when the teacher has no chat template).

    top1 / kld: the student teacher-forced on the teacher's greedy answers (answer positions only);
    greedy_match: mean fraction of the teacher's answer the student's own greedy answer reproduces before the
    first different token; identical: answers equal token for token; student_silent: answers that end at once.
    """
    from ..sources import render_chat

    if not meta.get("chat_template"):
        return None
    eos = meta.get("eos_token_ids") or []
    kld = top1 = count = match = identical = silent = 0.0
    for question in EVAL_CHAT_PROMPTS:
        prompt = tokenizer.encode(render_chat(meta, question), add_special_tokens=False).ids
        answer_t = greedy(teacher, prompt, new_tokens, eos)
        answer_s = greedy(student, prompt, new_tokens, eos)
        ids = np.asarray(prompt + answer_t)
        span = slice(len(prompt) - 1, len(ids) - 1)  # positions predicting the answer tokens
        lt, ls = _logits(teacher, ids)[span], _logits(student, ids)[span]
        kld += fidelity.kl_divergence(lt, ls) * len(answer_t)
        top1 += fidelity.top1_agreement(lt, ls) * len(answer_t)
        count += len(answer_t)
        match += common_prefix(answer_t, answer_s) / max(len(answer_t), 1)
        identical += answer_t == answer_s
        silent += bool(answer_s) and answer_s[0] in eos
    n = len(EVAL_CHAT_PROMPTS)
    return {"prompts": n, "answer_tokens": int(count), "top1": top1 / count, "kld": kld / count,
            "greedy_match": match / n, "identical": int(identical), "student_silent": int(silent)}


def evaluate(teacher, student, tokenizer, meta: dict, *, window: int = EVAL_WINDOW,
             max_windows: int | None = None) -> dict:
    """compare() on every evaluation domain plus chat_eval(): the distillation report as a dict."""
    eos = (meta.get("eos_token_ids") or [None])[0]
    domains = {name: compare(teacher, student, rows, desc=f"scoring {name}")
               for name, rows in domain_windows(tokenizer, eos, window, max_windows).items()}
    first = next(iter(domains.values()))
    models = {k: first[k] for k in first if k.startswith(("teacher_", "student_")) and not k.endswith("_ppl")}
    return {**models, "domains": domains, "chat": chat_eval(teacher, student, tokenizer, meta)}


def meets_bar(d: dict) -> bool:
    """Whether one compare() result meets the demo's bar (PPL ratio and top-1 agreement)."""
    return d["ppl_ratio"] <= TARGET_PPL_RATIO and d["top1"] >= TARGET_TOP1


def passes(r: dict) -> bool:
    """Whether every evaluation domain meets the demo's bar."""
    return all(meets_bar(d) for d in r["domains"].values())


def format_report(r: dict) -> str:
    lines = [
        f"{'':18}{'teacher':>14}{'student':>14}",
        f"{'parameters':18}{r['teacher_params']:>14,}{r['student_params']:>14,}",
        f"{'layers':18}{r['teacher_layers']:>14}{r['student_layers']:>14}",
        f"{'mlp width':18}{r['teacher_mlp']:>14}{r['student_mlp']:>14}",
        "",
        "| held-out domain | tokens | teacher PPL | student PPL | PPL ratio | KLD | top-1 | bar |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in r["domains"].items():
        ok = meets_bar(d)
        lines.append(f"| {name} | {d['eval_tokens']} | {d['teacher_ppl']:.2f} | {d['student_ppl']:.2f} | "
                     f"{d['ppl_ratio']:.2f} | {d['kld']:.3f} | {d['top1']:.1%} | {'met' if ok else 'GAP'} |")
    c = r.get("chat")
    if c:
        lines += ["", (f"chat ({c['prompts']} held-out prompts, teacher's greedy answers, "
                       f"{c['answer_tokens']} tokens): "
                       f"top-1 {c['top1']:.1%}, KLD {c['kld']:.3f}; student's own greedy answer reproduces "
                       f"{c['greedy_match']:.0%} of the teacher's before differing, {c['identical']} identical, "
                       f"{c['student_silent']} empty")]
    lines.append(f"bar: PPL ratio <= {TARGET_PPL_RATIO} and top-1 >= {TARGET_TOP1:.0%} on every domain: "
                 f"{'met' if passes(r) else 'not met'}")
    return "\n".join(lines)
