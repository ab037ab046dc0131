"""The small ops and the selections with Triton kernels (rms_norm, rope, hc_pre, hc_post, hc_head,
moe_gate, indexer_topk) over every backend with a kernel for them: reference, cuda (Triton;
interpreted on CPU without a GPU) and ascend (Triton-Ascend, interpreted). One parametrised test per
op over the one case set (backends/conformance/: `CASES[op]`), each case in each of its working
dtypes; attention, compress and the projections have their own modules here.

Ground truth is the reference backend in fp64 on the same (already rounded) inputs; each result
must be as close to it as the reference itself is in the working dtype, within a small floor
(`check_as_ref`). The gate's picks must be the fp64 reference's expert sets, the indexer's the fp64
reference's entries up to near-ties at the cut (`check_indexer_topk`).
"""

import pytest
import torch

from backends.conformance import (
    F64,
    REF,
    check_as_ref,
    check_indexer_topk,
    gate_compare,
    gate_scores64,
    gate_truth,
    hc_check,
    impl,
    tie_free,
)
from tests.conformance.harness import device_of, f64, inputs, params


def _run(op, backend, case, dtype):
    args, kwargs = inputs(case, dtype)
    out = impl(op, backend)(*map(device_of(backend), args), **kwargs)
    return args, kwargs, out


def _as_ref(op, backend, case, dtype):
    args, kwargs, out = _run(op, backend, case, dtype)
    lowp = getattr(REF, op)(*args, **kwargs)
    check_as_ref(out, lowp, getattr(REF, op)(*f64(args), **kwargs), dtype, f"{op} {case.name}")
    return args, kwargs, out, lowp


@pytest.mark.parametrize("backend,case,dtype", params("rms_norm"))
def test_rms_norm(backend, case, dtype):
    _as_ref("rms_norm", backend, case, dtype)


@pytest.mark.parametrize("backend,case,dtype", params("rope"))
def test_rope(backend, case, dtype):
    args, _, out, lowp = _as_ref("rope", backend, case, dtype)
    # same fp32 formula for the angle: matches the reference in the working dtype tightly
    # (bf16: at most a rounding flip, one unit in the last place)
    tol = dict(rtol=0, atol=4e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-5)
    torch.testing.assert_close(out.cpu(), lowp, **tol)
    nope = case.extra["nope"]
    assert torch.equal(out.cpu()[..., :nope], args[0][..., :nope]), "nope dims must be copied unchanged"


@pytest.mark.parametrize("backend,case,dtype", params("hc_pre"))
def test_hc_pre(backend, case, dtype):
    (X, fn, base, scale, iters, eps, _), _ = inputs(case, dtype)
    comb = hc_check(impl("hc_pre", backend), X, fn, base, scale, iters, dtype, to_device=device_of(backend), eps=eps)
    if case.extra["sums"]:
        T, n = X.shape[:2]
        # the last Sinkhorn step normalises columns; rows converge more slowly
        torch.testing.assert_close(comb.cpu().sum(-2), torch.ones(T, n), rtol=0, atol=1e-4)
        torch.testing.assert_close(comb.cpu().sum(-1), torch.ones(T, n), rtol=0, atol=2e-2)


@pytest.mark.parametrize("backend,case,dtype", params("hc_post"))
def test_hc_post(backend, case, dtype):
    _as_ref("hc_post", backend, case, dtype)


@pytest.mark.parametrize("backend,case,dtype", params("hc_head"))
def test_hc_head(backend, case, dtype):
    _as_ref("hc_head", backend, case, dtype)


@pytest.mark.parametrize("backend,case,dtype", params("moe_gate"))
def test_moe_gate(backend, case, dtype):
    (x, W, bias, tid2eid, toks, k, rs), _, (w, ids) = _run("moe_gate", backend, case, dtype)
    w, ids = w.cpu(), ids.cpu()
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    if case.extra.get("ties"):
        assert torch.equal(ids, torch.arange(k, dtype=torch.int32).expand(x.shape[0], k))
        torch.testing.assert_close(w, torch.full((x.shape[0], k), rs / k))
        return
    if case.extra.get("hash"):
        tw, tids = gate_truth(x, W, None, tid2eid.long(), toks.long(), k, rs)
        assert torch.equal(ids, tids)  # hash order is the table's
        torch.testing.assert_close(w.double(), tw, rtol=1e-5, atol=1e-6)
        return
    s = gate_scores64(x, W)
    sel = s + bias.to(F64)
    if "steer_from" in case.extra or case.extra.get("tie_free"):
        tie_free(sel, k)
    gate_compare((w, ids), gate_truth(x, W, bias, None, None, k, rs), sel)
    if x.shape[0] >= case.extra.get("steer_from", 1 << 30):  # enough tokens that some pick must differ
        unbiased = s.topk(k, dim=-1).indices.sort(-1).values
        assert not torch.equal(unbiased, ids.long().sort(-1).values), "the bias should steer some picks"
    if case.extra.get("all"):
        assert torch.equal(ids.long().sort(-1).values, torch.arange(k).expand(x.shape[0], k))


@pytest.mark.parametrize("backend,case,dtype", params("indexer_topk"))
def test_indexer_topk(backend, case, dtype):
    args, kwargs, got = _run("indexer_topk", backend, case, dtype)
    q, w, pool, table, tok_slot, positions, ratio, topk = args
    check_indexer_topk(got, *args)
    got = got.cpu()
    if case.extra.get("mixed"):
        assert bool((got[:3] == -1).all()) and int((got[3] >= 0).sum()) == 1
    if case.extra.get("none_visible"):
        assert bool((got == -1).all())
        empty = impl("indexer_topk", backend)(*map(device_of(backend), (q[:0], w[:0], pool, table, tok_slot[:0],
                                                                 positions[:0], ratio, topk)))
        assert empty.shape == (0, topk) and empty.dtype == torch.int32
    if case.extra.get("own_rows"):
        assert got[0].tolist() != got[1].tolist()
