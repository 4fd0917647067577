"""The numpy sampler against transformers' logits processors as the oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kanana_quant.errors import KananaQuantError
from kanana_quant.runtimes.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
)

VOCAB = 1000
SEEDS = range(5)


def hf_apply(processor, logits: np.ndarray, previous_ids=(0,)) -> np.ndarray:
    """Run one transformers logits processor on a single 1-D logits vector."""
    ids = torch.tensor([list(previous_ids)], dtype=torch.long)
    return processor(ids, torch.from_numpy(logits.copy())[None])[0].numpy()


def hf_filter(logits: np.ndarray, params: SamplingParams, previous_ids=(0,)) -> np.ndarray:
    """What transformers' generate does to one step's scores, built the way it builds the list."""
    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if params.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(params.temperature)))
    if params.top_k > 0:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        procs.append(TopPLogitsWarper(params.top_p))
    return hf_apply(procs, logits, previous_ids)


def logit_vectors():
    """(kind, logits) pairs: smooth, wide, peaked, heavily tied, and partly masked."""
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        yield "normal", rng.standard_normal(VOCAB).astype(np.float32)
        yield "wide", (rng.standard_normal(VOCAB) * 4).astype(np.float32)
        peaked = rng.standard_normal(VOCAB).astype(np.float32)
        peaked[rng.integers(VOCAB, size=3)] += np.float32([25.0, 22.0, 21.0])
        yield "peaked", peaked
        # Quarter-steps over a narrow range: hundreds of exact ties, including at every cut.
        yield "ties", (rng.integers(0, 24, VOCAB) / 4).astype(np.float32)
        # Raw LLM logits can sit far from 0; exp() of them overflows float32 without a max shift.
        yield "shifted", (rng.standard_normal(VOCAB) * 2 + 150).astype(np.float32)
        masked = rng.standard_normal(VOCAB).astype(np.float32)
        masked[rng.random(VOCAB) < 0.3] = -np.inf
        yield "masked", masked


COMBOS = [
    # (temperature, top_k, top_p)
    (1.0, 0, 0.9),
    (0.7, 50, 1.0),
    (0.7, 50, 0.9),
    (1.3, 0, 0.5),
    (0.5, 10, 0.95),
    (1.0, 1, 1.0),
    (2.0, 200, 0.3),
    (1.0, 1000, 0.99),
    (0.8, 0, 0.999),
    (1.0, 5, 0.1),
]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), COMBOS)
def test_filters_match_transformers(temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    sampler = Sampler(params)
    for kind, logits in logit_vectors():
        ours = sampler.filter_logits(logits, [])
        theirs = hf_filter(logits, params)
        keep, hf_keep = np.isfinite(ours), np.isfinite(theirs)
        assert keep.sum() == hf_keep.sum(), (kind, keep.sum(), hf_keep.sum())
        differ = keep != hf_keep
        if differ.any():
            # torch.sort is unstable, so when tied logits straddle the top-p cut transformers keeps
            # an arbitrary subset of them; only those tokens may differ, and only in which are kept.
            assert kind == "ties" and top_p < 1.0, kind
            assert np.all(logits[differ] == logits[hf_keep].min()), kind
        both = keep & hf_keep
        np.testing.assert_allclose(ours[both], theirs[both], rtol=0, atol=1e-5, err_msg=kind)


def test_tie_vectors_really_straddle_the_top_p_cut():
    # Guards the test above: its tolerant branch must cover cuts through a tie, which the tie
    # vectors have to produce (top-k keeps whole ties, so a split tie is top-p's doing).
    params = SamplingParams(temperature=1.0, top_p=0.9)
    straddled = 0
    for kind, logits in logit_vectors():
        if kind == "ties":
            kept = np.isfinite(Sampler(params).filter_logits(logits, []))
            straddled += bool(np.any(logits[~kept] == logits[kept].min()))
    assert straddled > 0


@pytest.mark.parametrize(("k", "p"), [(1, 0.5), (7, 0.8), (100, 0.97), (VOCAB + 5, 0.2)])
def test_top_k_and_top_p_alone_match_transformers(k, p):
    for kind, logits in logit_vectors():
        hf_k = hf_apply(TopKLogitsWarper(k), logits)
        np.testing.assert_array_equal(apply_top_k(logits, k), hf_k, err_msg=kind)
        if kind != "ties":
            hf_p = hf_apply(TopPLogitsWarper(p), logits)
            np.testing.assert_array_equal(apply_top_p(logits, p), hf_p, err_msg=kind)


def test_top_k_keeps_all_tokens_tied_with_the_kth():
    logits = np.float32([1.0, 3.0, 2.0, 3.0, 2.0, 0.5])
    out = apply_top_k(logits, 2)
    np.testing.assert_array_equal(np.isfinite(out), [False, True, False, True, False, False])
    out = apply_top_k(logits, 3)
    np.testing.assert_array_equal(np.isfinite(out), [False, True, True, True, True, False])


@pytest.mark.parametrize(("p", "kept"), [(0.5, 2), (0.75, 3), (0.25, 1), (0.3, 2)])
def test_top_p_cut_is_inclusive_at_exact_cumulative_probability(p, kept):
    # Four equal logits give exact quarters, so the cumulative sum hits 1 - p exactly: a token
    # whose cumulative probability equals 1 - p is removed.
    logits = np.zeros(4, dtype=np.float32)
    theirs = hf_apply(TopPLogitsWarper(p), logits)
    assert np.isfinite(apply_top_p(logits, p)).sum() == np.isfinite(theirs).sum() == kept


def test_top_p_breaks_ties_deterministically_toward_higher_ids():
    # transformers leaves this to an unstable torch.sort; we pin it so runs are reproducible.
    logits = np.random.default_rng(0).integers(0, 2, VOCAB).astype(np.float32)
    ones = np.flatnonzero(logits == 1)
    kept = np.flatnonzero(np.isfinite(apply_top_p(logits, 0.5)))
    theirs = hf_apply(TopPLogitsWarper(0.5), logits)
    assert 0 < len(kept) == np.isfinite(theirs).sum() < len(ones)  # the cut falls inside the tie
    assert kept.tolist() == ones[-len(kept) :].tolist()


def test_top_p_always_keeps_the_most_likely_token():
    # With p this small 1 - p rounds to 1.0 in float32, so every cumulative sum is <= 1 - p.
    for kind, logits in logit_vectors():
        if kind != "ties":
            out = apply_top_p(logits, 1e-9)
            theirs = hf_apply(TopPLogitsWarper(1e-9), logits)
            assert np.flatnonzero(np.isfinite(out)).tolist() == [int(np.argmax(logits))], kind
            np.testing.assert_array_equal(out, theirs, err_msg=kind)


def test_filters_do_not_modify_their_input():
    logits = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    before = logits.copy()
    apply_top_k(logits, 3)
    apply_top_p(logits, 0.5)
    apply_repetition_penalty(logits, [1, 2, 3], 1.5)
    Sampler(SamplingParams(temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.2))(logits, [4])
    np.testing.assert_array_equal(logits, before)


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        logits = (rng.standard_normal(VOCAB) * 3).astype(np.float32)
        previous = list(rng.integers(0, VOCAB, 60))
        previous += previous[:20]  # repeated ids must be penalised once, not twice
        previous += [int(np.argmax(logits)), int(np.argmin(logits))]  # surely one positive, one negative
        ours = apply_repetition_penalty(logits, previous, penalty)
        theirs = hf_apply(RepetitionPenaltyLogitsProcessor(penalty), logits, previous)
        assert not np.allclose(ours, logits)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_repetition_penalty_ignores_ids_outside_the_vocabulary():
    logits = np.float32([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1, 7], 2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])
    np.testing.assert_allclose(out, hf_apply(RepetitionPenaltyLogitsProcessor(2.0), logits, [0, 1, 1, 7]))


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "penalty"),
    [(0.7, 40, 0.9, 1.2), (1.0, 0, 0.8, 0.8), (1.5, 5, 1.0, 1.5)],
)
def test_full_pipeline_matches_transformers(temperature, top_k, top_p, penalty):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        logits = (rng.standard_normal(VOCAB) * 2).astype(np.float32)
        previous = [int(i) for i in np.argsort(logits)[-30:]] + [int(i) for i in rng.integers(0, VOCAB, 30)]
        ours = Sampler(params).filter_logits(logits, previous)
        theirs = hf_filter(logits, params, previous)
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
        keep = np.isfinite(theirs)
        np.testing.assert_allclose(ours[keep], theirs[keep], rtol=0, atol=1e-5)


def test_greedy_returns_first_argmax():
    sampler = Sampler(SamplingParams(temperature=0.0, top_k=3, top_p=0.5))
    logits = np.float32([0.0, 5.0, 1.0, 5.0, -2.0])
    assert sampler(logits, []) == 1 == int(torch.argmax(torch.from_numpy(logits)))
    for seed in SEEDS:
        logits = np.random.default_rng(seed).standard_normal(VOCAB).astype(np.float32)
        assert sampler(logits, []) == int(np.argmax(logits))


def test_greedy_sees_the_repetition_penalty():
    logits = np.float32([3.0, 2.9, -1.0])
    assert Sampler(SamplingParams())(logits, [0]) == 0
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, [0]) == 1


def draws(params: SamplingParams, logits: np.ndarray, n: int) -> list[int]:
    sampler = Sampler(params)
    return [sampler(logits, []) for _ in range(n)]


def test_seeded_sampling_is_reproducible():
    flat = np.zeros(VOCAB, dtype=np.float32)
    a = draws(SamplingParams(temperature=1.0, seed=123), flat, 50)
    b = draws(SamplingParams(temperature=1.0, seed=123), flat, 50)
    c = draws(SamplingParams(temperature=1.0, seed=124), flat, 50)
    assert a == b
    assert a != c
    assert len(set(a)) > 25  # a flat distribution over 1000 tokens rarely repeats in 50 draws


def test_empirical_frequencies_match_softmax():
    probs = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    logits = (np.log(probs) + 3.0).astype(np.float32)  # the shift must not matter
    n = 20_000
    counts = np.bincount(draws(SamplingParams(temperature=1.0, seed=7), logits, n), minlength=5)
    np.testing.assert_allclose(counts / n, probs, atol=0.02)


def test_empirical_frequencies_after_temperature_and_top_k():
    logits = np.float32([1.0, 0.2, -0.5, 0.8, 0.0])
    n = 20_000
    counts = np.bincount(draws(SamplingParams(temperature=0.5, top_k=3, seed=3), logits, n), minlength=5)
    expected = np.exp(logits.astype(np.float64) / 0.5)
    expected[[2, 4]] = 0.0  # the two lowest are cut by top_k=3
    expected /= expected.sum()
    assert counts[2] == counts[4] == 0
    np.testing.assert_allclose(counts / n, expected, atol=0.02)


def test_top_k_one_always_returns_argmax():
    for seed in SEEDS:
        logits = np.random.default_rng(seed).standard_normal(VOCAB).astype(np.float32)
        sampler = Sampler(SamplingParams(temperature=1.5, top_k=1, top_p=0.95, seed=seed))
        assert {sampler(logits, []) for _ in range(200)} == {int(np.argmax(logits))}


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"temperature": -0.1}, "--temperature"),
        ({"temperature": math.nan}, "--temperature"),
        ({"top_k": -1}, "--top-k"),
        ({"top_k": 2.5}, "--top-k"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
        ({"top_p": -0.2}, "--top-p"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty"),
        ({"repetition_penalty": -1.0}, "--repetition-penalty"),
    ],
)
def test_invalid_params_raise(kwargs, flag):
    with pytest.raises(KananaQuantError, match=flag) as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


def test_boundary_params_are_valid():
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None)
    SamplingParams(temperature=2.0, top_k=1, top_p=1e-6, repetition_penalty=0.01, seed=0)
