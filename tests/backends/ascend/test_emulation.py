"""The CPU emulations of torch_npu ops (backends/ascend/emulation.py) against hand-computed values
and the documented formulas, and their enforcement of the documented limits.

These are the stand-ins the Ascend adapter is tested with, so they are checked on their own first:
an emulation that computed the wrong thing would let a wrong adapter pass.
"""

import math

import pytest
import torch

from backends.ascend import emulation as E

BF16 = torch.bfloat16


def test_rms_norm_by_hand():
    x = torch.tensor([[3.0, 4.0]])  # mean square 12.5
    y, rstd = E.npu_rms_norm(x, torch.tensor([1.0, 2.0]), 0.0)
    r = 1 / math.sqrt(12.5)
    assert torch.allclose(y, torch.tensor([[3 * r, 8 * r]]))
    assert torch.allclose(rstd, torch.tensor([[r]]))
    with pytest.raises(ValueError, match="gamma dtype"):
        E.npu_rms_norm(x, torch.ones(2, dtype=BF16))


def test_rotary_mul_interleave_by_hand():
    # pairs (1, 2) and (3, 4); pair 0 turns by 90 degrees, pair 1 by 0
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    cos = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 1, 4)
    sin = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4)
    y = E.npu_rotary_mul(x, cos, sin, rotary_mode="interleave")
    assert y.flatten().tolist() == [-2.0, 1.0, 3.0, 4.0]
    y = E.npu_rotary_mul(x, cos, sin, rotary_mode="half")  # halves (1, 2) / (3, 4): x_new = (-3, -4, 1, 2)
    assert y.flatten().tolist() == [-3.0, -4.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="1S1D"):  # per-head tables are not a documented interleave form
        E.npu_rotary_mul(x.repeat(1, 1, 2, 1), cos.repeat(1, 1, 2, 1), sin.repeat(1, 1, 2, 1), rotary_mode="interleave")


def _pool(keys: torch.Tensor, bs: int = 16):
    """Keys [S, D] -> PA_BSND pool with the blocks in reverse physical order, and its table row."""
    S, D = keys.shape
    nb = -(-S // bs)
    pool = torch.zeros(nb, bs, 1, D, dtype=keys.dtype)
    table = torch.arange(nb - 1, -1, -1, dtype=torch.int32)
    for s in range(S):
        pool[table[s // bs], s % bs, 0] = keys[s]
    return pool, table


def _indexer_kwargs(n_queries: int, n_keys: int, table: torch.Tensor, sparse_count: int, sparse_mode: int):
    """npu_lightning_indexer's keywords for one sequence of n_queries TND queries over n_keys keys in a
    PA_BSND pool whose block-table row is `table`."""
    return dict(
        actual_seq_lengths_query=torch.tensor([n_queries], dtype=torch.int32),
        actual_seq_lengths_key=torch.tensor([n_keys], dtype=torch.int32),
        block_table=table[None],
        layout_query="TND",
        layout_key="PA_BSND",
        sparse_count=sparse_count,
        sparse_mode=sparse_mode,
    )


def test_lightning_indexer_by_hand():
    # one head, D = 2 (checked against the limits below separately); key scores for q = (1, 0):
    # k0 . q = 1, k1 . q = -1 (relu -> 0), k2 . q = 3
    keys = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [3.0, 5.0]], dtype=BF16)
    pool, table = _pool(keys)
    q = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]], dtype=BF16)  # two queries of one row
    w = torch.tensor([[2.0], [1.0]], dtype=BF16)
    out, vals = E.npu_lightning_indexer(q, pool, w, **_indexer_kwargs(2, 3, table, 4, 3), return_value=True)
    # right-down causal, Sq = 2, Sk = 3: query 0 sees keys 0..1, query 1 sees 0..2
    assert out.shape == (2, 1, 4)
    assert out[0, 0].tolist() == [0, 1, -1, -1]  # scores 2, 0
    assert out[1, 0].tolist() == [2, 0, 1, -1]  # scores 3, 1, 0
    assert vals[1, 0, :3].float().tolist() == [3.0, 1.0, 0.0] and vals.dtype == BF16
    full = E.npu_lightning_indexer(q, pool, w, **_indexer_kwargs(2, 3, table, 1, 0))[0]
    assert full[:, 0, 0].tolist() == [2, 2]


def test_lightning_indexer_enforces_documented_limits():
    keys = torch.randn(4, 128, dtype=BF16)
    pool, table = _pool(keys)
    kw = _indexer_kwargs(1, 4, table, 2, 3)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        E.npu_lightning_indexer(torch.randn(1, 2, 128), pool.float(), torch.randn(1, 2), **kw)
    with pytest.raises(ValueError, match="N1 must be <= 64"):
        E.npu_lightning_indexer(torch.randn(1, 65, 128, dtype=BF16), pool, torch.randn(1, 65, dtype=BF16), **kw)
    with pytest.raises(ValueError, match="sparse_count"):
        E.npu_lightning_indexer(
            torch.randn(1, 2, 128, dtype=BF16), pool, torch.randn(1, 2, dtype=BF16), **{**kw, "sparse_count": 2049}
        )
    with pytest.raises(ValueError, match="block_size"):
        E.npu_lightning_indexer(torch.randn(1, 2, 128, dtype=BF16), torch.zeros(1, 8, 1, 128, dtype=BF16),
                                torch.randn(1, 2, dtype=BF16), **kw)


def test_dynamic_quant_by_hand():
    y, s = E.npu_dynamic_quant(torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], dtype=BF16))
    assert s[0].item() == pytest.approx(2 / 127)
    assert y[0].tolist() == [64, -127, 32]  # 63.5 -> 64 (half to even), 31.75 -> 32
    assert y[1].tolist() == [0, 0, 0] and s[1].item() == 0.0
    with pytest.raises(ValueError, match="float16/bfloat16"):
        E.npu_dynamic_quant(torch.ones(2, 2))


def test_quant_matmul_by_hand():
    x1 = torch.tensor([[1, 2], [3, -4]], dtype=torch.int8)
    x2 = torch.tensor([[1, 0, 2], [0, 1, 1]], dtype=torch.int8)  # [k=2, n=3]
    y = E.npu_quant_matmul(x1, x2, torch.tensor([1.0, 0.5, 0.25]), pertoken_scale=torch.tensor([1.0, 2.0]),
                           output_dtype=BF16)
    # x1 @ x2 = [[1, 2, 4], [3, -4, 2]]; * scale per column; * pertoken per row
    assert y.float().tolist() == [[1.0, 1.0, 1.0], [6.0, -4.0, 1.0]]


def test_grouped_matmul_counts_and_cumsum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g)
    w = torch.randn(3, 3, 2, generator=g)  # 3 groups
    counts = torch.tensor([2, 0, 3])
    want = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
    for gl, t in ((counts, 1), (counts.cumsum(0), 0)):
        y = E.npu_grouped_matmul([x], [w], group_list=gl, split_item=2, group_type=0, group_list_type=t)[0]
        assert torch.allclose(y, want, atol=1e-6)
    with pytest.raises(ValueError, match="group_list of length 1"):
        E.npu_grouped_matmul([x], [w[:1]], group_list=torch.tensor([5]), split_item=2, group_type=0, group_list_type=1)


def test_grouped_matmul_per_token_int8():
    x = torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.int8)
    w = torch.tensor([[[1], [1]], [[2], [0]]], dtype=torch.int8)  # [g=2, K=2, N=1]
    y = E.npu_grouped_matmul(
        [x],
        [w],
        scale=[torch.tensor([[0.5], [1.0]])],
        per_token_scale=[torch.tensor([1.0, 2.0, 4.0])],
        group_list=torch.tensor([1, 2]),
        split_item=2,
        group_type=0,
        group_list_type=1,
        output_dtype=BF16,
    )[0]
    # row 0 group 0: (1+2)*0.5*1; rows 1, 2 group 1: 3*2*1*2 = 12, 5*2*1*4 = 40
    assert y.float().flatten().tolist() == [1.5, 12.0, 40.0]
