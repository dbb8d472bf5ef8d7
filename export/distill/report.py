"""Teacher vs student on held-out text: parameters, perplexity, KL divergence to the teacher, top-1 agreement.

Both models see the very same token windows. The metrics come from edge_runtime.fidelity when it provides them
(so the figures match what the exporter reports), else from the NumPy functions below.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .data import pack, pydoc_split

EVAL_WINDOW = 256


def _metrics():
    """(kl_divergence, top1_agreement, nll_sum) over logits [T, V], from edge_runtime.fidelity when present."""
    try:
        from edge_runtime import fidelity
    except ImportError:
        return kl_divergence, top1_agreement, nll_sum, "export.distill.report"

    def fidelity_nll_sum(logits: np.ndarray, ids: np.ndarray) -> float:
        return float(np.log(fidelity.perplexity(logits[:-1], ids[1:])) * (len(ids) - 1))

    return fidelity.kl_divergence, fidelity.top1_agreement, fidelity_nll_sum, "edge_runtime.fidelity"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(ref || model), logits [T, V]."""
    p = log_softmax(ref_logits.astype(np.float64))
    q = log_softmax(logits.astype(np.float64))
    return float((np.exp(p) * (p - q)).sum(axis=-1).mean())


def top1_agreement(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Fraction of positions where both argmax tokens agree, logits [T, V]."""
    return float((ref_logits.argmax(-1) == logits.argmax(-1)).mean())


def nll_sum(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed next-token NLL of ids [T] under logits [T, V] (T - 1 predictions)."""
    lp = log_softmax(logits[:-1].astype(np.float64))
    return float(-lp[np.arange(len(ids) - 1), ids[1:]].sum())


def heldout_windows(tokenizer, eos_id: int | None, window: int = EVAL_WINDOW, max_windows: int | None = None):
    """[n, window] int32 token windows of the held-out pydoc text (never trained on)."""
    _, heldout = pydoc_split()
    rows = pack(heldout, tokenizer, window, eos_id)
    return rows if max_windows is None else rows[:max_windows]


def n_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _logits(model, ids: np.ndarray) -> np.ndarray:
    return model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], use_cache=False).logits[0].float().numpy()


@torch.no_grad()
def compare(teacher, student, windows: np.ndarray) -> dict:
    """Held-out figures for teacher and student over the same windows [n, T]."""
    kld_fn, top1_fn, nll_fn, metric_source = _metrics()
    t0 = time.perf_counter()
    nll_t = nll_s = 0.0
    kld = top1 = 0.0
    count = 0
    for ids in windows:
        lt, ls = _logits(teacher, ids), _logits(student, ids)  # [T, V] each
        nll_t += nll_fn(lt, ids)
        nll_s += nll_fn(ls, ids)
        kld += kld_fn(lt, ls) * len(ids)
        top1 += top1_fn(lt, ls) * len(ids)
        count += len(ids)
    preds = count - len(windows)  # next-token predictions scored for perplexity
    ppl_t, ppl_s = float(np.exp(nll_t / preds)), float(np.exp(nll_s / preds))
    return {
        "teacher_params": n_params(teacher), "student_params": n_params(student),
        "teacher_layers": teacher.config.num_hidden_layers, "student_layers": student.config.num_hidden_layers,
        "teacher_mlp": teacher.config.intermediate_size, "student_mlp": student.config.intermediate_size,
        "eval_windows": len(windows), "eval_window": int(windows.shape[1]), "eval_tokens": int(count),
        "teacher_ppl": ppl_t, "student_ppl": ppl_s, "ppl_ratio": ppl_s / ppl_t,
        "kld": kld / count, "top1": top1 / count,
        "metrics": metric_source, "seconds": time.perf_counter() - t0,
    }


def format_report(r: dict) -> str:
    lines = [
        f"{'':18}{'teacher':>14}{'student':>14}",
        f"{'parameters':18}{r['teacher_params']:>14,}{r['student_params']:>14,}",
        f"{'layers':18}{r['teacher_layers']:>14}{r['student_layers']:>14}",
        f"{'mlp width':18}{r['teacher_mlp']:>14}{r['student_mlp']:>14}",
        f"{'held-out PPL':18}{r['teacher_ppl']:>14.2f}{r['student_ppl']:>14.2f}   (x{r['ppl_ratio']:.2f})",
        (f"KLD to teacher {r['kld']:.4f} nats/token, top-1 agreement {r['top1']:.1%} "
         f"({r['eval_windows']} x {r['eval_window']} held-out tokens; metrics: {r['metrics']})"),
    ]
    return "\n".join(lines)
