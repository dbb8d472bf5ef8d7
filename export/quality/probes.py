"""The float model's reference outputs stored in every bundle (reference.json), for `edge-run verify`."""
from __future__ import annotations

import numpy as np

# Chat prompts whose greedy continuations are stored; short so that verify runs in seconds on a phone.
REFERENCE_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU does.",
)
GREEDY_TOKENS = 32
PROBE_TOKENS = 128
TOP_K = 20


def probe_text() -> str:
    """A fixed held-out English window (CPython's pydoc topics ship with every interpreter)."""
    from pydoc_data.topics import topics

    return topics["assignment"]


def top_k_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """logits [T, V] -> (ids [T, k], log-probs [T, k]) of the k most likely tokens, best first."""
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    ids = np.argpartition(-logp, k, axis=-1)[:, :k]
    vals = np.take_along_axis(logp, ids, axis=-1)
    order = np.argsort(-vals, axis=-1)
    return np.take_along_axis(ids, order, axis=-1), np.take_along_axis(vals, order, axis=-1)


def build_reference(reference, encode_chat, encode_text, eos_ids) -> dict:
    """Greedy continuations of REFERENCE_PROMPTS and top-k log-probs on a probe window, from the float model.

    reference: export.quality.reference.FloatReference; encode_chat(str) -> prompt ids rendered with the chat template;
    encode_text(str) -> ids.
    """
    prompts = []
    for text in REFERENCE_PROMPTS:
        ids = list(encode_chat(text))
        greedy = reference.greedy(ids, GREEDY_TOKENS, eos_ids=tuple(eos_ids))
        prompts.append({"text": text, "ids": ids, "greedy_ids": [int(t) for t in greedy]})
    probe_ids = list(encode_text(probe_text()))[:PROBE_TOKENS]
    logits = reference.logits(probe_ids)
    top_ids, top_lp = top_k_logprobs(logits, TOP_K)
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    # the float model's log-prob of the actual next token, so verify can report a perplexity ratio
    target_lp = logp[np.arange(len(probe_ids) - 1), probe_ids[1:]]
    return {
        "prompts": prompts,
        "probe": {
            "ids": [int(t) for t in probe_ids],
            "k": TOP_K,
            "top_ids": top_ids.astype(int).tolist(),
            "top_logprobs": np.round(top_lp, 6).astype(float).tolist(),
            "target_logprobs": np.round(target_lp, 6).astype(float).tolist(),
        },
    }
