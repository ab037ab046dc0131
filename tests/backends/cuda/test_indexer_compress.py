"""CUDA-backend Triton kernels for the lightning indexer and the compressor against the reference ops.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set here
before triton is imported); with one they run on it. The reference backend on CPU is ground truth,
fed the same inputs.

indexer_topk: the picks are compared as sets per query (order among equal scores is not
meaningful); where the sets differ the differing picks must tie in score, and the sorted scores
of the picks must agree. compress: fed as one prefill and as chunks / decode steps; states must be
identical, entries and pool rows equal to fp32 rounding (exact-mode fake quant may flip a rare
element sitting on a rounding boundary, so a 1% allowance applies there).
"""

from functools import partial

import pytest
import torch

from backends.cuda.kernels.compress import compress
from backends.cuda.kernels.indexer import indexer_topk
from backends.conformance_cases import REF, entry_scores64, gen, indexer_case, random_table
from v4.ops import CompressSpec

pytestmark = pytest.mark.gpu  # bench/gpu_check.sh runs these natively on a GPU

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


def dev(t):
    return t.to(DEV)


# ============================================================================ indexer
def _check_topk(got, q, w, pool, table, tok_slot, positions, ratio, topk):
    ref = REF.indexer_topk(q, w, pool, table, tok_slot, positions, ratio, topk)
    got = got.cpu()
    assert got.dtype == torch.int32 and got.shape == ref.shape == (q.shape[0], topk)
    nvis = (positions + 1) // ratio
    scores = entry_scores64(q, w, pool, table, tok_slot, nvis)
    for t in range(q.shape[0]):
        g, r = got[t], ref[t]
        gv, rv = g[g >= 0].long(), r[r >= 0].long()
        n = min(topk, int(nvis[t]))
        assert len(gv) == len(rv) == n, (t, g, r)
        assert bool((g[n:] == -1).all()), "valid picks first, then -1 padding"
        assert len(set(gv.tolist())) == n and bool((gv < nvis[t]).all())
        if n == 0:
            continue
        gs, rs = scores[t, gv], scores[t, rv]
        tol = 1e-5 * float(scores[t, : int(nvis[t])].abs().max()) + 1e-6
        # best first, and the same scores as the reference's picks (the same set up to exact ties)
        assert bool((gs[1:] <= gs[:-1] + tol).all()), gs
        torch.testing.assert_close(gs.sort().values, rs.sort().values, rtol=0, atol=tol)
        if set(gv.tolist()) != set(rv.tolist()):
            cut = float(rs.min())
            diff = set(gv.tolist()) ^ set(rv.tolist())
            assert all(abs(float(scores[t, s]) - cut) <= tol for s in diff), (t, diff)


_indexer_case = partial(indexer_case, d=64)


@pytest.mark.parametrize("T", [1, 3, 4, 5, 127, 128, 129])
def test_indexer_topk_matches_reference(T):
    # small batches reach up to ~175 entries (3 tiles of 64, 15 blocks of 12); large ones one tile
    max_pos = 700 if T <= 5 else 250
    q, w, pool, table, tok_slot, positions = _indexer_case(100 + T, T, max_pos=max_pos)
    got = indexer_topk(dev(q), dev(w), dev(pool), dev(table), dev(tok_slot), dev(positions), 4, 24)
    _check_topk(got, q, w, pool, table, tok_slot, positions, 4, 24)


def test_indexer_eight_heads_and_mixed_visibility():
    q, w, pool, table, tok_slot, positions = _indexer_case(7, 40, H=8, d=32, slots=4, bs=5, max_pos=160)
    positions[:6] = torch.tensor([0, 1, 2, 3, 4, 7])  # 0, 0, 0, 1, 1, 2 visible entries
    got = indexer_topk(dev(q), dev(w), dev(pool), dev(table), dev(tok_slot), dev(positions), 4, 16)
    _check_topk(got, q, w, pool, table, tok_slot, positions, 4, 16)


def test_indexer_no_visible_entries_and_empty_batch():
    q, w, pool, table, tok_slot, positions = _indexer_case(8, 6, max_pos=2)
    got = indexer_topk(dev(q), dev(w), dev(pool), dev(table), dev(tok_slot), dev(positions), 4, 8)
    assert got.dtype == torch.int32 and got.shape == (6, 8) and bool((got == -1).all())
    got = indexer_topk(dev(q[:0]), dev(w[:0]), dev(pool), dev(table), dev(tok_slot[:0]), dev(positions[:0]), 4, 8)
    assert got.shape == (0, 8)


def test_indexer_topk_wider_than_the_pool():
    q, w, pool, table, tok_slot, positions = _indexer_case(9, 9, max_pos=37, bs=4)
    got = indexer_topk(dev(q), dev(w), dev(pool), dev(table), dev(tok_slot), dev(positions), 4, 64)
    _check_topk(got, q, w, pool, table, tok_slot, positions, 4, 64)


def test_indexer_slots_read_their_own_block_table_rows():
    # two slots with identical queries but different keys: their picks must follow their own tables
    q, w, pool, table, _, _ = _indexer_case(10, 2, slots=2, bs=3, max_pos=47)
    q[1], w[1] = q[0], w[0]
    tok_slot, positions = torch.tensor([0, 1]), torch.tensor([47, 47])
    got = indexer_topk(dev(q), dev(w), dev(pool), dev(table), dev(tok_slot), dev(positions), 4, 5)
    _check_topk(got, q, w, pool, table, tok_slot, positions, 4, 5)
    assert got[0].tolist() != got[1].tolist()


def test_indexer_bf16_operands():
    q, w, pool, table, tok_slot, positions = _indexer_case(11, 5, max_pos=400, dtype=BF16)
    got = indexer_topk(dev(q), dev(w), dev(pool), dev(table), dev(tok_slot), dev(positions), 4, 24)
    _check_topk(got, q, w, pool, table, tok_slot, positions, 4, 24)


# ============================================================================ compress
C, ROPE = 128, 64


def _spec(m, quant="none", c=C):
    return CompressSpec(m, c, m == 4, quant, ROPE, 1e-6)


def _compress_inputs(seed, spec, slots, tokens, start, bs, dtype=F32):
    """Per-slot token streams (kv, score), ape, norm weight, inv_freq and a random block table."""
    g, rnd = gen(seed)
    K = 2 if spec.overlap else 1
    streams = [(rnd(tokens, K * spec.dim, dtype=dtype), rnd(tokens, K * spec.dim, s=2.0, dtype=dtype))
               for _ in range(slots)]
    ape = rnd(spec.ratio, K * spec.dim, s=0.5, dtype=dtype)
    norm_w = (1.0 + 0.1 * rnd(spec.dim)).to(dtype)
    inv = (1.0 / 10000.0 ** (torch.arange(ROPE // 2, dtype=F64) / (ROPE // 2))).to(dtype)
    per = -(-((max(start) + tokens) // spec.ratio + 1) // bs)
    table, nb = random_table(g, slots, per)
    return streams, ape, norm_w, inv, table, nb


def _assert_entries(got, ref, quant, dtype):
    got, ref = got.cpu(), ref.cpu()
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if ref.numel() == 0:
        return
    if dtype == BF16:
        rtol, atol = 2 ** -7, 1e-3  # one bf16 ulp where fp32 rounding before the cast differs
    elif dtype == F64:
        rtol, atol = 1e-12, 1e-12
    else:
        rtol, atol = 1e-5, 1e-5
    close = (got.double() - ref.double()).abs() <= atol + rtol * ref.double().abs()
    if quant == "none":
        assert bool(close.all()), f"max err {(got.double() - ref.double()).abs().max():.3g}"
    else:  # an element on an e4m3 / e2m1 rounding boundary may round the other way
        assert float((~close).double().mean()) <= 0.01, f"{int((~close).sum())} of {close.numel()} differ"


def _run_both(spec, steps, *, seed=0, slots=1, start=None, bs=3, dtype=F32, tokens=None):
    """Feed the same steps to the reference (CPU) and the kernels (DEV) in lockstep; compare every step.

    steps: list of batches, each a list of (slot, n_new); start: first position of each slot.
    """
    start = list(start or [0] * slots)
    tokens = tokens or max(sum(n for st in steps for s, n in st if s == k) for k in range(slots))
    streams, ape, norm_w, inv, table, nb = _compress_inputs(seed, spec, slots, tokens, start, bs, dtype)
    K, m, c = (2 if spec.overlap else 1), spec.ratio, spec.dim
    acc = F64 if dtype == F64 else F32
    # each side starts from the same (zero) state; a slot starting at start > 0 reads that state
    # as its earlier tokens, identically on both sides
    r_skv = torch.zeros(slots, K * m, K * c, dtype=acc)
    r_sz = torch.zeros_like(r_skv)
    r_pool = torch.zeros(nb, bs, c, dtype=dtype)
    k_skv, k_sz, k_pool = dev(r_skv).clone(), dev(r_sz).clone(), dev(r_pool).clone()  # own copies on CPU too
    used = [0] * slots
    for step in steps:
        kv, z, seqs, off = [], [], [], 0
        for slot, n in step:
            kv.append(streams[slot][0][used[slot]:used[slot] + n].to(acc))
            z.append(streams[slot][1][used[slot]:used[slot] + n].to(acc))
            seqs.append((slot, start[slot], n, off))
            off += n
            used[slot] += n
            start[slot] += n
        kv, z = torch.cat(kv), torch.cat(z)
        ref = REF.compress(kv, z, ape.to(acc), spec, norm_w, inv, r_skv, r_sz, r_pool, table, seqs)
        got = compress(dev(kv), dev(z), dev(ape.to(acc)), spec, dev(norm_w), dev(inv), k_skv, k_sz, k_pool,
                       dev(table), seqs)
        _assert_entries(got, ref, spec.quant, dtype)
        assert torch.equal(k_skv.cpu(), r_skv) and torch.equal(k_sz.cpu(), r_sz), "compressor state differs"
        _assert_entries(k_pool, r_pool, spec.quant, dtype)
    return r_pool


@pytest.mark.parametrize("quant", ["none", "fp8", "fp4"])
@pytest.mark.parametrize("plan", [[12], [1] * 12, [3, 5, 4], [7, 5]])
def test_overlapping_compressor_matches_reference(plan, quant):
    _run_both(_spec(4, quant), [[(0, n)] for n in plan], seed=len(plan) * 7 + len(quant))


@pytest.mark.parametrize("plan", [[50], [1] * 50, [13, 22, 15], [37, 13]])
def test_plain_compressor_matches_reference(plan):
    _run_both(_spec(16), [[(0, n)] for n in plan], seed=len(plan) + 3, bs=2)


@pytest.mark.parametrize("quant", ["fp8", "fp4"])
def test_plain_compressor_exact_mode(quant):
    _run_both(_spec(16, quant), [[(0, 21)], [(0, 1)] * 1, [(0, 30)]], seed=5, bs=2)


def test_hca_ratio_128_prefill_then_decode():
    steps = [[(0, 130)]] + [[(0, 1)]] * 126 + [[(0, 3)]]
    pool = _run_both(_spec(128), steps, seed=6, bs=1)
    assert bool(pool.abs().sum(-1).gt(0).sum() == 2)  # entries 0 and 1


@pytest.mark.parametrize("m,quant", [(4, "fp8"), (16, "none")])
def test_two_sequence_batch_with_different_start_positions(m, quant):
    # slot 2 continues a sequence at position 1001 (its state holds the open window so far);
    # slot 1 sits in the batch with no new tokens; the batch order changes between steps
    steps = [
        [(0, 6), (2, 3)],
        [(0, 7), (1, 0), (2, 9)],
        [(0, 1), (2, 1)],
        [(2, 19), (0, 1)],
        [(0, 2), (2, 1)],
    ]
    _run_both(_spec(m, quant), steps, seed=12 + m, slots=3, start=[0, 0, 1001], bs=3)


def test_compressor_bf16_pool_and_fp64_run():
    _run_both(_spec(4, "fp8"), [[(0, 5)], [(0, 7)], [(0, 1)]], seed=20, dtype=BF16)
    _run_both(_spec(4, "fp4"), [[(0, 9)], [(0, 1)] * 1, [(0, 4)]], seed=21, dtype=BF16)
    _run_both(_spec(4), [[(0, 9)], [(0, 3)]], seed=22, dtype=F64)


def test_compressor_step_without_new_tokens_is_a_no_op():
    spec = _spec(4)
    state = dev(torch.randn(1, 8, 2 * C))
    before = state.clone()
    pool = dev(torch.zeros(2, 3, C))
    out = compress(dev(torch.zeros(0, 2 * C)), dev(torch.zeros(0, 2 * C)), dev(torch.zeros(4, 2 * C)), spec,
                   dev(torch.ones(C)), dev(torch.ones(ROPE // 2)), state, state.clone(), pool,
                   dev(torch.zeros(1, 2, dtype=torch.int32)), [(0, 5, 0, 0)])
    assert out.shape == (0, C) and torch.equal(state, before) and not bool(pool.any())
