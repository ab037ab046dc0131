"""Ascend sparse MQA attention kernel (backends/ascend/kernels/attention.py) against the reference op.

The Triton-Ascend source runs in upstream Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set before triton is imported). Ground truth: ReferenceOps("cpu").attention in fp64 on the same
(already rounded) inputs. Index lists come from the model's own step-layout helpers (`v4.cache.window_rows`,
`visible_entry_rows`, `entry_rows`) over packed step batches, so the kernel sees the layouts the model
hands it: -1 before position 0, just-closed windows, empty / smaller-than-top-k compressed pools,
mixed prefill + decode batches, scattered paged pools.
"""

from functools import partial

import pytest
import torch

from backends.ascend.kernels import attention as A
from backends.ascend.kernels import launch
from backends.conformance import ATTENTION_TOL, attention_truth, check_rel, gen, layer_inputs, qs, run_attention
from v4.model import StepBatch

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
# max |out - truth| / max |truth| (the conformance cases' rule for this kernel family)
TOL = ATTENTION_TOL["ascend"]
CPU = torch.device("cpu")

check = partial(check_rel, tol=TOL)
# run(q, wkv, widx, ckv, cidx, sink, scale, what, **blocks): A.attention against fp64 truth
run = partial(run_attention, A.attention, TOL)


# ---------------------------------------------------------------- decode and packed batches
# (the prefill boundary token counts: tests/conformance/test_ops.py::test_attention)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_decode_just_closed_windows_and_topk_beyond_pool(dtype):
    # positions 127 (window just full: no -1), 128 and 300 (ring wrapped), 5 (window mostly -1,
    # top-k larger than the 1 visible entry), 2 (no entry: an all-(-1) compressed row)
    batch = StepBatch([0, 1, 2, 3, 4], [127, 128, 300, 5, 2], [1] * 5, CPU)
    wkv, widx, ckv, cidx = layer_inputs(batch, 5, "csa", 64, dtype, seed=7, topk=64)
    assert (widx[:3] >= 0).all() and (widx[3:] < 0).any()
    assert (cidx[4] < 0).all() and (cidx[3] >= 0).sum() == 1
    q, sink = qs(5, 8, 64, dtype, seed=8)
    run(q, wkv, widx, ckv, cidx, sink, 64 ** -0.5, "decode csa")


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_mixed_packed_batch(dtype):
    # prefill from 0, a decode step, a prefill chunk continuing at 7, a long decode: paged pools
    batch = StepBatch([2, 0, 3, 1], [0, 130, 7, 517], [6, 1, 5, 1], CPU)
    for kind, seed in (("hca", 11), ("csa", 12)):
        wkv, widx, ckv, cidx = layer_inputs(batch, 4, kind, 64, dtype, seed=seed, topk=24, scatter=kind == "csa")
        q, sink = qs(batch.num_tokens, 8, 64, dtype, seed=seed + 50)
        run(q, wkv, widx, ckv, cidx, sink, 64 ** -0.5, f"mixed batch {kind}")


# ---------------------------------------------------------------- -1 handling, sinks, lists


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_sliding_only_comp_none_and_width_zero(dtype):
    batch = StepBatch([0, 1], [0, 200], [4, 1], CPU)
    wkv, widx, _, _ = layer_inputs(batch, 2, "sliding", 64, dtype, seed=21)
    q, sink = qs(5, 8, 64, dtype, seed=22)
    a = run(q, wkv, widx, None, None, sink, 64 ** -0.5, "comp None")
    ckv = torch.randn(3, 64).to(dtype)
    b = run(q, wkv, widx, ckv, torch.zeros(5, 0, dtype=torch.int32), sink, 64 ** -0.5, "Kc = 0")
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_all_minus_one_rows_and_large_logits(dtype):
    # rows whose lists are all -1 (both lists) see only the sink: o = 0; scale 1 makes logits
    # ~ +-20, so the running max is rescaled often; -1 interspersed; Kw, Kc not multiples of BLOCK_K
    g, r = gen(31)
    T, H, d = 6, 8, 64
    wkv, ckv = r(50, d).to(dtype), r(40, d).to(dtype)
    widx = torch.randint(-1, 50, (T, 77), generator=g, dtype=torch.int32)
    cidx = torch.randint(-1, 40, (T, 37), generator=g, dtype=torch.int32)
    widx[2], cidx[2] = -1, -1
    cidx[4] = -1  # window only
    widx[5] = -1  # compressed only
    widx[1, :40] = -1  # whole chunks of -1 before valid ones (masked)
    widx[3, 20:] = -1  # -1 tail padding, as the model's lists have it (chunks past it are not walked)
    q, sink = qs(T, H, d, dtype, seed=32)
    out = run(q, wkv, widx, ckv, cidx, sink, 1.0, "all -1 rows / large logits", block_k=16)
    assert (out[2] == 0).all()


def test_sink_dominates_and_partial_head_block():
    # H = 20: the second head block is partly masked; one head's sink far above its logits -> ~0
    g, r = gen(51)
    T, H, d = 3, 20, 32
    wkv = r(30, d)
    widx = torch.randint(-1, 30, (T, 40), generator=g, dtype=torch.int32)
    q, sink = qs(T, H, d, F32, seed=52)
    sink[3] = 60.0
    out = run(q, wkv, widx, None, None, sink, 32 ** -0.5, "H=20", block_h=16)
    assert out[:, 3].abs().max() < 1e-15


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


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_head_dim_512(dtype):
    # V4's head dim with the tiles the wrapper picks for it (bf16: one value slice, fp32: two)
    batch = StepBatch([0], [130], [1], CPU)
    wkv, widx, ckv, cidx = layer_inputs(batch, 1, "csa", 512, dtype, seed=41, topk=24, scatter=True)
    q, sink = qs(1, 16, 512, dtype, seed=42)
    run(q, wkv, widx, ckv, cidx, sink, 512 ** -0.5, "d=512")


def test_fp16_and_mixed_dtypes():
    batch = StepBatch([0, 1], [0, 40], [2, 1], CPU)
    wkv, widx, ckv, cidx = layer_inputs(batch, 2, "hca", 64, F32, seed=55)
    q, sink = qs(3, 8, 64, F32, seed=56)
    run(q.half(), wkv.half(), widx, ckv.half(), cidx, sink, 64 ** -0.5, "fp16")
    # bf16 q over an fp32 cache: fp32 products, so the only error is the output's bf16 rounding
    out = A.attention(q.to(BF16), wkv, widx, ckv, cidx, sink, 64 ** -0.5)
    ref = attention_truth(q.to(BF16), wkv, widx, ckv, cidx, sink, 64 ** -0.5)
    check(out, ref, BF16, "bf16 q, fp32 kv")
    assert float((out.to(F64) - ref).abs().max()) <= 2 ** -8 * float(ref.abs().max())


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
