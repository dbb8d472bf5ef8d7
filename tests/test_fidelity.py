"""Fidelity metrics against values worked out by hand on tiny distributions."""
import json
import math

import numpy as np
import pytest

from edge_runtime.quality.fidelity import (
    FidelityReport,
    compare_logits,
    compare_topk,
    kl_divergence,
    perplexity,
    ppl_ratio,
    rms_top_prob_diff,
    top1_agreement,
    topk_kl_divergence,
    topk_rms_top_prob_diff,
    topk_top1_agreement,
)
from edge_runtime.sessions.state import common_prefix

# Two positions over a 3-token vocabulary. Logits are log-probabilities plus an arbitrary per-row constant
# (softmax must ignore it), including a huge one that would overflow a naive exp.
P = np.array([[1 / 2, 1 / 4, 1 / 4], [0.7, 0.2, 0.1]])
Q = np.array([[1 / 4, 1 / 2, 1 / 4], [0.7, 0.2, 0.1]])
P_LOGITS = np.log(P) + np.array([[3.0], [1000.0]])
Q_LOGITS = (np.log(Q) - 7.0).astype(np.float32)
TARGETS = [1, 0]

# By hand: row 0 KL = 1/2 ln(1/2 / 1/4) + 1/4 ln(1/4 / 1/2) + 0 = ln2/4; row 1 is identical (0).
KL = math.log(2) / 8
# Row 0: float top token 0 has p = 1/2, q = 1/4; row 1: same probabilities. RMS = sqrt((1/16 + 0) / 2).
RMS_TOP = 0.25 / math.sqrt(2)
# Targets: float assigns 1/4 then 0.7, quantized 1/2 then 0.7.
PPL_P = 1 / math.sqrt(0.25 * 0.7)
PPL_Q = 1 / math.sqrt(0.5 * 0.7)


def test_full_logit_metrics():
    assert kl_divergence(P_LOGITS, Q_LOGITS) == pytest.approx(KL, rel=1e-6)
    assert kl_divergence(P_LOGITS, P_LOGITS) == pytest.approx(0.0, abs=1e-12)
    assert top1_agreement(P_LOGITS, Q_LOGITS) == 0.5
    assert rms_top_prob_diff(P_LOGITS, Q_LOGITS) == pytest.approx(RMS_TOP, rel=1e-6)
    assert perplexity(P_LOGITS, TARGETS) == pytest.approx(PPL_P, rel=1e-6)
    assert perplexity(Q_LOGITS, TARGETS) == pytest.approx(PPL_Q, rel=1e-6)
    assert ppl_ratio(P_LOGITS, Q_LOGITS, TARGETS) == pytest.approx(math.sqrt(0.5), rel=1e-6)


def test_kl_handles_zero_probability_tokens():
    p = np.array([[0.0, -np.inf, 0.0]])  # p = (1/2, 0, 1/2): the zero-probability token contributes nothing
    q = np.log(np.array([[0.25, 0.25, 0.5]]))
    assert kl_divergence(p, q) == pytest.approx(0.5 * math.log(2), rel=1e-9)


def test_topk_kl_with_rest_bucket():
    ids1 = np.array([[0], [0]])
    lp1 = np.log(np.array([[0.5], [0.7]]))
    # k=1, row 0: p = (1/2 | rest 1/2), q = (1/4 | rest 3/4): 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3); row 1: 0.
    assert topk_kl_divergence(ids1, lp1, Q_LOGITS) == pytest.approx(0.25 * math.log(4 / 3), rel=1e-6)
    # k=2 leaves one token in the rest bucket, so nothing is merged: equals the full KL.
    ids2 = np.array([[0, 1], [0, 1]])
    lp2 = np.log(np.array([[0.5, 0.25], [0.7, 0.2]]))
    assert topk_kl_divergence(ids2, lp2, Q_LOGITS) == pytest.approx(KL, rel=1e-6)
    assert topk_top1_agreement(ids2, Q_LOGITS) == 0.5
    assert topk_rms_top_prob_diff(ids2, lp2, Q_LOGITS) == pytest.approx(RMS_TOP, rel=1e-6)


def test_topk_kl_is_a_lower_bound():
    rng = np.random.default_rng(0)
    p_logits, q_logits = rng.normal(0, 2, (5, 50)), rng.normal(0, 2, (5, 50))
    lp = p_logits - np.log(np.exp(p_logits).sum(-1, keepdims=True))
    full = kl_divergence(p_logits, q_logits)
    for k in (1, 5, 20):
        ids = np.argsort(-lp, axis=-1)[:, :k]
        assert topk_kl_divergence(ids, np.take_along_axis(lp, ids, -1), q_logits) <= full + 1e-12
    ids = np.argsort(-lp, axis=-1)
    assert topk_kl_divergence(ids, np.take_along_axis(lp, ids, -1), q_logits) == pytest.approx(full, rel=1e-9)


def test_common_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    assert common_prefix([7, 8], [7, 8]) == 2
    assert common_prefix([], [1]) == 0


def test_reports():
    full = compare_logits(P_LOGITS, Q_LOGITS, TARGETS)
    assert full.kl_method == "full" and full.positions == 2
    assert full.ppl_ratio == pytest.approx(math.sqrt(0.5), rel=1e-6)
    d = json.loads(json.dumps(full.to_dict()))
    assert FidelityReport.from_dict(d) == full
    ids = np.array([[0, 1], [0, 1]])
    lp = np.log(np.array([[0.5, 0.25], [0.7, 0.2]]))
    topk = compare_topk(ids, lp, Q_LOGITS, TARGETS, ref_target_logprobs=np.log([0.25, 0.7]))
    assert topk.kl_method == "top2+rest" and topk.kl == pytest.approx(KL, rel=1e-6)
    assert topk.ppl_float == pytest.approx(PPL_P, rel=1e-6)
    assert topk.ppl_quant == pytest.approx(PPL_Q, rel=1e-6)
    assert compare_topk(ids, lp, Q_LOGITS, TARGETS).ppl_ratio is None
