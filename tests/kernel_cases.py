"""Inputs and checks shared by the CUDA and the Ascend Triton-kernel tests (tests/backends/cuda/,
tests/backends/ascend/).

Device-independent: everything here builds CPU tensors and compares against the reference backend
on CPU. Where a kernel is called, the test passes it in, with a `to_device` callable for its
inputs. This module imports no Triton and no kernel module, so each test file still sets
TRITON_INTERPRET before the first triton import.
"""

from types import SimpleNamespace

import torch

from backends.reference.ops import ReferenceOps
from v4.batch import StepBatch
from v4.cache import entry_rows, visible_entry_rows, window_rows

REF = ReferenceOps("cpu")
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
W = 128  # V4 sliding window
# check_as_ref: absolute floor on top of "as close as the reference in the working dtype",
# relative to max |truth|
FLOOR = {F32: 2e-6, BF16: 4e-3}


def _same(t):
    return t


def gen(seed):
    """(generator, r): r(*shape, s=1.0, dtype=fp32) draws s * N(0, 1) from the seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return g, (lambda *shape, s=1.0, dtype=F32: (torch.randn(*shape, generator=g) * s).to(dtype))


def rng(seed):
    """gen(seed)'s draw function alone."""
    return gen(seed)[1]


def cpu64(t):
    return t.detach().cpu().to(F64) if t.is_floating_point() else t.detach().cpu()


# ---------------------------------------------------------------- checks against fp64 truth


def check_as_ref(out, ref_lowp, truth, dtype, what=""):
    """|out - truth| <= 2 |ref_lowp - truth| + FLOOR * max|truth| (max norms), and dtypes match."""
    assert out.dtype == ref_lowp.dtype, f"{what}: dtype {out.dtype} != reference {ref_lowp.dtype}"
    assert out.shape == truth.shape, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    out, ref_lowp = cpu64(out), cpu64(ref_lowp)
    scale = float(truth.abs().max().clamp(min=1e-30))
    err = float((out - truth).abs().max())
    ref_err = float((ref_lowp - truth).abs().max())
    assert err <= 2 * ref_err + FLOOR[dtype] * scale, \
        f"{what}: err {err:.3g} vs reference's {ref_err:.3g} (scale {scale:.3g})"


def check_rel(out, ref, dtype, what="", *, tol):
    """Finite, of `dtype`, and max |out - ref| <= tol[dtype] * max |ref|."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out = cpu64(out)
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    scale = float(ref.abs().max().clamp(min=1e-30))
    err = float((out - ref).abs().max())
    assert err <= tol[dtype] * scale, f"{what}: max err {err:.3g} > {tol[dtype]:g} x {scale:.3g}"


# ---------------------------------------------------------------- mHC


def hc_params(r, n, D, rows, n_scale=3):
    """fn [rows, n D], base [rows], scale: n_scale entries where rows > n (hc_pre), else one (hc_head)."""
    fn = r(rows, n * D, s=2.0 / (n * D) ** 0.5)
    return fn, r(rows, s=0.5), 0.5 + r(n_scale if rows > n else 1, s=0.1).abs()


def hc_check(hc_pre, X, fn, base, scale, iters, dtype, to_device=_same, eps=1e-6):
    """hc_pre's (u, post, comb) against the reference's; returns the kernel's comb."""
    u, post, comb = hc_pre(*map(to_device, (X, fn, base, scale)), iters, eps, eps)
    lowp = REF.hc_pre(X, fn, base, scale, iters, eps, eps)
    truth = REF.hc_pre(X.to(F64), fn.to(F64), base.to(F64), scale.to(F64), iters, eps, eps)
    assert post.dtype == comb.dtype == torch.float32
    for name, a, b, c in zip(("u", "post", "comb"), (u, post, comb), lowp, truth):
        check_as_ref(a, b, c, dtype if name == "u" else torch.float32, f"hc_pre {name}")
    return comb


# ---------------------------------------------------------------- MoE gate


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


# ---------------------------------------------------------------- sparse attention


def attention_truth(q, wkv, widx, ckv, cidx, sink, scale):
    f = lambda t: None if t is None else t.detach().cpu().to(F64)  # noqa: E731
    i = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    return REF.attention(f(q), f(wkv), i(widx), f(ckv), i(cidx), f(sink), scale)


def run_attention(attention, tol, q, wkv, widx, ckv, cidx, sink, scale, what="", *, to_device=_same, **blocks):
    """attention(...) on to_device(inputs), checked with check_rel against attention_truth; returns it."""
    out = attention(*map(to_device, (q, wkv, widx, ckv, cidx, sink)), scale, **blocks)
    check_rel(out, attention_truth(q, wkv, widx, ckv, cidx, sink, scale), q.dtype, what, tol=tol)
    return out


def paged_table(slots: int, entries: int, bs: int, g) -> SimpleNamespace:
    """A block table over a random permutation of the pool's blocks (entries scattered in the pool)."""
    nb = -(-entries // bs)
    phys = torch.randperm(slots * nb, generator=g).to(torch.int32).view(slots, nb)
    return SimpleNamespace(block_size=bs, table=phys, num_rows=slots * nb * bs)


def csa_logical(batch: StepBatch, ratio: int, topk: int, g, scatter: bool) -> torch.Tensor:
    """Indexer-like picks: a random subset of the visible entries, -1 padded (interspersed if scatter)."""
    out = torch.full((batch.num_tokens, topk), -1, dtype=torch.int32)
    for t, p in enumerate(batch.positions.tolist()):
        pick = torch.randperm((p + 1) // ratio, generator=g)[:topk]
        out[t, : pick.numel()] = pick.to(torch.int32)
        if scatter:
            out[t] = out[t, torch.randperm(topk, generator=g)]
    return out


def layer_inputs(batch: StepBatch, ring_slots: int, kind: str, d: int, dtype, seed: int, *,
                 ratio: int = 4, topk: int = 16, bs: int = 8, scatter: bool = False):
    """window_kv = cat(ring, new kv) with its indices, and the compressed pool with its indices.

    kind: "sliding" (comp None), "sliding0" (comp_idx with Kc = 0), "hca" (all visible entries;
    Kc = 0 while none is visible), "csa" (top-k picks, -1 padded; topk may exceed the visible count).
    """
    g, r = gen(seed)
    T = batch.num_tokens
    window_kv = r(ring_slots * W + T, d).to(dtype)
    window_idx = window_rows(batch, ring_slots, W)
    comp_kv, comp_idx = None, None
    if kind == "sliding0":
        comp_kv, comp_idx = r(4, d).to(dtype), torch.zeros(T, 0, dtype=torch.int32)
    elif kind in ("hca", "csa"):
        n_ent = int(((batch.positions + 1) // ratio).max()) + 1
        table = paged_table(max(batch.slots) + 1, n_ent, bs, g)
        comp_kv = r(table.num_rows, d).to(dtype)
        if kind == "hca":
            comp_idx = visible_entry_rows(batch, ratio, table)
        else:
            comp_idx = entry_rows(csa_logical(batch, ratio, topk, g, scatter), batch.tok_slot, table)
    return window_kv, window_idx, comp_kv, comp_idx


def qs(T, H, d, dtype, seed, s=1.0):
    """Queries [T, H, d] in dtype and fp32 sinks [H]."""
    _, r = gen(seed)
    return r(T, H, d, s=s).to(dtype), r(H, s=2.0)


# ---------------------------------------------------------------- lightning indexer


def random_table(g, slots, per_slot, spare=3):
    """Non-identity block table: a random permutation of the pool's blocks split among the slots."""
    nb = slots * per_slot + spare
    return torch.randperm(nb, generator=g)[: slots * per_slot].view(slots, per_slot).to(torch.int32), nb


def indexer_case(seed, T, H=16, d=32, slots=3, bs=12, max_pos=250, ratio=4, dtype=F32):
    """q [T, H, d], w [T, H], pool [nb, bs, d] behind a random block table, tok_slot, positions."""
    g, rnd = gen(seed)
    per = max(1, -(-((max_pos + 1) // ratio) // bs))
    table, nb = random_table(g, slots, per)
    pool = rnd(nb, bs, d, dtype=dtype)
    q = rnd(T, H, d, dtype=dtype)
    w = rnd(T, H, s=0.5)
    tok_slot = torch.randint(0, slots, (T,), generator=g)
    positions = torch.randint(0, max_pos + 1, (T,), generator=g)
    return q, w, pool, table, tok_slot, positions


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
