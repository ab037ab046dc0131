"""Sampling, checked against hand-made distributions (the engine's own tests: test_engine.py)."""

from __future__ import annotations

import math

import pytest
import torch

from v4.errors import InputError
from v4.engine import SamplingParams, sample


# ----------------------------------------------------------------------------- sampling


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax():
    logits = torch.randn(7, 50, generator=_gen(0))
    got = sample(logits, SamplingParams(temperature=0.0), None)
    assert got.tolist() == [max(range(50), key=lambda j: float(logits[i, j])) for i in range(7)]


def test_top_k_one_is_argmax():
    logits = torch.randn(64, 30, generator=_gen(1))
    want = logits.argmax(-1)
    for seed in range(5):
        got = sample(logits, SamplingParams(temperature=1.5, top_k=1), _gen(seed))
        assert torch.equal(got, want)


def test_same_seed_reproducible_different_seeds_differ():
    logits = torch.zeros(200, 10)  # uniform over 10 tokens: 200 draws
    p = SamplingParams(temperature=1.0)
    a = sample(logits, p, _gen(123))
    b = sample(logits, p, _gen(123))
    c = sample(logits, p, _gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # P(equal) = 10^-200


def _counts(logits_row, params, n, seed=0):
    draws = sample(logits_row.expand(n, -1).contiguous(), params, _gen(seed))
    return torch.bincount(draws, minlength=logits_row.numel())


def _chi2(counts, probs):
    n = int(counts.sum())
    return sum((int(c) - n * p) ** 2 / (n * p) for c, p in zip(counts.tolist(), probs) if p > 0)


# tokens at shuffled positions so the cut must follow the sorted order, not the index order
PROBS = {2: 0.5, 0: 0.3, 3: 0.15, 1: 0.05}


def _logits_of(probs: dict) -> torch.Tensor:
    return torch.tensor([math.log(probs[i]) for i in range(len(probs))], dtype=torch.float32)


@pytest.mark.parametrize("top_p,kept", [(0.7, {2, 0}), (0.5, {2}), (0.81, {2, 0, 3}),
                                        (0.96, {2, 0, 3, 1}), (1.0, {2, 0, 3, 1}), (0.1, {2})])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, kept):
    counts = _counts(_logits_of(PROBS), SamplingParams(temperature=1.0, top_p=top_p), 2000)
    seen = {i for i, c in enumerate(counts.tolist()) if c > 0}
    assert seen == kept
    # the kept tokens are renormalised: frequencies follow p_i / sum(kept p)
    mass = sum(PROBS[i] for i in kept)
    probs = [PROBS[i] / mass if i in kept else 0.0 for i in range(4)]
    assert _chi2(counts, probs) < 25.0  # df <= 3; p ~ 1e-5


def test_temperature_one_frequencies_follow_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -3.0])
    n = 30000
    counts = _counts(logits, SamplingParams(temperature=1.0), n, seed=7)
    z = [math.exp(float(x)) for x in logits]
    probs = [v / sum(z) for v in z]
    assert _chi2(counts, probs) < 30.0  # df = 5; p ~ 1.5e-5
    for c, p in zip(counts.tolist(), probs):
        assert abs(c / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_temperature_scales_logits():
    logits = torch.tensor([2.0, 0.0, -1.0])
    n, T = 30000, 2.0
    counts = _counts(logits, SamplingParams(temperature=T), n, seed=3)
    z = [math.exp(float(x) / T) for x in logits]
    assert _chi2(counts, [v / sum(z) for v in z]) < 25.0


def test_top_k_renormalises_over_k_best():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    counts = _counts(logits, SamplingParams(temperature=1.0, top_k=2), 20000, seed=5)
    assert {i for i, c in enumerate(counts.tolist()) if c} == {1, 3}
    z1, z3 = math.exp(3.0), math.exp(2.0)
    probs = [0, z1 / (z1 + z3), 0, z3 / (z1 + z3), 0]
    assert _chi2(counts, probs) < 20.0


def test_min_p_drops_tokens_below_a_share_of_the_best():
    # probabilities 0.5, 0.3, 0.15, 0.05 (PROBS): min_p 0.35 keeps p >= 0.175 -> tokens 2 and 0
    counts = _counts(_logits_of(PROBS), SamplingParams(temperature=1.0, min_p=0.35), 4000, seed=9)
    assert {i for i, c in enumerate(counts.tolist()) if c} == {2, 0}
    assert _chi2(counts, [0.3 / 0.8, 0, 0.5 / 0.8, 0]) < 20.0


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_params_name_the_parameter(kw, name):
    with pytest.raises(InputError, match=f"^{name} must be"):
        SamplingParams(**kw).validate()


def test_stop_token_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(InputError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[3, 600]).validate(vocab_size=512)


