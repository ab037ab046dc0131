"""Speculative decoding's drafting and rejection sampling (v4/engine/rejection_sampler.py), checked
against independent math: hand-built greedy cases, and a chi-square test that speculative decoding
of a toy Markov "language model" emits tokens distributed exactly as plain sampling from the target
(with a negative control showing the test would catch a wrong verifier)."""

from __future__ import annotations

import math

import pytest
import torch

from v4.engine import SamplingParams
from v4.engine.rejection_sampler import propose, shaped_probs, verify

NEG = float("-inf")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- chi-square


def _chi2_sf(stat: float, df: int) -> float:
    """Survival function of the chi-square distribution: the regularized upper incomplete gamma."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _chi2_test(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float, int]:
    """Goodness of fit of counts to probs (same shape): (statistic, df, p-value, draws outside the support).

    Cells of probability 0 are left out of the statistic; any draw there makes the p-value 0."""
    n = counts.sum()
    support = probs > 0
    outside = int(counts[~support].sum())
    expected = probs[support] * n
    assert float(expected.min()) >= 5, "too few expected draws per cell for the chi-square approximation"
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    return stat, df, (0.0 if outside else _chi2_sf(stat, df)), outside


@pytest.mark.parametrize("df,critical,alpha", [(1, 3.841459, 0.05), (10, 29.58830, 1e-3), (24, 51.17860, 1e-3),
                                               (15, 37.69730, 1e-3), (3, 16.26624, 1e-3)])
def test_chi2_sf_matches_the_tables(df, critical, alpha):
    assert _chi2_sf(critical, df) == pytest.approx(alpha, rel=1e-4)


def test_chi2_sf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 4, 15, 24):
        for x in (0.5, 10.0, 40.0, 90.0):
            assert _chi2_sf(x, df) == pytest.approx(float(stats.chi2.sf(x, df)), rel=1e-9, abs=1e-300)


# ----------------------------------------------------------------------------- greedy


def _rows(argmaxes, V=6, runner_up=None):
    """Logits [n, V] whose row i peaks at argmaxes[i] (3.0), runner_up[i] next (2.0), the rest in (0, 1)."""
    x = torch.rand(len(argmaxes), V, generator=_gen(7))
    for i, a in enumerate(argmaxes):
        x[i, a] = 3.0
        if runner_up is not None:
            x[i, runner_up[i]] = 2.0
    return x


GREEDY = SamplingParams(temperature=0.0)


def test_greedy_all_accepted_adds_the_bonus_argmax():
    rows = _rows([2, 4, 1, 5])
    assert verify(rows, [2, 4, 1], None, GREEDY, None) == [2, 4, 1, 5]


@pytest.mark.parametrize("drafts,want", [([3, 4, 1], [2]), ([2, 3, 1], [2, 4]), ([2, 4, 0], [2, 4, 1])])
def test_greedy_first_mismatch_emits_the_argmax_there_and_stops(drafts, want):
    assert verify(_rows([2, 4, 1, 5]), drafts, None, GREEDY, None) == want


def test_greedy_no_drafts_is_plain_argmax():
    assert verify(_rows([3]), [], None, GREEDY, None) == [3]


def test_greedy_banned_ids_are_skipped_per_position():
    rows = _rows([2, 4, 1, 5], runner_up=[0, 0, 3, 2])
    # 4 banned at position 1 only: the target's choice there is the runner-up 0
    banned = [[], [4], [], []]
    assert verify(rows, [2, 4, 1], None, GREEDY, None, banned) == [2, 0]
    assert verify(rows, [2, 0, 1], None, GREEDY, None, banned) == [2, 0, 1, 5]
    # banned at the bonus position
    assert verify(rows, [2, 4, 1], None, GREEDY, None, [[], [], [], [5, 0]]) == [2, 4, 1, 2]


def test_greedy_propose_is_the_argmax_without_banned_ids_and_draws_nothing():
    row = _rows([4], runner_up=[1])[0]
    g = _gen(0)
    before = g.get_state()
    assert propose(row, GREEDY, g) == (4, None)
    assert propose(row, GREEDY, g, banned=[4]) == (1, None)
    verify(_rows([2, 4]), [2], [torch.full((6,), 1 / 6)], GREEDY, g)
    assert torch.equal(g.get_state(), before)


def test_argmax_drafts_are_one_hot_on_the_shaped_argmax():
    row = _rows([4], runner_up=[1])[0]
    p = SamplingParams(temperature=0.8, top_k=3)
    tok, q = propose(row, p, _gen(0), banned=[4], argmax=True)
    assert tok == 1 and q.dtype == torch.float64 and q.tolist() == [float(i == 1) for i in range(6)]


def test_sampled_propose_returns_the_shaped_distribution_it_drew_from():
    row = torch.tensor([0.0, 1.0, 2.0, 0.5, -1.0], dtype=torch.float64)
    p = SamplingParams(temperature=0.5, top_k=3)
    w = [math.exp(2 * v) for v in (0.0, 1.0, 2.0, 0.5)]  # T = 0.5 squares exp(x); top-3 keeps 2, 1, 3
    want = torch.tensor([0.0, w[1], w[2], w[3], 0.0], dtype=torch.float64)
    want /= want.sum()
    g = _gen(3)
    counts = torch.zeros(5, dtype=torch.float64)
    for _ in range(3000):
        tok, q = propose(row, p, g, banned=[])
        counts[tok] += 1
    assert torch.allclose(q, want, atol=1e-12)
    stat, df, pv, outside = _chi2_test(counts, want)
    assert outside == 0 and pv > 1e-3, (stat, df, pv)
    # with 2 banned, the mass moves to the others
    tok, q = propose(row, p, g, banned=[2])
    w2 = torch.tensor([math.exp(0.0), w[1], 0.0, w[3], 0.0], dtype=torch.float64)
    assert torch.allclose(q, w2 / w2.sum(), atol=1e-12) and tok != 2


# ----------------------------------------------------------------------------- a toy language model

V = 5
EOS = 0


def _markov(seed: int, scale: float) -> torch.Tensor:
    """A conditional table T[prev, x] = P(x | prev) over V tokens (rows sum to 1), fixed by the seed."""
    return (scale * torch.randn(V, V, generator=_gen(seed), dtype=torch.float64)).softmax(-1)


TARGET = _markov(11, 0.8)  # p(x | prev)
DRAFT = _markov(12, 0.8)  # q(x | prev), a different model
CONTEXT = 3


def _reference_row(probs: list[float], p: SamplingParams, banned: list[int]) -> list[float]:
    """The shaped target distribution from a probability row, by hand (no shape_logits): banned ids
    removed, temperature as probs ** (1 / T), top-k on that, then top-p (the smallest prefix, sorted
    by probability, whose mass reaches top_p) on the renormalised top-k distribution."""
    w = [0.0 if i in banned else pr ** (1 / p.temperature) for i, pr in enumerate(probs)]
    order = sorted(range(len(w)), key=lambda i: -w[i])
    if p.top_k > 0:
        for i in order[p.top_k:]:
            w[i] = 0.0
    s = sum(w)
    w = [v / s for v in w]
    if p.top_p < 1:
        mass = 0.0
        for i in order:
            if mass >= p.top_p:
                w[i] = 0.0
            else:
                mass += w[i]
    s = sum(w)
    return [v / s for v in w]


def _banned_at(n_out: int, min_tokens: int) -> list[int]:
    """What the engine bans at the position where n_out tokens are already out: EOS before min_tokens."""
    return [EOS] if n_out < min_tokens else []


def _reference_pairs(p: SamplingParams, min_tokens: int) -> torch.Tensor:
    """Exact P(x1, x2) [V, V] of the first two tokens after CONTEXT, sampling one by one from the target."""
    first = _reference_row(TARGET[CONTEXT].tolist(), p, _banned_at(0, min_tokens))
    out = torch.zeros(V, V, dtype=torch.float64)
    for x1 in range(V):
        out[x1] = first[x1] * torch.tensor(_reference_row(TARGET[x1].tolist(), p, _banned_at(1, min_tokens)),
                                           dtype=torch.float64)
    return out


def _speculate_two(k, p, g, min_tokens, argmax_drafts, verifier):
    """The first two tokens after CONTEXT, decoded speculatively the way the engine would: draft k tokens
    autoregressively from the draft model, score the k + 1 prefixes with the target, verify, repeat."""
    out, last = [], CONTEXT
    log_p, log_q = TARGET.log(), DRAFT.log()
    while len(out) < 2:
        drafts, qs, prev = [], [], last
        for i in range(k):
            d, q = propose(log_q[prev], p, g, _banned_at(len(out) + i, min_tokens), argmax=argmax_drafts)
            drafts.append(d)
            qs.append(q)
            prev = d
        rows = log_p[[last] + drafts]  # row i: the target's logits after the token before draft position i
        banned = [_banned_at(len(out) + i, min_tokens) for i in range(k + 1)]
        emitted = verifier(rows, drafts, qs, p, g, banned)
        assert 1 <= len(emitted) <= k + 1 and emitted[:-1] == drafts[:len(emitted) - 1]
        out += emitted
        last = out[-1]
    return out[:2]


def _pair_counts(k, p, n, seed, min_tokens=0, argmax_drafts=False, verifier=verify):
    g = _gen(seed)
    counts = torch.zeros(V, V, dtype=torch.float64)
    for _ in range(n):
        x1, x2 = _speculate_two(k, p, g, min_tokens, argmax_drafts, verifier)
        counts[x1, x2] += 1
    return counts


def test_reference_shaping_agrees_with_shape_logits():
    for p in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
              SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=0.9, top_k=4, top_p=0.7)):
        for banned in ([], [EOS]):
            got = shaped_probs(TARGET.log(), p, [banned] * V)
            want = torch.tensor([_reference_row(TARGET[i].tolist(), p, banned) for i in range(V)], dtype=torch.float64)
            assert torch.allclose(got, want, atol=1e-12), (p, banned)


# (k, params, min_tokens, argmax drafts, draws): every case emits the target's own pair distribution
LOSSLESS = {
    "k1-T1": (1, SamplingParams(temperature=1.0), 0, False, 6000),
    "k2-T0.7-topk3": (2, SamplingParams(temperature=0.7, top_k=3), 0, False, 5000),
    "k3-T1.3-topp0.8-min_tokens1": (3, SamplingParams(temperature=1.3, top_p=0.8, min_tokens=1), 1, False, 4000),
    "k2-T1-argmax-drafts": (2, SamplingParams(temperature=1.0), 0, True, 5000),
    "k3-T0.9-topk4-topp0.9-argmax-drafts": (3, SamplingParams(temperature=0.9, top_k=4, top_p=0.9), 0, True, 3500),
}


@pytest.mark.parametrize("case", list(LOSSLESS))
def test_speculative_decoding_is_lossless(case):
    k, p, min_tokens, argmax_drafts, n = LOSSLESS[case]
    counts = _pair_counts(k, p, n, seed=1000 + k, min_tokens=min_tokens, argmax_drafts=argmax_drafts)
    stat, df, pv, outside = _chi2_test(counts, _reference_pairs(p, min_tokens))
    print(f"{case}: chi2 = {stat:.2f}, df = {df}, p = {pv:.3g}, n = {n}")
    assert outside == 0, "a token outside the shaped target's support (cut by top-k / top-p, or banned)"
    assert pv > 1e-3, (stat, df, pv)


def _accept_always(rows, drafts, qs, p, g, banned):
    """Wrong on purpose: every draft is kept, then a bonus token from the target."""
    bonus = shaped_probs(rows[-1:], p, banned[-1:])[0]
    return list(drafts) + [int(torch.multinomial(bonus, 1, generator=g))]


def _resample_from_target(rows, drafts, qs, p, g, banned):
    """Wrong on purpose, subtly: the right acceptance test, but a rejection resamples from p, not max(0, p - q)."""
    ps = shaped_probs(rows, p, banned)
    for i, d in enumerate(drafts):
        if float(torch.rand(1, generator=g, dtype=torch.float64)) * float(qs[i][d]) >= float(ps[i, d]):
            return list(drafts[:i]) + [int(torch.multinomial(ps[i], 1, generator=g))]
    return list(drafts) + [int(torch.multinomial(ps[-1], 1, generator=g))]


@pytest.mark.parametrize("wrong", [_accept_always, _resample_from_target])
def test_the_chi_square_test_catches_a_wrong_verifier(wrong):
    p = SamplingParams(temperature=1.0)
    counts = _pair_counts(2, p, 5000, seed=77, verifier=wrong)
    stat, df, pv, _ = _chi2_test(counts, _reference_pairs(p, 0))
    print(f"{wrong.__name__}: chi2 = {stat:.2f}, df = {df}, p = {pv:.3g}")
    assert pv < 1e-9, (stat, df, pv)


# ----------------------------------------------------------------------------- seeds and acceptance


def _run(seed, n=300):
    g = _gen(seed)
    p = SamplingParams(temperature=1.0, top_p=0.95)
    return [_speculate_two(2, p, g, 0, False, verify) for _ in range(n)]


def test_same_seed_same_outputs_different_seeds_differ():
    a, b, c = _run(5), _run(5), _run(6)
    assert a == b
    assert a != c


def test_verify_draws_the_same_amount_whatever_is_accepted():
    """The generator advances by torch.rand(k) and one multinomial, whether 0 or all drafts are accepted."""
    p = SamplingParams(temperature=1.0)
    states, lengths = set(), set()
    for seed in range(40):
        drafts = [4, 3] if seed % 2 else [0, 3]  # after CONTEXT: p/q = 0.06 then 0.31, or 2.7 then 0.87
        rows = TARGET.log()[[CONTEXT] + drafts]
        q = [DRAFT[CONTEXT], DRAFT[drafts[0]]]
        g, g0 = _gen(seed), _gen(seed)
        lengths.add(len(verify(rows, drafts, q, p, g)))
        torch.rand(2, generator=g0, dtype=torch.float64)
        torch.multinomial(torch.full((V,), 1 / V, dtype=torch.float64), 1, generator=g0)
        states.add(torch.equal(g.get_state(), g0.get_state()))
    assert lengths == {1, 2, 3} and states == {True}


def test_no_draft_probs_means_one_hot_drafts_and_no_drafts_means_plain_sampling():
    p = SamplingParams(temperature=1.0, top_k=4)
    rows = TARGET.log()[[CONTEXT, 4, 3]]
    one_hot = [torch.eye(V, dtype=torch.float64)[4], torch.eye(V, dtype=torch.float64)[3]]
    for seed in range(20):
        assert verify(rows, [4, 3], None, p, _gen(seed)) == verify(rows, [4, 3], one_hot, p, _gen(seed))
        g = _gen(seed)
        torch.rand(0, generator=g, dtype=torch.float64)
        want = int(torch.multinomial(shaped_probs(rows[:1], p)[0], 1, generator=g))
        assert verify(rows[:1], [], None, p, _gen(seed)) == [want]


@pytest.mark.parametrize("argmax_drafts", [False, True])
def test_acceptance_rate_matches_the_formula(argmax_drafts):
    """k = 1: a sampled draft is accepted with probability sum_x min(p(x), q(x)); an argmax draft d with p(d)."""
    params = SamplingParams(temperature=1.0)
    prow, qrow = TARGET[2], DRAFT[2]
    want = float(prow[qrow.argmax()]) if argmax_drafts else float(torch.minimum(prow, qrow).sum())
    n, g = 10000, _gen(2024)
    rows = torch.stack([prow.log(), TARGET[0].log()])
    accepted = 0
    for _ in range(n):
        d, q = propose(qrow.log(), params, g, argmax=argmax_drafts)
        rows[1] = TARGET[d].log()
        accepted += len(verify(rows, [d], [q], params, g)) == 2
    sigma = math.sqrt(want * (1 - want) / n)
    z = abs(accepted / n - want) / sigma
    print(f"argmax={argmax_drafts}: acceptance {accepted / n:.4f}, formula {want:.4f}, {z:.2f} sigma")
    assert abs(accepted / n - want) < 5 * sigma
