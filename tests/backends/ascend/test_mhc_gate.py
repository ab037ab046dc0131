"""Ascend Triton kernels for mHC (hc_pre / hc_post / hc_head) and the MoE gate: what is specific to
the Ascend kernels (stream / D sub-tiles, empty and fp64 inputs, extreme logits, lowering cases).
The per-op cases over every backend are tests/conformance/test_ops.py.

The kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set before triton is
imported): numerics only; Ascend legality is the lowering check's job (backends.ascend.lowering).
Ground truth is the reference backend in fp64 on the same (already rounded) inputs; each kernel
result must be as close to it as the reference itself is in the working dtype, within a small floor.
"""

import pytest
import torch

from backends.ascend.kernels import gate, mhc
from backends.conformance import (
    REF,
    check_as_ref,
    gate_compare,
    gate_scores64,
    gate_truth,
    hc_check,
    hc_params,
    rng,
)

D64 = torch.float64
BF16 = torch.bfloat16
DTYPES = [torch.float32, BF16]
EPS = 1e-6


# ---------------------------------------------------------------- mHC
def _hc_check(X, fn, base, scale, iters, dtype):
    return hc_check(mhc.hc_pre, X, fn, base, scale, iters, dtype, eps=EPS)


@pytest.mark.parametrize("n", [2, 3])
def test_hc_pre_streams_not_filling_the_tile(n):
    """n < NP (padded stream / comb lanes must stay out of every softmax and Sinkhorn sum)."""
    D = 32
    r = rng(350 + n)
    _hc_check(r(20, n, D), *hc_params(r, n, D, (2 + n) * n), 20, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_pre_several_sub_tiles(dtype):
    n, D = 4, 640  # nD = 2560: 10 K sub-tiles of 256, D in 3 sub-tiles of 256 (the last one partial)
    r = rng(400)
    _hc_check(r(18, n, D).to(dtype), *hc_params(r, n, D, (2 + n) * n), 20, dtype)


def test_hc_post_several_d_tiles():
    n, D = 4, 2304  # 3 items per token at BLOCK_D 1024 (the last partial): item -> (token, tile) split
    r = rng(550)
    X, y = r(9, n, D).to(BF16), r(9, D).to(BF16)
    post, comb = 2 * torch.sigmoid(r(9, n)), torch.softmax(r(9, n, n), -1)
    truth = REF.hc_post(y.to(D64), X.to(D64), post.to(D64), comb.to(D64))
    check_as_ref(mhc.hc_post(y, X, post, comb), REF.hc_post(y, X, post, comb), truth, BF16, "hc_post wide")


def test_hc_empty_and_fp64_rejected():
    r = rng(1)
    n, D = 4, 32
    fn, base, scale = hc_params(r, n, D, (2 + n) * n)
    u, post, comb = mhc.hc_pre(torch.zeros(0, n, D), fn, base, scale, 20, EPS, EPS)
    assert u.shape == (0, D) and post.shape == (0, n) and comb.shape == (0, n, n)
    X = r(2, n, D)
    with pytest.raises(ValueError, match="float64"):
        mhc.hc_pre(X.double(), fn, base, scale, 20, EPS, EPS)
    with pytest.raises(ValueError, match="float64"):
        mhc.hc_head(X, fn[:n].double(), base[:n], scale[:1], EPS, EPS)
    with pytest.raises(ValueError, match="float64"):
        mhc.hc_post(r(2, D), X, torch.ones(2, n, dtype=D64), torch.ones(2, n, n))


# ---------------------------------------------------------------- MoE gate
def test_moe_gate_softplus_extreme_logits():
    """Logits from -60 to 80: no overflow, and tiny scores (sqrt(e^-60) ~ 1e-13) keep relative accuracy."""
    E, k, rs = 8, 2, 1.0
    z = torch.tensor([-60.0, -30.0, -5.0, 0.0, 5.0, 30.0, 60.0, 80.0])
    W = torch.diag(z)  # logits = z for the one-hot tokens below
    x = torch.eye(E)[[0, 0, 1, 7]]
    x[0], x[1] = 1.0, -1.0  # every logit at +z / -z
    tid2eid = torch.tensor([[0, 1], [1, 2], [6, 7], [0, 7]])
    toks = torch.arange(4)
    w, ids = gate.moe_gate(x, W, None, tid2eid, toks, k, rs)
    tw, tids = gate_truth(x, W, None, tid2eid, toks, k, rs)
    assert torch.isfinite(w).all() and torch.equal(ids, tids)
    torch.testing.assert_close(w.double(), tw, rtol=1e-5, atol=0)
    x2, b0 = x[:2], torch.zeros(E)  # the tie-free rows, through the top-k path
    out = gate.moe_gate(x2, W, b0, None, None, 3, rs)
    gate_compare(out, gate_truth(x2, W, b0, None, None, 3, rs), gate_scores64(x2, W))


def test_moe_gate_empty_and_fp64_rejected():
    W, bias = torch.randn(8, 32), torch.zeros(8)
    w, ids = gate.moe_gate(torch.zeros(0, 32), W, bias, None, None, 2, 1.0)
    assert w.shape == ids.shape == (0, 2)
    with pytest.raises(ValueError, match="float64"):
        gate.moe_gate(torch.zeros(2, 32, dtype=D64), W, bias, None, None, 2, 1.0)
    with pytest.raises(ValueError, match="float64"):
        gate.moe_gate(torch.zeros(2, 32), W, bias.double(), None, None, 2, 1.0)


def test_lowering_cases_cover_every_kernel():
    """Each module lists V4-Flash lowering cases whose signatures name every runtime argument."""
    import inspect

    for mod, kernels in ((mhc, {"_hc_collapse_kernel", "_hc_post_kernel"}),
                         (gate, {"_gate_logits_kernel", "_gate_select_kernel"})):
        seen = set()
        for case in mod.LOWERING_CASES:
            fn = case.fn.fn if hasattr(case.fn, "fn") else case.fn
            params = list(inspect.signature(fn).parameters)
            assert sorted(params) == sorted(list(case.signature) + list(case.constexprs)), case.name
            seen.add(fn.__name__)
        assert seen == kernels
