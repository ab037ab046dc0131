"""Ascend lightning-indexer top-k (backends/ascend/kernels/indexer.py): what is specific to the Ascend
kernel (contiguous-block tiles, fp16 / mixed operands, the score matrix, UB budget, fp64 rejection).
The per-op cases over every backend are tests/conformance/test_ops.py::test_indexer_topk.

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
from backends.conformance import check_indexer_topk, entry_scores64, indexer_case

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def run(q, w, pool, table, tok_slot, positions, ratio, topk):
    got = I.indexer_topk(q, w, pool, table, tok_slot, positions, ratio, topk)
    check_indexer_topk(got, q, w, pool, table, tok_slot, positions, ratio, topk)
    return got


# ---------------------------------------------------------------- the Ascend tiling paths and 16-bit operands


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
