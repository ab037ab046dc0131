"""Parity metrics on small hand-made tensors; every expected value is worked out by hand."""

import math

import pytest
import torch

from parity import metrics as M
from parity import profiles as P


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_cosine_of_orthogonal_halves():
    m = M.tensor_metrics(t(1, 0), t(1, 1))
    assert m["cosine"] == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    assert m["max_abs"] == 1.0
    assert M.tensor_metrics(t(1, 2), t(-1, -2))["cosine"] == pytest.approx(-1.0)


def test_errors_and_msprobe_ratios_on_a_hand_made_vector():
    # |b - a| = 5e-4, 4e-3, 0, 0.1 ; RE = |b - a| / |a| = 5e-4, 2e-3, 0, 0.2
    a = t(1.0, 2.0, -4.0, 0.5)
    b = t(1.0005, 2.004, -4.0, 0.6)
    m = M.tensor_metrics(a, b)
    assert m["max_abs"] == pytest.approx(0.1)
    assert m["max_rel"] == pytest.approx(0.2)
    assert m["share_1e3"] == 0.5  # 5e-4 and 0 are below 0.1%
    assert m["share_5e3"] == 0.75  # ... and 2e-3 below 0.5%
    assert m["scale"] == 4.0
    assert m["nmax"] == pytest.approx(0.1 / 4)
    assert m["nonfinite"] == 0


def test_zeros_and_non_finite_values():
    z = M.tensor_metrics(t(0, 0), t(0, 0))
    assert (z["cosine"], z["share_1e3"], z["max_rel"]) == (1.0, 1.0, 0.0)
    # a zero in A with a nonzero B is a huge relative error (msprobe's |N - B| / |B|)
    m = M.tensor_metrics(t(0, 1), t(1e-3, 1))
    assert m["max_rel"] == pytest.approx(1e-3 / M.REL_EPS)
    assert m["share_1e3"] == 0.5
    # -inf on both sides agrees (indexer padding); inf on one side only is flagged
    assert M.tensor_metrics(t(-math.inf, 1), t(-math.inf, 1))["share_1e3"] == 1.0
    assert M.tensor_metrics(t(1, math.inf), t(1, 2))["nonfinite"] == 1
    with pytest.raises(ValueError):
        M.tensor_metrics(t(1, 2), t(1, 2, 3))


def test_kl_top1_topk_of_hand_made_logits():
    # row 0: p_A = (1/2, 1/2), p_B = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    la = torch.log(t(0.5, 0.5, 1e-30)).view(1, 3)
    lb = torch.log(t(0.25, 0.75, 1e-30)).view(1, 3)
    m = M.logits_metrics(la, lb, k=2)
    assert m["kl"] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-9)
    assert m["top1"] == 0.0  # argmax A is index 0 (first of a tie), argmax B is index 1
    # a clean case: A ranks 0 > 1 > 2 > 3, B ranks 1 > 0 > 3 > 2
    a = t(4, 3, 2, 1).view(1, 4)
    b = t(3, 4, 1, 2).view(1, 4)
    m = M.logits_metrics(a, b, k=2)
    assert m["top1"] == 0.0 and m["topk"] == 1.0  # top-2 sets {0, 1} agree
    m3 = M.logits_metrics(a, b, k=3)
    assert m3["topk"] == pytest.approx(2 / 3)  # {0, 1, 2} vs {1, 0, 3}
    assert M.logits_metrics(a, a)["kl"] == 0.0


def test_kl_top1_where_argmax_differs():
    a = t(0.0, 1.0).view(1, 2)
    b = t(1.0, 0.0).view(1, 2)
    m = M.logits_metrics(a, b, k=1)
    assert m["top1"] == 0.0
    # KL of (s, 1-s) vs (1-s, s), s = sigmoid(-1): (1 - 2s) * ln((1 - s) / s) = (1 - 2s) * 1
    s = 1 / (1 + math.e)
    assert m["kl"] == pytest.approx((1 - 2 * s) * 1.0)


def test_greedy_agreement_and_first_divergence():
    m = M.greedy_metrics(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 5, 6]))
    assert m["agree"] == 0.5 and m["first_divergence"] == 2
    assert M.greedy_metrics(torch.tensor([1, 2]), torch.tensor([1, 2]))["first_divergence"] is None
    # near tie at the divergence: each token among the other's top-2
    la = torch.tensor([[0.0, 5.0, 4.9, 0.0]])
    lb = torch.tensor([[0.0, 4.9, 5.0, 0.0]])
    g = M.greedy_metrics(torch.tensor([1]), torch.tensor([2]), la, lb, k=2)
    assert g["benign"] is True
    far = torch.tensor([[9.0, 5.0, 4.9, 0.0]])  # B's token 0 is not in A's top-2 {1, 2}
    assert M.greedy_metrics(torch.tensor([1]), torch.tensor([0]), la, far, k=2)["benign"] is False


def test_set_overlap_ignores_order_and_minus_one():
    a = torch.tensor([[4, 3, 2, 1], [7, -1, -1, -1], [-1, -1, -1, -1]])
    b = torch.tensor([[1, 2, 3, 4], [7, -1, -1, -1], [-1, -1, -1, -1]])
    m = M.set_overlap(a, b)
    assert m["mean"] == 1.0 and m["rows_differ"] == 0
    assert m["rows"] == 3  # the all -1 row is counted as a row but not in the mean


def test_set_overlap_with_a_tie_at_the_cut():
    a = torch.tensor([[1, 2, 3, 4]])
    b = torch.tensor([[1, 2, 3, 5]])
    assert M.set_overlap(a, b)["mean"] == 0.75  # no scores: a swap is a miss
    sa = t(0.9, 0.8, 0.7, 0.5).view(1, 4)
    sb = t(0.9, 0.8, 0.7, 0.5).view(1, 4)  # entry 5 scores what entry 4 scored: a tie at the cut
    m = M.set_overlap(a, b, sa, sb, tie_rtol=1e-3)
    assert m["mean"] == 1.0 and m["ties"] == 1
    # B's extra entry clearly below A's cut: not a tie
    sb_low = t(0.9, 0.8, 0.7, 0.3).view(1, 4)
    assert M.set_overlap(a, b, sa, sb_low, tie_rtol=1e-3)["mean"] == 0.75
    # A swap of a pick that is not at the cut (entry 3 at 0.7 swapped) is not a tie either
    b2 = torch.tensor([[1, 2, 6, 4]])
    sb2 = t(0.9, 0.8, 0.5, 0.5).view(1, 4)
    assert M.set_overlap(a, b2, sa, sb2, tie_rtol=1e-3)["mean"] == 0.75


def test_set_overlap_dropped_pick_is_never_a_tie():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    b = torch.tensor([[1, 2, 3, -1], [1, 2, 3, 4]])
    sa = t(0.9, 0.8, 0.7, 0.5, 0.9, 0.8, 0.7, 0.5).view(2, 4)
    sb = t(0.9, 0.8, 0.7, -math.inf, 0.9, 0.8, 0.7, 0.5).view(2, 4)
    m = M.set_overlap(a, b, sa, sb, tie_rtol=1.0)
    assert m["mean"] == pytest.approx((0.75 + 1) / 2) and m["min_row"] == 0.75 and m["rows_differ"] == 1
    assert M.differing_rows(a, b).tolist() == [True, False]


def test_judge_and_noise_floor():
    p = P.get("fp32")
    good = M.tensor_metrics(t(1, 2, 3), t(1, 2, 3))
    assert P.judge("tensor", good, p) == []
    bad = M.tensor_metrics(t(1, 2, 3), t(1, 2, 3.3))
    assert "cos" in P.judge("tensor", bad, p) and "nmax" in P.judge("tensor", bad, p)
    # the same error is accepted when the backend's own run-to-run noise is that large
    assert P.judge("tensor", bad, p, floor=bad) == []
    assert P.default_for("float64", "bfloat16", "plain").name == "bf16"
    assert P.default_for("float64", "float32", "plain").name == "fp32"
    assert P.default_for("float64", "float32", "exact").name == "fp8-exact"
    # msprobe: cos 0.958 passes while MaxAbsErr <= 0.001, fails above it; cos < 0.9 always fails
    msp = P.get("msprobe")
    assert P.judge("tensor", M.tensor_metrics(t(1e-4, 0), t(1e-4, 3e-5)), msp) == []
    assert P.judge("tensor", M.tensor_metrics(t(1, 0), t(1, 0.3)), msp) == ["cos<0.99 & MaxAbsErr>0.001"]
    assert P.judge("tensor", M.tensor_metrics(t(1e-4, 0), t(0, 1e-4)), msp) == ["cos<0.9"]
