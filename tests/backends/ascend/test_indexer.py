"""Ascend lightning-indexer top-k (backends/ascend/kernels/indexer.py) against the reference op.

The Triton-Ascend scoring kernel runs in upstream Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set before triton is imported); the reference backend on CPU is ground truth.
Picks are compared as sets per query plus the -1 padding: the inputs are fresh continuous random
numbers, so exact ties do not occur, and the fp32-vs-fp64 summation differences only matter for
picks whose scores sit within rounding of the k-th best; those (and only those) may differ, and
the sorted scores of the picks must agree.
"""

import pytest
import torch

from backends.ascend.kernels import indexer as I
from backends.ascend.kernels import launch
from backends.conformance_cases import REF, entry_scores64, gen, indexer_case, random_table

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def check_topk(got, q, w, pool, table, tok_slot, positions, ratio, topk):
    ref = REF.indexer_topk(q.to(F64), w.to(F64), pool.to(F64), table, tok_slot, positions, ratio, topk)
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
        if set(gv.tolist()) != set(rv.tolist()):
            # only near-ties at the cut may differ (fp32 vs fp64 summation)
            tol = 1e-5 * float(scores[t, : int(nvis[t])].abs().max()) + 1e-9
            cut = float(scores[t, rv].min())
            diff = set(gv.tolist()) ^ set(rv.tolist())
            assert all(abs(float(scores[t, s]) - cut) <= tol for s in diff), f"row {t}: picks differ {diff}"
            torch.testing.assert_close(scores[t, gv].sort().values, scores[t, rv].sort().values, rtol=0, atol=tol)


def run(q, w, pool, table, tok_slot, positions, ratio, topk):
    got = I.indexer_topk(q, w, pool, table, tok_slot, positions, ratio, topk)
    check_topk(got, q, w, pool, table, tok_slot, positions, ratio, topk)
    return got


# ---------------------------------------------------------------- boundary token counts


@pytest.mark.parametrize("T", [1, 3, 4, 5, 127, 128, 129])
def test_matches_reference(T):
    # few tokens reach up to 175 entries (several tiles, gathered rows: block 12); many tokens ~60
    max_pos = 700 if T <= 5 else 250
    q, w, pool, table, tok_slot, positions = indexer_case(100 + T, T, max_pos=max_pos)
    run(q, w, pool, table, tok_slot, positions, 4, 24)


@pytest.mark.parametrize("T", [1, 5, 129])
def test_bf16_contiguous_blocks(T):
    # bf16 (16-bit products, fp32 accumulation) over a pool whose block size the tile divides:
    # the contiguous-rows path the V4 shapes take (block 64 there, 32 here)
    q, w, pool, table, tok_slot, positions = indexer_case(200 + T, T, bs=32, max_pos=600 if T <= 5 else 200, dtype=BF16)
    assert I._block_n(16, 32, 32, 2, 2)[1]
    run(q, w, pool, table, tok_slot, positions, 4, 24)


def test_fp16_and_mixed_dtypes():
    q, w, pool, table, tok_slot, positions = indexer_case(9, 7, bs=16, max_pos=300)
    run(q.half(), w, pool.half(), table, tok_slot, positions, 4, 16)
    run(q.to(BF16), w, pool, table, tok_slot, positions, 4, 16)  # bf16 q over an fp32 pool: fp32 products


# ---------------------------------------------------------------- visibility and padding


def test_mixed_visibility_and_eight_heads():
    q, w, pool, table, tok_slot, positions = indexer_case(7, 40, H=8, d=16, slots=4, bs=5, max_pos=160)
    positions[:6] = torch.tensor([0, 1, 2, 3, 4, 7])  # 0, 0, 0, 1, 1, 2 visible entries
    got = run(q, w, pool, table, tok_slot, positions, 4, 16)
    assert bool((got[:3] == -1).all()) and int((got[3] >= 0).sum()) == 1


def test_no_visible_entries_and_empty_batch():
    q, w, pool, table, tok_slot, positions = indexer_case(8, 6, max_pos=2)  # positions 0..2: nothing visible
    got = I.indexer_topk(q, w, pool, table, tok_slot, positions, 4, 8)
    assert got.dtype == torch.int32 and got.shape == (6, 8) and bool((got == -1).all())
    got = I.indexer_topk(q[:0], w[:0], pool, table, tok_slot[:0], positions[:0], 4, 8)
    assert got.shape == (0, 8) and got.dtype == torch.int32


def test_topk_wider_than_the_pool():
    q, w, pool, table, tok_slot, positions = indexer_case(10, 9, max_pos=37, bs=4)
    got = run(q, w, pool, table, tok_slot, positions, 4, 64)
    assert bool((got[:, 10:] == -1).all())  # at most 38 // 4 = 9 entries are visible


def test_same_slot_tokens_see_their_own_prefix():
    # a prefill chunk: consecutive positions of one slot; each token's picks stop at its own count
    g, rnd = gen(11)
    table, nb = random_table(g, 1, 8)
    pool = rnd(nb, 8, 32)
    T = 30
    q, w = rnd(T, 16, 32), rnd(T, 16, s=0.5)
    tok_slot, positions = torch.zeros(T, dtype=torch.long), torch.arange(100, 100 + T)
    run(q, w, pool, table, tok_slot, positions, 4, 26)


def test_slots_read_their_own_block_table_rows():
    # identical queries in two slots with different keys: the picks must follow each slot's table
    q, w, pool, table, _, _ = indexer_case(12, 2, slots=2, bs=3, max_pos=47)
    q[1], w[1] = q[0], w[0]
    tok_slot, positions = torch.tensor([0, 1]), torch.tensor([47, 47])
    got = run(q, w, pool, table, tok_slot, positions, 4, 5)
    assert got[0].tolist() != got[1].tolist()


# ---------------------------------------------------------------- the score kernel itself


@pytest.mark.parametrize("bs,tiles", [(12, 1), (16, 3), (64, 2)])
def test_score_matrix_and_tile_groups(bs, tiles):
    # the raw scores, -inf columns included, with several tiles per work item (q loaded once)
    q, w, pool, table, tok_slot, positions = indexer_case(13, 6, bs=bs, max_pos=500)
    nvis = (positions + 1) // 4
    s_max = int(nvis.max())
    got = I.indexer_scores(q, w, pool, table, tok_slot, nvis, s_max, block_n=16, tiles=tiles)
    ref = entry_scores64(q, w, pool, table, tok_slot, nvis)[:, :s_max]
    assert got.dtype == F32 and got.shape == ref.shape
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and bool((got[torch.isinf(got)] < 0).all())
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin].double(), ref[fin], rtol=1e-5, atol=1e-5 * float(ref[fin].abs().max()))


def test_tiles_fit_the_unified_buffer_at_v4_shapes():
    # V4-Flash: 64 index heads, d = 128, bf16, pool block 64 -> 64-entry tiles inside one block
    assert I._block_n(64, 128, 64, 2, 2) == (64, True)
    assert I._ub_bytes(64, 128, 64, 2, 2) <= launch.UB_BUDGET < I._ub_bytes(64, 128, 128, 2, 2)
    for c in I.LOWERING_CASES:
        k = c.constexprs
        es = 4 if k["DOT_F32"] else 2
        assert I._ub_bytes(k["BLOCK_H"], k["BLOCK_D"], k["BLOCK_N"], es, es) <= launch.UB_BUDGET
        assert c.kind == "cube"


def test_rejects_fp64():
    q, w, pool, table, tok_slot, positions = indexer_case(14, 2)
    with pytest.raises(ValueError, match="float64"):
        I.indexer_topk(q.double(), w, pool, table, tok_slot, positions, 4, 8)
    with pytest.raises(ValueError, match="float64"):
        I.indexer_topk(q, w.double(), pool, table, tok_slot, positions, 4, 8)
