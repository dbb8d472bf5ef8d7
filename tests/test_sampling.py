"""Sampling: argument validation, exact masks of top-k / top-p / min-p, seeded draws, repetition penalty."""
from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.errors import SamplingError
from edge_runtime.generation.sampling import (
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    greedy,
    make_logits_processors,
    make_sampler,
    softmax,
    validate,
)

LOGITS = np.array([1.0, 3.0, -2.0, 2.5, 0.0], dtype=np.float32)  # ranking: 1, 3, 0, 4, 2


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature must be >= 0, got -0.1"),
    ({"temperature": float("nan")}, "temperature must be >= 0"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"min_p": 1.0}, r"min_p must be in \[0, 1\), got 1.0"),
    ({"min_p": -0.1}, r"min_p must be in \[0, 1\)"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number > 0"),
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0, got -1"),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        validate(**kwargs)


def test_factories_validate_too():
    with pytest.raises(SamplingError, match="top_p"):
        make_sampler(temperature=1.0, top_p=0)
    with pytest.raises(SamplingError, match="repetition_penalty"):
        make_logits_processors(-1.0)
    validate(0.0, 0, 1.0, 0.0, 1.0, 0)  # the defaults are valid


def test_greedy_is_argmax_without_softmax():
    assert make_sampler(0.0) is greedy
    assert greedy(LOGITS) == 1


def test_top_k_mask_is_exact():
    out = apply_top_k(LOGITS, 2)
    np.testing.assert_array_equal(out, [-np.inf, 3.0, -np.inf, 2.5, -np.inf])
    np.testing.assert_array_equal(apply_top_k(LOGITS, 0), LOGITS)
    np.testing.assert_array_equal(apply_top_k(LOGITS, 5), LOGITS)


def test_top_p_mask_is_exact():
    probs = np.array([0.15, 0.5, 0.05, 0.3])
    # 0.5 (nothing above) and 0.3 (0.5 above < 0.8) stay; 0.15 has 0.8 above: dropped.
    np.testing.assert_allclose(apply_top_p(probs, 0.8), [0, 0.625, 0, 0.375])
    np.testing.assert_allclose(apply_top_p(probs, 0.81), np.array([0.15, 0.5, 0, 0.3]) / 0.95)
    np.testing.assert_allclose(apply_top_p(probs, 0.01), [0, 1, 0, 0])  # the best token always survives
    assert apply_top_p(probs, 1.0) is probs


def test_min_p_mask_is_exact():
    probs = np.array([0.15, 0.5, 0.05, 0.3])
    np.testing.assert_allclose(apply_min_p(probs, 0.3), np.array([0.15, 0.5, 0, 0.3]) / 0.95)  # >= 0.15 stays
    np.testing.assert_allclose(apply_min_p(probs, 0.61), [0, 1, 0, 0])


def frequencies(sampler, logits, n=10000):
    counts = np.bincount([sampler(logits) for _ in range(n)], minlength=logits.size)
    return counts / n


def test_temperature_draws_follow_the_softmax():
    freq = frequencies(make_sampler(0.7, seed=0), LOGITS)
    np.testing.assert_allclose(freq, softmax(LOGITS.astype(np.float64) / 0.7), atol=0.015)


def test_combined_filters_draw_from_the_expected_distribution():
    # top_k=3 keeps ids 1, 3, 0; at temperature 1 their probs are ~.53/.32/.12 (renormalized);
    # top_p=0.8 then keeps 1 and 3 only.
    freq = frequencies(make_sampler(1.0, top_k=3, top_p=0.8, seed=1), LOGITS)
    p = softmax(np.array([3.0, 2.5]))
    np.testing.assert_allclose(freq[[1, 3]], p, atol=0.015)
    assert freq[[0, 2, 4]].sum() == 0
    # min_p 0.2 relative to the best (e^3): keeps e^x >= 0.2 e^3, i.e. x >= 3 + ln 0.2 = 1.39 -> ids 1 and 3.
    freq = frequencies(make_sampler(1.0, min_p=0.2, seed=2), LOGITS)
    assert freq[[0, 2, 4]].sum() == 0 and abs(freq[1] - p[0]) < 0.015


def test_top_k_path_matches_masking_the_full_vector():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=1000).astype(np.float32)
    fast = make_sampler(0.8, top_k=20, top_p=0.9, seed=11)
    ids = [fast(logits) for _ in range(300)]
    allowed = set(np.argsort(-logits)[:20].tolist())
    assert set(ids) <= allowed and len(set(ids)) > 3
    # same draws from the full-vector formulation (mask, softmax, top-p) with the same random stream
    probs = apply_top_p(softmax(apply_top_k(logits, 20).astype(np.float64) / 0.8), 0.9)
    rng2 = np.random.default_rng(11)
    cdf = np.cumsum(probs)
    ref = [int(np.searchsorted(cdf, rng2.random() * cdf[-1], side="right")) for _ in range(300)]
    assert ids == ref


def test_seeded_sampling_is_reproducible():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=500).astype(np.float32)
    a = make_sampler(1.0, top_p=0.95, seed=42)
    b = make_sampler(1.0, top_p=0.95, seed=42)
    c = make_sampler(1.0, top_p=0.95, seed=43)
    da, db, dc = ([s(logits) for _ in range(50)] for s in (a, b, c))
    assert da == db and da != dc


def test_repetition_penalty_is_exact():
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    out = apply_repetition_penalty(logits, np.array([0, 1, 1]), 2.0)
    np.testing.assert_array_equal(out, [1.0, -2.0, 0.5, 3.0])
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.5, 3.0])  # input untouched
    (process,) = make_logits_processors(2.0, repetition_context_size=1)
    # only the last id counts with a context of 1
    np.testing.assert_array_equal(process(np.array([0, 3]), logits), [2.0, -1.0, 0.5, 1.5])
    assert make_logits_processors(1.0) == []


def test_nucleus_prefilter_draws_like_the_full_sort():
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=5000) * 4).astype(np.float32)  # peaked: the 0.9 nucleus is within the top 512
    probs = softmax(logits.astype(np.float64) / 0.9)
    assert np.sort(probs)[-512:].sum() >= 0.9
    full = apply_top_p(probs, 0.9)
    rng2 = np.random.default_rng(9)
    cdf = np.cumsum(full)
    ref = [int(np.searchsorted(cdf, rng2.random() * cdf[-1], side="right")) for _ in range(200)]
    fast = make_sampler(0.9, top_p=0.9, seed=9)
    assert [fast(logits) for _ in range(200)] == ref
    flat = np.zeros(5000, dtype=np.float32)  # no prefilter possible: falls back to the full sort
    flat_sampler = make_sampler(1.0, top_p=0.5, seed=1)
    draws = {flat_sampler(flat) for _ in range(50)}
    assert len(draws) > 40 and max(draws) < 2500  # the stable sort keeps the first half of the tied ids
