"""Ascend sparse MQA attention kernel (backends/ascend/kernels/attention.py): what is Ascend's own.

The prefills at the boundary token counts and the decode / packed batches (ring windows, every
compressed-list form, paged pools, d = 512, fp16, bf16 q over fp32 kv, all -1 rows, a dominating
sink) run over every backend in tests/conformance/test_attention.py. Here: a -inf sink, value slices
(block_v), int64 indices and strided q, the Unified Buffer tiles, rejections.

The Triton-Ascend source runs in upstream Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set before triton is imported). Ground truth: ReferenceOps("cpu").attention in fp64 on the same
(already rounded) inputs.
"""

from functools import partial

import pytest
import torch

from backends.ascend.kernels import attention as A
from backends.ascend.kernels import launch
from backends.conformance import ATTENTION_TOL, attention_truth, check_rel, gen, layer_inputs, qs, run_attention
from v4.model import StepBatch

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
# max |out - truth| / max |truth| (the conformance cases' rule for this kernel family)
TOL = ATTENTION_TOL["ascend"]
CPU = torch.device("cpu")

check = partial(check_rel, tol=TOL)
# run(q, wkv, widx, ckv, cidx, sink, scale, what, **blocks): A.attention against fp64 truth
run = partial(run_attention, A.attention, TOL)


# ---------------------------------------------------------------- sinks, index dtypes


def test_minus_inf_sink_is_plain_softmax():
    # sink = -inf: ordinary softmax over the valid rows; a row with none gives 0 (not 0 / 0)
    g, r = gen(53)
    T, H, d = 3, 4, 32
    wkv = r(20, d)
    widx = torch.randint(0, 20, (T, 10), generator=g, dtype=torch.int32)
    widx[1] = -1
    q = r(T, H, d)
    sink = torch.full((H,), float("-inf"))
    out = A.attention(q, wkv, widx, None, None, sink, 0.3)
    ref = attention_truth(q[[0, 2]], wkv, widx[[0, 2]], None, None, sink, 0.3)
    check(out[[0, 2]], ref, F32, "-inf sink")
    assert (out[1] == 0).all()


# ---------------------------------------------------------------- tiling: d sub-tiles, dtypes


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_value_slices_match_whole_d(dtype):
    # DV < d: S accumulated over d sub-tiles, one item per value slice (the fp32 d = 512 layout)
    batch = StepBatch([0, 1], [0, 140], [3, 1], CPU)
    wkv, widx, ckv, cidx = layer_inputs(batch, 2, "csa", 64, dtype, seed=61, topk=20, scatter=True)
    q, sink = qs(4, 8, 64, dtype, seed=62)
    whole = run(q, wkv, widx, ckv, cidx, sink, 64 ** -0.5, "DV = d")
    sliced = run(q, wkv, widx, ckv, cidx, sink, 64 ** -0.5, "DV = d / 4", block_v=16)
    check(sliced, whole.to(F64), dtype, "slices vs whole")


def test_int64_indices_and_strided_q():
    g, r = gen(71)
    T, H, d = 3, 8, 32
    wkv = r(25, d)
    widx = torch.randint(-1, 25, (T, 30), generator=g)  # int64
    q = r(T, 2 * H, d)[:, ::2]  # head stride 2 d
    sink = r(H)
    run(q, wkv, widx, None, None, sink, 0.2, "int64 idx, strided q")


# ---------------------------------------------------------------- tiles, UB, rejections


def test_tiles_fit_the_unified_buffer_at_v4_shapes():
    assert A._tiles(64, 512, 2, 2) == (16, 32, 512)  # V4-Flash bf16: one value slice
    assert A._ub_bytes(16, 32, 512, 512, 2, 2) <= launch.UB_BUDGET
    assert A._ub_bytes(16, 64, 512, 512, 2, 2) > launch.UB_BUDGET  # why BK stops at 32
    bh, bk, dv = A._tiles(64, 512, 4, 4)  # fp32 d = 512: the d axis is sub-tiled
    assert dv < 512 and A._ub_bytes(bh, bk, 512, dv, 4, 4) <= launch.UB_BUDGET
    for case in A.LOWERING_CASES:
        c = case.constexprs
        es = 4 if c["DOT_F32"] else 2
        assert A._ub_bytes(c["BLOCK_H"], c["BLOCK_K"], c["D"], c["DV"], es, es) <= launch.UB_BUDGET
        assert case.kind == "cube"


def test_rejections():
    q = torch.zeros(1, 2, 32)
    idx = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="float64"):
        A.attention(q.double(), torch.zeros(4, 32, dtype=F64), idx, None, None, torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="power of two"):
        A.attention(torch.zeros(1, 2, 96), torch.zeros(4, 96), idx, None, None, torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="Unified Buffer"):
        A.attention(torch.zeros(1, 64, 512), torch.zeros(4, 512), idx, None, None, torch.zeros(64), 1.0,
                    block_h=64, block_k=64)
    assert A.attention(q[:0], torch.zeros(4, 32), idx[:0], None, None, torch.zeros(2), 1.0).shape == (0, 2, 32)
