"""Speculative decoding (runtimes/speculative.py): greedy output is plain greedy's token for token on every
engine, and the sampling acceptance rule keeps the distribution of plain sampling (chi-square against the
exact distribution, computed from the model's own logits)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kanana_quant.gguf.writer import export_gguf
from kanana_quant.exporters.onnx import export_onnx
from kanana_quant.loader import open_model
from kanana_quant.runtimes.engines import open_engine
from kanana_quant.runtimes.generate import DRAFT_MODEL_GIVE_UP, Decoding
from kanana_quant.runtimes.numpy_engine import NumpyEngine
from kanana_quant.runtimes.sampling import Sampler, SamplingParams
from kanana_quant.runtimes.speculative import Adaptive, Draft, DraftModel, PromptLookup, verify

# Input-grounded: the prompt repeats itself, as a RAG answer quotes its context.
PROMPT = "카나나는 Kanana, a model that reads 카나나는 Kanana, a model that"


def test_prompt_lookup_copies_the_latest_continuation():
    lookup = PromptLookup(max_ngram=3)
    assert lookup.propose([5, 6, 7, 8, 1, 2, 5, 6, 9, 5, 6], 3).tokens == [9, 5]  # latest "5 6" → 9 5
    assert lookup.propose([1, 2, 3, 4, 9, 1, 2, 3], 4).tokens == [4, 9, 1]  # the longest n-gram wins ("1 2 3")
    assert lookup.propose([1, 2, 3, 4, 2, 3], 1).tokens == [4]  # no more than asked for
    assert lookup.propose([1, 2, 3, 4], 4).tokens == []  # nothing recurs
    assert lookup.propose([1, 2, 3, 1], 4).tokens == []  # one recurring token is no evidence of a copy
    assert lookup.propose([7, 7], 0).tokens == []


def test_a_draft_is_no_longer_than_the_match_behind_it():
    """A 2-token match drafts 2 tokens, a 6-token one 6: the longer the copy so far, the more is risked."""
    lookup = PromptLookup()
    span = list(range(100, 120))
    assert lookup.propose(span + [1] + span[:2], 16).tokens == span[2:4]
    assert lookup.propose(span + [1] + span[:6], 16).tokens == span[6:12]
    assert lookup.propose(span + [1] + span[:12], 16).tokens == span[12:20]  # capped at max_ngram = 8


@pytest.fixture(scope="module")
def tiny(model_dirs, tmp_path_factory):
    model = open_model(str(model_dirs("dense-tied")))
    out = tmp_path_factory.mktemp("spec")
    return model, {"numpy": model, "onnxruntime": open_model(str(export_onnx(model, out / "onnx").path)),
                   "llama.cpp": open_model(str(export_gguf(model, out / "m.gguf", "F32")))}


@pytest.mark.parametrize("engine", ["numpy", "onnxruntime", "llama.cpp"])
def test_greedy_with_prompt_lookup_is_plain_greedy(tiny, engine):
    model, loaded = tiny
    ids = model.tokenizer.encode(PROMPT, add_special_tokens=True)
    runs = {}
    for name, drafter in (("plain", None), ("lookup", PromptLookup())):
        e = open_engine(loaded[engine], engine, max_seq_len=256, threads=1)
        decoding = Decoding(e, ids, 48, SamplingParams(), drafter=drafter)
        runs[name] = ([s.token for s in decoding], decoding)
    (plain, _), (lookup, decoding) = runs["plain"], runs["lookup"]
    assert len(plain) == 48 and lookup == plain
    # drafts were really accepted, in fewer forwards than tokens (else the check above proves nothing)
    assert decoding.adaptive.accepted > 10 and decoding.forwards < 40


def test_greedy_with_a_draft_model_is_plain_greedy(model_dirs):
    target, draft = open_model(str(model_dirs("dense-tied"))), open_model(str(model_dirs("dense-llama3-rope")))
    ids = target.tokenizer.encode(PROMPT, add_special_tokens=True)
    plain = [s.token for s in Decoding(NumpyEngine(target.weights), ids, 40, SamplingParams())]
    for drafter_weights in (draft.weights, target.weights):  # another model, and the target itself
        drafter = DraftModel(NumpyEngine(drafter_weights), Sampler(SamplingParams()))
        decoding = Decoding(NumpyEngine(target.weights), ids, 40, SamplingParams(), drafter=drafter)
        assert [s.token for s in decoding] == plain
    assert decoding.adaptive.accepted == decoding.adaptive.proposed >= 16  # the target drafting for itself


def simulate(adaptive: Adaptive, step_seconds, accepted_of, steps: int = 400, timed: bool = True,
             catch_up: float = 0.0) -> float:
    """Seconds per emitted token over `steps` decode steps whose cost and acceptance are given: a plain step
    costs 1, a step verifying k drafts step_seconds(k) and keeps accepted_of(k) of them, plus `catch_up` for
    every token emitted since the drafter last ran (a draft model reads them into its cache first)."""
    seconds = tokens = behind = 0
    for _ in range(steps):
        k = adaptive.size()
        took, kept = (1.0, 0) if k == 0 else (step_seconds(k) + catch_up * behind, accepted_of(k))
        behind = behind + 1 if k == 0 else 1  # after drafting, only the token drawn by the rule is unread
        adaptive.record(k, kept, took if timed else None)
        seconds, tokens = seconds + took, tokens + kept + 1
    return seconds / tokens


def test_drafting_that_costs_more_than_it_saves_is_paused():
    """An engine where verifying k tokens costs 1 + 0.6·k plain steps (llama.cpp's batched kernels on few
    cores are like this) and the drafts keep half their tokens: drafting loses time. Timed, the policy drafts
    rarely and stays near plain speed; counting hits alone it kept drafting, 1.1x slower here."""
    def costly(k):
        return 1 + 0.6 * k

    def half(k):
        return k // 2

    assert simulate(Adaptive(), costly, half) < 1.05
    assert simulate(Adaptive(), costly, half, timed=False) > 1.08
    # drafts that are cheap to verify and kept keep being drafted: well under a plain step per token
    assert simulate(Adaptive(), lambda k: 1 + 0.1 * k, lambda k: k) < 0.4


def test_a_draft_model_that_costs_more_than_it_saves_stops_drafting():
    """A draft model nearly the target's size (each drafted token 0.8 of a plain step, as SmolLM2 4-bit
    drafting for its 8-bit self), half its drafts kept: pausing is not free, since after every pause it reads
    the tokens it missed (0.25 of a step each, prefill speed). Pausing alone stays 1.2x slower than plain
    decoding; giving up after DRAFT_MODEL_GIVE_UP slow steps in a row stays within 3% of it."""
    def draft_and_verify(k):
        return 1 + 0.3 * k + 0.8 * k

    def half(k):
        return k // 2

    assert simulate(Adaptive(k=2), draft_and_verify, half, catch_up=0.25) > 1.2
    assert simulate(Adaptive(k=2, give_up=DRAFT_MODEL_GIVE_UP), draft_and_verify, half, catch_up=0.25) < 1.03
    # one whose drafts are all kept pays, and keeps drafting: 9 tokens for 5 steps' time at k = 8
    paying = Adaptive(k=2, give_up=DRAFT_MODEL_GIVE_UP)
    assert simulate(paying, lambda k: 1 + 0.5 * k, lambda k: k, catch_up=0.1) < 0.6 and not paying.stopped


def test_a_draft_model_reads_the_prompt_before_the_first_token(model_dirs):
    """Its prompt prefill is part of the prompt's (it used to land in the first drafting step, which then
    looked slow to the timing rule)."""
    target = open_model(str(model_dirs("dense-tied")))
    ids = target.tokenizer.encode(PROMPT, add_special_tokens=True)
    drafter = DraftModel(NumpyEngine(target.weights), Sampler(SamplingParams()))
    decoding = iter(Decoding(NumpyEngine(target.weights), ids, 8, SamplingParams(), drafter=drafter))
    next(decoding)
    assert drafter.fed == ids and drafter.engine.pos == len(ids)
    # prompt lookup keeps no cache of its own, so its pauses cost nothing and it never gives up
    assert PromptLookup.pausing_is_free and not DraftModel.pausing_is_free


def chi_square_threshold(df: int, z: float = 3.09) -> float:
    """The 0.999 quantile of chi-square(df) by Wilson–Hilferty (z = the normal 0.999 quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_acceptance_rule_keeps_the_distribution_on_synthetic_distributions():
    """verify() against exact p: the first emitted token, over many seeded draws, for a deterministic draft
    (prompt lookup) and a sampled one (a draft model's q)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6)).astype(np.float32) * 1.5
    params = SamplingParams(temperature=1.0)
    p0 = Sampler.distribution(Sampler(params).filter_logits(logits[0], []))
    q = np.array([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    n = 20000
    for name in ("lookup", "draft model"):
        counts = np.zeros(6)
        for seed in range(n):
            sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
            if name == "lookup":
                draft = Draft([2, 4])
            else:
                d = int(np.random.default_rng(10_000 + seed).choice(6, p=q))
                draft = Draft([d], [q])
            emitted, _ = verify(sampler, logits, draft, [])
            counts[emitted[0]] += 1
        stat = float(((counts - n * p0) ** 2 / (n * p0)).sum())
        assert stat < chi_square_threshold(5), (name, stat, counts / n, p0)


def test_sampling_with_drafts_keeps_the_distribution_on_a_tiny_model(model_dirs):
    """The first two generated tokens, the second one drafted and verified, at temperature 1, top-k 4 and a
    repetition penalty:
    their joint frequencies over seeded runs against the exact plain-sampling distribution computed from
    the target's logits (cells below 5 expected draws pooled)."""
    target = open_model(str(model_dirs("dense-tied")))
    params = SamplingParams(temperature=1.0, top_k=4, repetition_penalty=1.3)
    ids = target.tokenizer.encode("Kanana 카나나", add_special_tokens=True)
    engine = NumpyEngine(target.weights)
    first = Sampler.distribution(Sampler(params).filter_logits(engine.forward(ids), ids))
    exact = {}
    for t1 in np.flatnonzero(first):
        engine.reset()
        second = Sampler.distribution(Sampler(params).filter_logits(engine.forward(ids + [int(t1)]), ids + [int(t1)]))
        for t2 in np.flatnonzero(second):
            exact[int(t1), int(t2)] = first[t1] * second[t2]
    n, counts, drafted, accepted = 3000, {}, 0, 0
    drafter_engine = NumpyEngine(target.weights)
    for seed in range(n):
        sampler_params = SamplingParams(temperature=1.0, top_k=4, repetition_penalty=1.3, seed=seed)
        # The model itself, sampled colder and with a wider top-k, drafts: q overlaps p but differs from it, so the
        # rule both accepts and rejects.
        drafter = DraftModel(drafter_engine, Sampler(SamplingParams(temperature=0.5, top_k=8, seed=n + seed)))
        # three tokens: the first from the prompt's logits, then one drafted token verified (and one more)
        decoding = Decoding(NumpyEngine(target.weights), ids, 3, sampler_params, drafter=drafter)
        pair = tuple(s.token for s in decoding)[:2]
        counts[pair] = counts.get(pair, 0) + 1
        drafted += decoding.adaptive.proposed
        accepted += decoding.adaptive.accepted
    assert drafted == n and 0.2 * n < accepted < 0.9 * n  # every run verified one draft; some were rejected
    cells = sorted(exact, key=exact.get, reverse=True)
    big = [c for c in cells if exact[c] * n >= 5]
    observed = [counts.get(c, 0) for c in big] + [n - sum(counts.get(c, 0) for c in big)]
    expected = [exact[c] * n for c in big] + [n * (1 - sum(exact[c] for c in big))]
    assert set(counts) <= set(exact)  # nothing plain sampling could not produce
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
    assert stat < chi_square_threshold(len(observed) - 1), (stat, len(observed))
