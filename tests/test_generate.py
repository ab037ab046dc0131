"""Sampling and the generation engine.

Greedy generation (paged cache, batched, chunked prefill) is checked against an argmax chain
computed by full recomputation from scratch at every step (`model.logits` on the growing sequence),
which never touches the decode path of the cache. Sampling is checked against hand-made
distributions.
"""

from __future__ import annotations

import math

import pytest
import torch

from v4.errors import InputError
from v4.generate import Engine, SamplingParams, sample


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


@pytest.mark.parametrize("kw", [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}])
def test_bad_sampling_params(kw):
    with pytest.raises(InputError):
        SamplingParams(**kw).validate()


# ----------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def model():
    from v4.runtime import load

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DSV4_BACKEND", raising=False)
        return load(config="tiny", overrides={"backend": "reference"}, progress=False).model


def greedy_by_recompute(model, ids, n, eos=None):
    """Argmax chain by running the whole growing sequence from scratch at every step."""
    seq, out = list(ids), []
    for _ in range(n):
        tok = int(model.logits(seq)[-1].argmax())
        out.append(tok)
        if tok == eos:
            break
        seq.append(tok)
    return out


# lengths around the tiny config's features: window 16, CSA ratio 4, HCA ratio 16
PROMPTS = [
    [(7 * i + 3) % 500 + 2 for i in range(19)],  # 19 + 6 > window and > one HCA window
    [5, 6, 7],
    [9],
    [(11 * i + 1) % 400 + 5 for i in range(8)],
]
NEW = 6


@pytest.fixture(scope="module")
def expected(model):
    eos = model.cfg.eos_token_id
    return [greedy_by_recompute(model, p, NEW, eos) for p in PROMPTS]


def test_engine_single_prompt_matches_recompute(model, expected):
    for p, want in zip(PROMPTS, expected):
        res = Engine(model, max_batch=1, max_seq_len=64, block_size=4).generate([p], NEW)[0]
        assert res.prompt_ids == p
        assert res.output_ids == want, p
        assert res.finish_reason == ("eos" if want[-1] == model.cfg.eos_token_id else "length")


@pytest.mark.parametrize("max_batch", [4, 3, 2])
def test_batch_equals_alone(model, expected, max_batch):
    eng = Engine(model, max_batch=max_batch, max_seq_len=64, block_size=4)
    res = eng.generate(PROMPTS, NEW)
    assert [r.prompt_ids for r in res] == PROMPTS
    assert [r.output_ids for r in res] == expected


@pytest.mark.parametrize("chunk", [3, 1])
def test_chunked_prefill_same_tokens(model, expected, chunk):
    res = Engine(model, max_batch=4, max_seq_len=64, block_size=4, prefill_chunk=chunk).generate(PROMPTS, NEW)
    assert [r.output_ids for r in res] == expected


def test_timings_count_tokens(model):
    eng = Engine(model, max_batch=4, max_seq_len=64)
    res = eng.generate(PROMPTS[:2], 4, SamplingParams(stop_at_eos=False))
    t = eng.timings
    assert all(len(r.output_ids) == 4 for r in res)
    assert t.prefill_tokens == len(PROMPTS[0]) + len(PROMPTS[1])
    # the first new token comes from the prefill logits; 3 decode steps of 2 sequences follow
    assert t.decode_steps == 3
    assert t.decode_tokens == 6
    d = t.as_dict()
    assert d["prefill_s"] > 0 and d["decode_s"] > 0
    assert math.isclose(d["decode_tok_per_s"], 6 / d["decode_s"])


def test_zero_new_tokens(model):
    res = Engine(model, max_batch=2, max_seq_len=64).generate([[5, 6], [7]], 0)
    assert [r.output_ids for r in res] == [[], []]


def test_seeded_sampling_reproducible(model):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=11, stop_at_eos=False)
    a = Engine(model, max_batch=2, max_seq_len=64).generate([[5, 6, 7], [8]], 5, p)
    b = Engine(model, max_batch=2, max_seq_len=64).generate([[5, 6, 7], [8]], 5, p)
    assert [r.output_ids for r in a] == [r.output_ids for r in b]
    assert all(0 <= t < model.cfg.vocab_size for r in a for t in r.output_ids)


@pytest.mark.parametrize(
    "prompts,new,match",
    [([[]], 2, "empty"), ([[5, 512]], 2, "512"), ([[5, -1]], 2, "-1"), ([[5] * 60], 10, "max_seq_len"),
     ([[5]], -1, "max-new-tokens")],
)
def test_engine_rejects_bad_input(model, prompts, new, match):
    with pytest.raises(InputError, match=match):
        Engine(model, max_batch=2, max_seq_len=64).generate(prompts, new)
