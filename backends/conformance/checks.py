"""The tolerance rules of the conformance tests. Ground truth is the reference backend in float64 on
the same (already rounded) inputs; a kernel must be as close to it as the reference itself is in the
working dtype, within a small floor (`check_as_ref`); selections (gate experts, indexer entries) must
be the float64 reference's up to near-ties at the cut."""

from __future__ import annotations

import torch

from backends.reference.ops import ReferenceOps

from .inputs import _same, cpu64

REF = ReferenceOps("cpu")
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
# check_as_ref: absolute floor on top of "as close as the reference in the working dtype",
# relative to max |truth|
FLOOR = {F32: 2e-6, BF16: 4e-3}


def check_as_ref(out, ref_lowp, truth, dtype, what=""):
    """|out - truth| <= 2 |ref_lowp - truth| + FLOOR * max|truth| (max norms), and dtypes match."""
    assert out.dtype == ref_lowp.dtype, f"{what}: dtype {out.dtype} != reference {ref_lowp.dtype}"
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    out, ref_lowp = cpu64(out), cpu64(ref_lowp)
    scale = float(truth.abs().max().clamp(min=1e-30))
    err = float((out - truth).abs().max())
    ref_err = float((ref_lowp - truth).abs().max())
    assert err <= 2 * ref_err + FLOOR[dtype] * scale, (
        f"{what}: err {err:.3g} vs reference's {ref_err:.3g} (scale {scale:.3g})"
    )


def check_rel(out, ref, dtype, what="", *, tol):
    """Finite, of `dtype`, and max |out - ref| <= tol[dtype] * max |ref|."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out = cpu64(out)
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    scale = float(ref.abs().max().clamp(min=1e-30))
    err = float((out - ref).abs().max())
    assert err <= tol[dtype] * scale, f"{what}: max err {err:.3g} > {tol[dtype]:g} x {scale:.3g}"


def hc_check(hc_pre, X, fn, base, scale, iters, dtype, to_device=_same, eps=1e-6):
    """hc_pre's (u, post, comb) against the reference's; returns the kernel's comb."""
    u, post, comb = hc_pre(*map(to_device, (X, fn, base, scale)), iters, eps, eps)
    lowp = REF.hc_pre(X, fn, base, scale, iters, eps, eps)
    truth = REF.hc_pre(X.to(F64), fn.to(F64), base.to(F64), scale.to(F64), iters, eps, eps)
    assert post.dtype == comb.dtype == torch.float32
    for name, a, b, c in zip(("u", "post", "comb"), (u, post, comb), lowp, truth):
        check_as_ref(a, b, c, dtype if name == "u" else torch.float32, f"hc_pre {name}")
    return comb


def gate_truth(x, W, bias, tid2eid, toks, k, rs):
    return REF.moe_gate(x.to(F64), W.to(F64), None if bias is None else bias.to(F64), tid2eid, toks, k, rs)


def gate_scores64(x, W):
    return torch.sqrt(torch.nn.functional.softplus(x.to(F64) @ W.to(F64).t()))


def gate_compare(out, truth, sel64):
    """Same expert sets as the fp64 reference, weights aligned by id, picks in descending sel order."""
    (w, ids), (tw, tids) = out, truth
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    w, ids = w.cpu(), ids.cpu()
    order, torder = ids.long().sort(-1), tids.long().sort(-1)
    assert torch.equal(order.values, torder.values), "selected experts differ"
    torch.testing.assert_close(w.gather(1, order.indices).double(), tw.gather(1, torder.indices), rtol=1e-5, atol=1e-6)
    picked = sel64.gather(1, ids.long())
    assert bool((picked[:, :-1] >= picked[:, 1:] - 1e-6).all()), "picks not in descending order"


def tie_free(sel, k):
    if k < sel.shape[1]:
        top = sel.topk(k + 1, dim=-1).values
        assert float((top[:, k - 1] - top[:, k]).min()) > 1e-5, "inputs must be tie-free at the selection boundary"


# max |out - truth| / max |truth| per kernel family: fp32 is summation order only; 16-bit adds the
# rounding of P before P V (as the official kernels do) and of the output
ATTENTION_TOL = {
    "cuda": {F32: 5e-6, BF16: 8e-3, torch.float16: 1.5e-3},
    "ascend": {F32: 1e-5, BF16: 1e-2, torch.float16: 2e-3},
}
ATTENTION_TOL["reference"] = ATTENTION_TOL["ascend"]


def attention_truth(q, wkv, widx, ckv, cidx, sink, scale):
    f = lambda t: None if t is None else t.detach().cpu().to(F64)  # noqa: E731
    i = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    return REF.attention(f(q), f(wkv), i(widx), f(ckv), i(cidx), f(sink), scale)


def run_attention(attention, tol, q, wkv, widx, ckv, cidx, sink, scale, what="", *, to_device=_same, **blocks):
    """attention(...) on to_device(inputs), checked with check_rel against attention_truth; returns it."""
    out = attention(*map(to_device, (q, wkv, widx, ckv, cidx, sink)), scale, **blocks)
    check_rel(out, attention_truth(q, wkv, widx, ckv, cidx, sink, scale), q.dtype, what, tol=tol)
    return out


def entry_scores64(q, w, pool, table, tok_slot, nvis):
    """fp64 scores [T, S] of every entry through the block table (-inf where invisible)."""
    T, _, d = q.shape
    bs = pool.shape[1]
    S = max(int(nvis.max()), 1) if T else 1
    ent = torch.arange(S)
    flat = pool.reshape(-1, d).double()
    blocks = table[tok_slot.long()[:, None], (ent[None, :] // bs).clamp(max=table.shape[1] - 1)].long()
    keys = flat[blocks * bs + ent[None, :] % bs]  # [T, S, d]
    s = (torch.relu(torch.einsum("thd,tsd->ths", q.double(), keys)) * w.double()[:, :, None]).sum(1)
    return s.masked_fill(ent[None, :] >= nvis[:, None], float("-inf"))


def check_indexer_topk(got, q, w, pool, table, tok_slot, positions, ratio, topk):
    """indexer_topk's picks against the reference in fp64: int32 [T, topk], valid picks first then -1,
    no duplicate or invisible pick, best first, and the same set as the reference's up to picks whose
    true scores sit within rounding (1e-5 of the row's largest |score|) of the cut; those may differ."""
    f64 = lambda t: t.to(F64) if t.is_floating_point() else t  # noqa: E731
    ref = REF.indexer_topk(f64(q), f64(w), f64(pool), table, tok_slot, positions, ratio, topk)
    got = got.cpu()
    assert got.dtype == torch.int32 and got.shape == ref.shape == (q.shape[0], topk)
    nvis = (positions + 1) // ratio
    scores = entry_scores64(q, w, pool, table, tok_slot, nvis)
    for t in range(q.shape[0]):
        g, r = got[t], ref[t]
        n = min(topk, int(nvis[t]))
        assert bool((g[:n] >= 0).all()) and bool((g[n:] == -1).all()), f"row {t}: valid picks first, then -1: {g}"
        assert bool((r[n:] == -1).all())
        gv, rv = g[:n].long(), r[:n].long()
        assert len(set(gv.tolist())) == n and bool((gv < nvis[t]).all()), f"row {t}: duplicate / invisible pick"
        if n == 0:
            continue
        gs, rs = scores[t, gv], scores[t, rv]
        tol = 1e-5 * float(scores[t, : int(nvis[t])].abs().max()) + 1e-6
        assert bool((gs[1:] <= gs[:-1] + tol).all()), f"row {t}: picks not best first: {gs}"
        torch.testing.assert_close(gs.sort().values, rs.sort().values, rtol=0, atol=tol)
        if set(gv.tolist()) != set(rv.tolist()):
            cut = float(rs.min())
            diff = set(gv.tolist()) ^ set(rv.tolist())
            assert all(abs(float(scores[t, s]) - cut) <= tol for s in diff), f"row {t}: picks differ {diff}"


def check_elementwise(got, ref, rtol, atol, what="", *, share_off=0.0):
    """|got - ref| <= atol + rtol |ref| elementwise, shapes equal; at most a share `share_off` of the
    elements may miss it (exact mode: an element on an e4m3 / e2m1 rounding boundary may round the
    other way after a last-bit difference upstream)."""
    got, ref = cpu64(got), cpu64(ref)
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    off = (got - ref).abs() > atol + rtol * ref.abs()
    assert float(off.double().mean()) <= share_off, (
        f"{what}: {int(off.sum())} of {off.numel()} elements off, max err {float((got - ref).abs().max()):.3g}"
    )


# the GEMMs' max |out - reference| / max |reference|, the reference in the same working dtype: the same
# roundings, summation order may move a bf16 result by an ulp; with act_quant such a flip upstream can
# move one FP8 code (MoE: h is quantised again before W2)
GEMM_TOL = {F32: 2e-6, BF16: 8e-3, torch.float16: 2e-3}
GEMM_TOL_ACT_QUANT = {F32: 2e-6, BF16: 2.5e-2, torch.float16: 1e-2}
# FP8 x FP8 on a Hopper GPU's tensor cores: the products are exact, but the MMA sums them with a
# short internal accumulator (~14 bits kept, DeepSeek-V3 report §3.3.2): measured 2.0e-4 on an
# H200 for fp32 activations at K = 288, where the interpreter (exact fp32 sums) stays at 2e-6
FP8_MMA_GPU_TOL = 1e-3
