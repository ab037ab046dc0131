"""The conformance cases: one case set for every op, read by the tests (tests/conformance/), by
`dsv4 parity ops` (parity/opcheck.py) and by the kernel benches (bench/cuda_kernels*.py).

Three parts, all device-independent (CPU tensors, compared against the reference backend on CPU):

- Checks and input builders (`check_as_ref`, `check_rel`, `hc_check`, `gate_compare`, `layer_inputs`,
  `indexer_case`, ...): the tolerance rules of the kernel tests. Ground truth is the reference in
  float64 on the same (already rounded) inputs; a kernel must be as close to it as the reference
  itself is in the working dtype, within a small floor (`check_as_ref`).
- `KERNEL_CASES[op]`: the kernel-level cases (`KernelCase`) that tests/conformance/ runs over every
  backend that has a kernel for the op (`IMPLS`: reference, cuda interpreted, ascend emulated).
- `BOUNDARY_CASES[op](g, mode)`: the op-level boundary cases of `dsv4 parity ops` (token counts
  1, 3, 4, 5, 127, 128, 129, windows closing at a step's edge, empty pools, -1 indices, packed
  sequences, decode rows), each yielding (case name, args as [(role, value)], kwargs, comparator).

No Triton and no kernel module is imported at module level (callers decide TRITON_INTERPRET first);
`IMPLS` imports the kernels when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch

from backends.reference.ops import ReferenceOps
from v4.batch import StepBatch
from v4.cache import entry_rows, visible_entry_rows, window_rows
from v4.ops import CompressSpec, DecodeRows


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


def layer_inputs(
    batch: StepBatch,
    ring_slots: int,
    kind: str,
    d: int,
    dtype,
    seed: int,
    *,
    ratio: int = 4,
    topk: int = 16,
    bs: int = 8,
    scatter: bool = False,
):
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


# ================================================================ boundary cases of `dsv4 parity ops`
LENGTHS = (1, 3, 4, 5, 127, 128, 129)
H, HD, ROPE, DM, NHC = 4, 128, 64, 64, 4  # heads, head dim, rope dims, hidden, mHC streams


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * std


# ---------------------------------------------------------------------------------------- cases
# Each case builder yields (case name, args as [(role, value)], kwargs, comparator name); the
# comparator turns (truth outputs, B outputs, truth inputs) into metrics.


def _cases_rms_norm(g, mode):
    for T in LENGTHS:
        yield f"T={T}", [("D", _randn(g, T, DM) * 3), ("acc", 1 + _randn(g, DM, std=0.1)), ("raw", 1e-6)], {}, "tensor"
    yield "T=5,no weight", [("D", _randn(g, 5, H, HD)), ("raw", None), ("raw", 1e-6)], {}, "tensor"


def _inv_freq():
    from v4.config import yarn_inv_freq

    return yarn_inv_freq(
        ROPE, 160000.0, {"factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}
    )


def _cases_rope(g, mode):
    for T in LENGTHS:
        for inverse in (False, True):
            pos = torch.arange(T) + int(torch.randint(0, 5000, (1,), generator=g))
            yield (
                f"T={T},{'inverse' if inverse else 'forward'}",
                [("D", _randn(g, T, H, HD)), ("raw", pos), ("acc", _inv_freq())],
                {"inverse": inverse},
                "tensor",
            )


def _cases_linear(g, mode):
    for T in LENGTHS:
        yield (
            f"T={T}",
            [("D", _randn(g, T, DM)), ("W", _randn(g, 96, DM, std=DM**-0.5))],
            {"act_quant": mode == "exact"},
            "tensor",
        )


def _cases_grouped_out_proj(g, mode):
    G, R = 2, 16
    for T in LENGTHS:
        yield (
            f"T={T}",
            [
                ("D", _randn(g, T, H * HD)),
                ("W", _randn(g, G * R, H * HD // G, std=(H * HD // G) ** -0.5)),
                ("W", _randn(g, DM, G * R, std=(G * R) ** -0.5)),
                ("raw", G),
            ],
            {"act_quant": mode == "exact"},
            "tensor",
        )


def _hc_params(g, rows):
    return [("acc", _randn(g, rows, NHC * DM, std=(NHC * DM) ** -0.5)), ("acc", _randn(g, rows, std=0.1))]


def _cases_hc_pre(g, mode):
    for T in LENGTHS:
        fn, base = _hc_params(g, (2 + NHC) * NHC)
        yield (
            f"T={T}",
            [
                ("D", _randn(g, T, NHC, DM)),
                fn,
                base,
                ("acc", 1 + _randn(g, 3, std=0.1)),
                ("raw", 20),
                ("raw", 1e-6),
                ("raw", 1e-6),
            ],
            {},
            "tensor",
        )


def _cases_hc_post(g, mode):
    for T in LENGTHS:
        comb = torch.softmax(_randn(g, T, NHC, NHC), -1)
        yield (
            f"T={T}",
            [
                ("D", _randn(g, T, DM)),
                ("D", _randn(g, T, NHC, DM)),
                ("acc", 2 * torch.sigmoid(_randn(g, T, NHC))),
                ("acc", comb),
            ],
            {},
            "tensor",
        )


def _cases_hc_head(g, mode):
    for T in LENGTHS:
        fn, base = _hc_params(g, NHC)
        yield (
            f"T={T}",
            [("D", _randn(g, T, NHC, DM)), fn, base, ("acc", 1 + _randn(g, 1, std=0.1)), ("raw", 1e-6), ("raw", 1e-6)],
            {},
            "tensor",
        )


def _cases_compress(g, mode):
    """Per case: a list of sequences (start, n) in one packed call, with random partial-window
    state for sequences that start mid-window."""
    bs = 16  # pool block size: 129 tokens at ratio 4 = 32 entries span 2 blocks
    plans = [[(0, T)] for T in LENGTHS] + [
        [(3, 1)],  # the window closes at this step's only token
        [(4, 1)],  # one token after a close: nothing emitted
        [(6, 7)],  # starts mid-window, closes one, leaves a partial one
        [(0, 1), (15, 1), (2, 129), (0, 5)],  # several sequences in one packed call
    ]
    quant = {"overlap": "fp4" if mode == "exact" else "none", "plain": "fp8" if mode == "exact" else "none"}
    for m, overlap in ((4, True), (16, False), (128, False)):
        for seqs in plans:
            if m == 128 and max(s + n for s, n in seqs) < 100:
                continue  # ratio 128 only matters where a window can close
            k = 2 if overlap else 1
            c = HD
            slots = len(seqs)
            T = sum(n for _, n in seqs)
            max_e = max((s + n) // m for s, n in seqs) + 1
            nb = -(-max_e // bs)
            table = (
                torch.arange(slots * nb, dtype=torch.int32).view(slots, nb).flip(1).contiguous()
            )  # non-trivial paging
            state_kv, state_score = (
                torch.zeros(slots, k * m, k * c, dtype=torch.float64),
                torch.zeros(slots, k * m, k * c, dtype=torch.float64),
            )
            for slot, (s, _) in enumerate(seqs):
                state_kv[slot] = _randn(g, k * m, k * c)
                state_score[slot] = _randn(g, k * m, k * c)
            packed, off = [], 0
            for slot, (s, n) in enumerate(seqs):
                packed.append((slot, s, n, off))
                off += n
            spec = CompressSpec(m, c, overlap, quant["overlap" if overlap else "plain"], ROPE, 1e-6)
            name = f"m={m},seqs={[(s, n) for s, n in seqs]}"
            yield (
                name,
                [
                    ("acc", _randn(g, T, k * c)),
                    ("acc", _randn(g, T, k * c)),
                    ("acc", _randn(g, m, k * c, std=0.1)),
                    ("raw", spec),
                    ("acc", 1 + _randn(g, c, std=0.1)),
                    ("acc", _inv_freq()),
                    ("acc", state_kv),
                    ("acc", state_score),
                    ("D", torch.zeros(slots * nb, bs, c, dtype=torch.float64)),
                    ("raw", table),
                    ("raw", packed),
                ],
                {},
                "compress",
            )
        # decode form (DecodeRows, what a captured decode step passes): one token per sequence, the
        # first window closing, a sequence's first token, a later window closing, mid-window
        k = 2 if overlap else 1
        pos = [m - 1, 0, 5 * m + m - 1, 3 * m + 1]
        slots = len(pos)
        nb = -(-(max(pos) // m + 1) // bs)
        table = torch.arange(slots * nb, dtype=torch.int32).view(slots, nb).flip(1).contiguous()
        spec = CompressSpec(m, HD, overlap, quant["overlap" if overlap else "plain"], ROPE, 1e-6)
        yield (
            f"m={m},decode rows at {pos}",
            [
                ("acc", _randn(g, slots, k * HD)),
                ("acc", _randn(g, slots, k * HD)),
                ("acc", _randn(g, m, k * HD, std=0.1)),
                ("raw", spec),
                ("acc", 1 + _randn(g, HD, std=0.1)),
                ("acc", _inv_freq()),
                ("acc", _randn(g, slots, k * m, k * HD)),
                ("acc", _randn(g, slots, k * m, k * HD)),
                ("D", torch.zeros(slots * nb, bs, HD, dtype=torch.float64)),
                ("raw", table),
                ("rows", DecodeRows(torch.tensor([2, 0, 3, 1]), torch.tensor([pos[2], pos[0], pos[3], pos[1]]))),
            ],
            {},
            "compress",
        )


def _cases_indexer_topk(g, mode):
    Hi, Di, bs = 8, 128, 16
    for T, start, topk, m in [
        (1, 0, 4, 4),
        (3, 0, 4, 4),
        (4, 0, 4, 4),
        (5, 0, 4, 4),
        (5, 0, 8, 4),
        (127, 0, 8, 4),
        (128, 0, 8, 4),
        (129, 0, 8, 4),
        (1, 128, 16, 4),
        (3, 1, 4, 4),
        (129, 0, 4, 128),
        (17, 0, 2, 16),
    ]:
        # one sequence, positions start .. start+T-1; pool filled for every entry that may be visible
        n_ent = (start + T) // m
        nb = max(1, -(-n_ent // bs))
        table = torch.arange(nb, dtype=torch.int32).flip(0).view(1, nb).contiguous()
        pos = torch.arange(start, start + T)
        name = f"T={T},start={start},topk={topk},ratio={m},entries={n_ent}" + (" (empty pool)" if n_ent == 0 else "")
        yield (
            name,
            [
                ("D", _randn(g, T, Hi, Di)),
                ("acc", _randn(g, T, Hi, std=(Di * Hi) ** -0.5)),
                ("D", _randn(g, nb, bs, Di)),
                ("raw", table),
                ("raw", torch.zeros(T, dtype=torch.long)),
                ("raw", pos),
                ("raw", m),
                ("raw", topk),
            ],
            {},
            "indexer",
        )
    # two sequences packed in one call
    T1, T2 = 5, 129
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    yield (
        "two sequences T=5,129",
        [
            ("D", _randn(g, T1 + T2, Hi, Di)),
            ("acc", _randn(g, T1 + T2, Hi, std=(Di * Hi) ** -0.5)),
            ("D", _randn(g, 4, bs, Di)),
            ("raw", table),
            ("raw", torch.cat([torch.zeros(T1, dtype=torch.long), torch.ones(T2, dtype=torch.long)])),
            ("raw", torch.cat([torch.arange(T1), torch.arange(T2)])),
            ("raw", 4),
            ("raw", 8),
        ],
        {},
        "indexer",
    )


def _cases_attention(g, mode):
    W = 16
    for T in LENGTHS:
        for comp in ("none", "some", "empty"):
            pos = torch.arange(T)
            p = pos[:, None] - torch.arange(W)[None, :]
            widx = torch.where(p >= 0, p, -1).to(torch.int32)  # the window just closed / is still filling
            Nc = 40
            if comp == "none":
                cidx, ckv = None, None
            elif comp == "empty":
                cidx, ckv = torch.full((T, 4), -1, dtype=torch.int32), _randn(g, Nc, HD)
            else:
                cidx = torch.randint(0, Nc, (T, 8), generator=g, dtype=torch.int32)
                cidx[torch.rand(T, 8, generator=g) < 0.3] = -1
                ckv = _randn(g, Nc, HD)
            yield (
                f"T={T},compressed={comp}",
                [
                    ("D", _randn(g, T, H, HD)),
                    ("D", _randn(g, T, HD)),
                    ("raw", widx),
                    ("D", ckv),
                    ("raw", cidx),
                    ("acc", _randn(g, H)),
                    ("raw", HD**-0.5),
                ],
                {},
                "tensor",
            )


def _cases_moe_gate(g, mode):
    E, k, V = 8, 2, 512
    for T in LENGTHS:
        for hashed in (False, True):
            ids = torch.randint(0, V, (T,), generator=g)
            tid2eid = torch.argsort(torch.rand(V, E, generator=g), 1)[:, :k].contiguous() if hashed else None
            yield (
                f"T={T},{'hash' if hashed else 'bias top-k'}",
                [
                    ("D", _randn(g, T, DM)),
                    ("acc", _randn(g, E, DM, std=DM**-0.5)),
                    ("acc", None if hashed else _randn(g, E, std=0.1)),
                    ("raw", tid2eid),
                    ("raw", ids),
                    ("raw", k),
                    ("raw", 1.5),
                ],
                {},
                "gate",
            )


def _cases_moe_experts(g, mode):
    E, k, I = 8, 2, 64  # noqa: E741
    for T in LENGTHS:
        for shared in (True, False):
            ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
            w = torch.softmax(_randn(g, T, k), -1) * 1.5
            # per-expert stored weights (W1, W3 [I, D], W2 [D, I]), brought into each backend's
            # form by its own prepare_experts, as the model does
            routed = (
                [_randn(g, I, DM, std=DM**-0.5) for _ in range(E)],
                [_randn(g, I, DM, std=DM**-0.5) for _ in range(E)],
                [_randn(g, DM, I, std=I**-0.5) for _ in range(E)],
            )
            sh = (
                ([_randn(g, I, DM, std=DM**-0.5)], [_randn(g, I, DM, std=DM**-0.5)], [_randn(g, DM, I, std=I**-0.5)])
                if shared
                else None
            )
            yield (
                f"T={T},{'shared' if shared else 'no shared'}",
                [
                    ("D", _randn(g, T, DM) * 2),
                    ("raw", ids),
                    ("acc", w),
                    ("experts", routed),
                    ("shared", sh),
                    ("raw", 10.0),
                ],
                {"act_quant": mode == "exact"},
                "tensor",
            )


BOUNDARY_CASES = {
    "rms_norm": _cases_rms_norm,
    "rope": _cases_rope,
    "hc_pre": _cases_hc_pre,
    "hc_post": _cases_hc_post,
    "hc_head": _cases_hc_head,
    "compress": _cases_compress,
    "indexer_topk": _cases_indexer_topk,
    "attention": _cases_attention,
    "moe_gate": _cases_moe_gate,
    "moe_experts": _cases_moe_experts,
    "linear": _cases_linear,
    "grouped_out_proj": _cases_grouped_out_proj,
}


# ================================================================ kernel cases (tests/conformance/)
TOKENS = (1, 3, 4, 5, 127, 128, 129)  # around 16-token blocks, the 128 window and a persistent loop's wrap
DTYPES = (F32, BF16)
EPS = 1e-6


@dataclass(frozen=True)
class KernelCase:
    """One input set of an op: `build()` -> (args, kwargs) on CPU in the working dtype `dtype`;
    `extra` holds what the op's check needs beyond the inputs (selection size, expected behaviour)."""

    op: str
    name: str
    dtype: torch.dtype
    build: Callable[[], tuple]
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name


def _dt(dtype) -> str:
    return {F32: "f32", BF16: "bf16"}[dtype]


def _rms_norm_cases():
    def tokens(T, dtype):
        r = rng(T)
        return (r(T, 96, s=3.0) + 0.5).to(dtype), (1 + r(96, s=0.2)).to(dtype), 1e-6

    for T in TOKENS:
        for dt in DTYPES:
            yield KernelCase("rms_norm", f"T={T},{_dt(dt)}", dt, lambda T=T, dt=dt: (tokens(T, dt), {}))
    for dt in DTYPES:  # [T, H, d]: per-head norm, no weight
        yield KernelCase("rms_norm", f"heads unweighted,{_dt(dt)}", dt,
                         lambda dt=dt: ((rng(1)(5, 3, 64).to(dt), None, 1e-6), {}))


def _rope_inv_freq(r=64, base=10000.0):
    return (1.0 / base ** (torch.arange(0, r, 2, dtype=F64) / r)).float()


def _rope_cases():
    def build(T, dtype, inverse):
        x = rng(100 + T)(T, 3, 96).to(dtype)  # [T, H, d]: 32 nope dims, 64 rope dims
        pos = torch.randint(0, 70000, (T,), generator=torch.Generator().manual_seed(T))
        return (x, pos, _rope_inv_freq(), inverse), {}

    for T in TOKENS:
        for dt in DTYPES:
            for inverse in (False, True):
                yield KernelCase("rope", f"T={T},{_dt(dt)},{'inverse' if inverse else 'forward'}", dt,
                                 lambda T=T, dt=dt, inv=inverse: build(T, dt, inv), {"nope": 32})


def _hc_pre_cases():
    """D 96 (not a power of two: masked tiles) and 64, 20 Sinkhorn iterations; 1 and 2 iterations."""
    def build(T, D, dtype, iters, seed, n_scale):
        n = 4
        r = rng(seed)
        X = r(T, n, D).to(dtype)
        return (X, *hc_params(r, n, D, (2 + n) * n, n_scale), iters, EPS, EPS), {}

    for D, n_scale in ((96, 6), (64, 3)):  # hc_pre reads the first 3 scales
        for T in TOKENS:
            for dt in DTYPES:
                yield KernelCase("hc_pre", f"T={T},D={D},{_dt(dt)}", dt,
                                 lambda T=T, D=D, dt=dt, ns=n_scale: build(T, D, dt, 20, 200 + T, ns), {"sums": True})
    for iters in (1, 2):
        yield KernelCase("hc_pre", f"T=5,D=64,iters={iters}", F32,
                         lambda it=iters: build(5, 64, F32, it, 300 + it, 3), {"sums": False})


def _hc_post_cases():
    def build(T, dtype):
        n, D = 4, 96  # D not a power of two: the D tile is masked
        r = rng(500 + T)
        X, y = r(T, n, D).to(dtype), r(T, D).to(dtype)
        post = 2 * torch.sigmoid(r(T, n))
        comb = torch.softmax(r(T, n, n), -1)
        return (y, X, post, comb), {}

    for T in TOKENS:
        for dt in DTYPES:
            yield KernelCase("hc_post", f"T={T},{_dt(dt)}", dt, lambda T=T, dt=dt: build(T, dt))


def _hc_head_cases():
    def build(T, D, dtype):
        n = 4
        r = rng(600 + T)
        X = r(T, n, D).to(dtype)
        return (X, *hc_params(r, n, D, n), EPS, EPS), {}

    for D in (96, 64):
        for T in (1, 4, 5, 129):
            for dt in DTYPES:
                yield KernelCase("hc_head", f"T={T},D={D},{_dt(dt)}", dt, lambda T=T, D=D, dt=dt: build(T, D, dt))


def _moe_gate_cases():
    """Bias top-k (64 experts top-6 and 8 top-2; the bias is as large as the score spread, so it
    steers picks from `steer_from` tokens on), bf16 weights (16-bit dot path; expert counts that are
    not a block multiple), top-k = every expert, hash routing (int64 and int32 tables), full ties."""
    def topk(T, E, D, k, dtype, seed=None):
        r = rng(700 + T if seed is None else seed)
        x, W = r(T, D).to(dtype), r(E, D, s=D ** -0.5)
        return (x, W, r(E, s=0.3), None, None, k, 1.5), {}

    for E, D, k, steer_from in ((64, 96, 6, 4), (8, 64, 2, 127)):
        for T in TOKENS:
            for dt in DTYPES:
                yield KernelCase("moe_gate", f"T={T},E={E},top{k},{_dt(dt)}", dt,
                                 lambda T=T, E=E, D=D, k=k, dt=dt: topk(T, E, D, k, dt), {"steer_from": steer_from})

    def bf16_weight(T, E, D, k, rs, sb):
        r = rng(800)
        x, W, bias = r(T, D).to(BF16), r(E, D, s=D ** -0.5).to(BF16), r(E, s=sb)
        return (x, W, bias, None, None, k, rs), {}

    for T, E, D, k, rs, sb in ((20, 8, 64, 2, 1.5, 0.1), (5, 384, 256, 8, 2.5, 0.1), (20, 40, 160, 6, 2.5, 0.1)):
        yield KernelCase("moe_gate", f"bf16 weight T={T},E={E},D={D},top{k}", BF16,
                         lambda a=(T, E, D, k, rs, sb): bf16_weight(*a), {"tie_free": E < 64})

    def all_experts():
        E, D = 8, 64
        r = rng(750)
        return (r(7, D), r(E, D, s=D ** -0.5), r(E, s=0.3), None, None, E, 2.0), {}

    yield KernelCase("moe_gate", "top-k = all 8 experts", F32, all_experts, {"all": True})

    def hashed(T, E, D, k, index_dtype):
        r = rng(900 + T)
        x, W = r(T, D).to(BF16), r(E, D, s=D ** -0.5)
        g = torch.Generator().manual_seed(T)
        tid2eid = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(50)])  # int64 [V, k]
        toks = torch.randint(0, 50, (T,), generator=g)
        return (x, W, None, tid2eid.to(index_dtype), toks.to(index_dtype), k, 1.5), {}

    for E, D, k in ((64, 96, 6), (8, 64, 2)):
        for T in (1, 5, 129):
            for idt in (torch.int64, torch.int32):
                yield KernelCase("moe_gate", f"hash T={T},E={E},top{k},{str(idt)[6:]}", BF16,
                                 lambda a=(T, E, D, k, idt): hashed(*a), {"hash": True})

    def ties():
        E, D, k = 64, 96, 6
        # every score is sqrt(ln 2): a full tie
        return (torch.zeros(3, D), torch.randn(E, D, generator=torch.Generator().manual_seed(0)), torch.zeros(E),
                None, None, k, 1.5), {}

    yield KernelCase("moe_gate", "full tie: lowest index first", F32, ties, {"ties": True})


def _indexer_topk_cases():
    """Boundary token counts (few tokens reach ~175 entries over several tiles and gathered rows,
    many tokens ~60), mixed visibility with 8 heads, nothing visible and an empty batch, a top-k
    wider than the pool, a prefill chunk of one slot, slots reading their own table rows, bf16.
    Index heads of width 64 and 32 (the kernel families' test sizes before the merge)."""
    def case(name, seed, T, topk, extra=None, edit=None, **kw):
        def build():
            q, w, pool, table, tok_slot, positions = indexer_case(seed, T, **kw)
            if edit is not None:
                q, w, tok_slot, positions = edit(q, w, tok_slot, positions)
            return (q, w, pool, table, tok_slot, positions, 4, topk), {}
        return KernelCase("indexer_topk", name, kw.get("dtype", F32), build, extra or {})

    def mixed(q, w, tok_slot, positions):
        positions[:6] = torch.tensor([0, 1, 2, 3, 4, 7])  # 0, 0, 0, 1, 1, 2 visible entries
        return q, w, tok_slot, positions

    def twins(q, w, tok_slot, positions):
        q[1], w[1] = q[0], w[0]  # identical queries, different keys behind each slot's table
        return q, w, torch.tensor([0, 1]), torch.tensor([47, 47])

    for d, seeds in ((64, (7, 8, 9, 10, 11)), (32, (7, 8, 10, 12, None))):
        for T in TOKENS:
            yield case(f"T={T},d={d}", 100 + T, T, 24, d=d, max_pos=700 if T <= 5 else 250)
        yield case(f"mixed visibility 8 heads,d={d // 2}", seeds[0], 40, 16, {"mixed": True}, mixed,
                   H=8, d=d // 2, slots=4, bs=5, max_pos=160)
        yield case(f"nothing visible,d={d}", seeds[1], 6, 8, {"none_visible": True}, d=d, max_pos=2)
        yield case(f"top-k wider than the pool,d={d}", seeds[2], 9, 64, d=d, max_pos=37, bs=4)
        yield case(f"slots read their own table rows,d={d}", seeds[3], 2, 5, {"own_rows": True}, twins,
                   d=d, slots=2, bs=3, max_pos=47)
        if seeds[4] is not None:
            yield case(f"bf16 T=5,d={d}", seeds[4], 5, 24, d=d, max_pos=400, dtype=BF16)

    def prefix():
        g, rnd = gen(11)
        table, nb = random_table(g, 1, 8)
        pool = rnd(nb, 8, 32)
        T = 30
        q, w = rnd(T, 16, 32), rnd(T, 16, s=0.5)
        return (q, w, pool, table, torch.zeros(T, dtype=torch.long), torch.arange(100, 100 + T), 4, 26), {}

    yield KernelCase("indexer_topk", "one slot's prefill chunk: each token its own prefix", F32, prefix)


def _attention_cases():
    """Prefill of one sequence from position 0 at the boundary token counts: window rows before 0 are
    -1; HCA entries j < (t+1)//4, none at all for T < 4 (the model then passes comp_idx with Kc = 0).
    Head dims 128 and 32 (the kernel families' test sizes before the merge); bf16 at d = 32 skips 127
    and 128 (the boundaries do not depend on the dtype; the interpreter pays ~3 s per long prefill)."""
    def build(T, d, dtype):
        batch = StepBatch([0], [0], [T], torch.device("cpu"))
        wkv, widx, ckv, cidx = layer_inputs(batch, 1, "hca", d, dtype, seed=T)
        assert (widx < 0).any() and (T >= 4) == (cidx.shape[1] > 0)
        q, sink = qs(T, 8 if T < 100 else 4, d, dtype, seed=100 + T)
        return (q, wkv, widx, ckv, cidx, sink, d ** -0.5), {}

    for d, grid in ((128, [(T, dt) for T in TOKENS for dt in DTYPES]),
                    (32, [(T, F32) for T in TOKENS] + [(T, BF16) for T in (1, 3, 4, 5, 129)])):
        for T, dt in grid:
            # long prefills: one 128-index chunk per list where the tiles allow it (the interpreter pays
            # per chunk); Ascend's Unified Buffer holds a 128-row chunk up to d = 64
            long = {"block_k": 128} if T > 100 else {}
            blocks = {"cuda": long, "ascend": long if d <= 64 else {}}
            yield KernelCase("attention", f"prefill T={T},d={d},{_dt(dt)}", dt, lambda T=T, d=d, dt=dt: build(T, d, dt),
                             {"blocks": blocks})


# max |out - truth| / max |truth| per kernel family: fp32 is summation order only; 16-bit adds the
# rounding of P before P V (as the official kernels do) and of the output
ATTENTION_TOL = {
    "cuda": {F32: 5e-6, BF16: 8e-3, torch.float16: 1.5e-3},
    "ascend": {F32: 1e-5, BF16: 1e-2, torch.float16: 2e-3},
}
ATTENTION_TOL["reference"] = ATTENTION_TOL["ascend"]


KERNEL_CASES: dict[str, list[KernelCase]] = {
    "rms_norm": list(_rms_norm_cases()),
    "rope": list(_rope_cases()),
    "hc_pre": list(_hc_pre_cases()),
    "hc_post": list(_hc_post_cases()),
    "hc_head": list(_hc_head_cases()),
    "moe_gate": list(_moe_gate_cases()),
    "indexer_topk": list(_indexer_topk_cases()),
    "attention": list(_attention_cases()),
}

# which backend has a kernel for which op: the tests run every case over each of them
KERNEL_MODULES = {
    "rms_norm": {"cuda": "backends.cuda.kernels.norm_rope"},
    "rope": {"cuda": "backends.cuda.kernels.norm_rope"},
    "hc_pre": {"cuda": "backends.cuda.kernels.mhc", "ascend": "backends.ascend.kernels.mhc"},
    "hc_post": {"cuda": "backends.cuda.kernels.mhc", "ascend": "backends.ascend.kernels.mhc"},
    "hc_head": {"cuda": "backends.cuda.kernels.mhc", "ascend": "backends.ascend.kernels.mhc"},
    "moe_gate": {"cuda": "backends.cuda.kernels.gate", "ascend": "backends.ascend.kernels.gate"},
    "indexer_topk": {"cuda": "backends.cuda.kernels.indexer", "ascend": "backends.ascend.kernels.indexer"},
    "attention": {"cuda": "backends.cuda.kernels.attention", "ascend": "backends.ascend.kernels.attention"},
}


def backends_of(op: str) -> list[str]:
    return ["reference", *KERNEL_MODULES[op]]


def impl(op: str, backend: str) -> Callable:
    """The op's function in `backend`: the reference op, or the backend's Triton kernel (imported here)."""
    if backend == "reference":
        return getattr(REF, op)
    import importlib

    return getattr(importlib.import_module(KERNEL_MODULES[op][backend]), op)


# ================================================================ sizes of the kernel benches
# The benches (bench/cuda_kernels*.py) run their cases at these sizes: V4-Flash, or tiny ones for
# --smoke; the tests above keep interpreter-sized shapes.
@dataclass
class Shapes:
    """Everything a case's size depends on: V4-Flash values, or tiny ones for --smoke."""

    heads: int  # attention query heads
    head_dim: int
    topk: int  # CSA top-k compressed entries per query
    window: int  # sliding window
    csa_ratio: int
    hca_ratio: int
    batches: list  # decode batch sizes (queries, one per sequence)
    contexts: list  # decode context lengths
    prefill_queries: int  # attention prefill: queries of one sequence
    prefill_context: int
    idx_heads: int
    idx_dim: int
    block_size: int  # entries per page of the compressed / indexer pools
    hidden: int
    hc_n: int
    prefill_tokens: int  # hc / norm / rope / gate prefill size
    compress_tokens: int
    compress_idx_dim: int
    experts: int
    moe_topk: int
    moe_inter: int
    moe_prefill: list
    moe_decode: list
    linear: dict  # name -> (N, K)
    linear_tokens: list


FLASH = Shapes(
    heads=64, head_dim=512, topk=512, window=128, csa_ratio=4, hca_ratio=128,
    batches=[1, 32, 128], contexts=[8192, 65536, 1048576], prefill_queries=4096, prefill_context=8192,
    idx_heads=64, idx_dim=128, block_size=64,
    hidden=4096, hc_n=4, prefill_tokens=4096,
    compress_tokens=8192, compress_idx_dim=128,
    experts=256, moe_topk=6, moe_inter=2048, moe_prefill=[4096, 16384], moe_decode=[1, 32, 128],
    # Flash projections (q_lora 1024, 64 x 512 heads, o_groups 8 x rank 1024, indexer 64 x 128)
    linear={"wq_a": (1024, 4096), "wq_b": (32768, 1024), "wkv": (512, 4096), "wo_b": (4096, 8192),
            "idx.wq_b": (8192, 1024)},
    linear_tokens=[1, 128, 4096],
)

SMOKE = Shapes(
    heads=16, head_dim=128, topk=16, window=8, csa_ratio=4, hca_ratio=16,
    batches=[1, 3], contexts=[128, 512], prefill_queries=16, prefill_context=128,
    idx_heads=8, idx_dim=32, block_size=16,
    hidden=64, hc_n=4, prefill_tokens=9,
    compress_tokens=64, compress_idx_dim=128,
    experts=8, moe_topk=2, moe_inter=64, moe_prefill=[24], moe_decode=[1, 3],
    linear={"wq_a": (128, 256), "wkv": (64, 256)},
    linear_tokens=[1, 5],
)
