"""The Ascend adapter (backends/ascend/ops.py) over the CPU emulations of torch_npu's ops, against
the reference backend: the layout mapping (BSND rope tables, TND + PA_BSND indexer rows, block
tables, grouped-matmul group lists, W8A8 scales) computes V4's semantics.

The emulations themselves are checked against hand-computed values in test_emulation.py.
"""

import pytest
import torch

from backends.ascend import emulation
from backends.ascend.ops import AscendOps, W8A8Weight, quantize_w8a8
from backends.reference.ops import ReferenceOps
from v4 import quant

REF = ReferenceOps("cpu")
BF16 = torch.bfloat16


def ops(**kw):
    return AscendOps("cpu", npu=emulation, **kw)


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_rms_norm_with_and_without_weight(dtype):
    r = gen(0)
    x, w = r(5, 3, 64).to(dtype), r(64)
    o = ops()
    for weight in (w, None):
        got = o.rms_norm(x, None if weight is None else weight.to(dtype), 1e-6)
        want = REF.rms_norm(x.double(), None if weight is None else weight.to(dtype).double(), 1e-6)
        assert got.dtype == dtype and rel(got, want) < (1e-6 if dtype == torch.float32 else 8e-3)
    assert o.path["rms_norm"] == "cann:npu_rms_norm"


@pytest.mark.parametrize("shape", [(7, 4, 128), (7, 128), (1, 64)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_matches_reference(shape, inverse):
    r = gen(1)
    x = r(*shape)
    pos = torch.tensor([0, 1, 2, 5, 127, 128, 65000])[: shape[0]]
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    got = ops().rope(x, pos, inv.float(), inverse)
    # fp32 angles at position 65000 are off by ~65000 * 2^-24 rad in any fp32 implementation, so
    # the reference runs in fp32 too: the adapter must agree with it to rounding
    want = REF.rope(x, pos, inv.float(), inverse)
    assert rel(got, want) < 2e-6
    assert torch.equal(got[..., :-64], x[..., :-64])  # nope dims untouched


def _index_case(seed, T_per_seq, starts, H=8, D=128, bs=16, ratio=4, dtype=BF16):
    """Packed queries of several sequences (slots 1, 0, ...) with their pools through shuffled block tables."""
    r = gen(seed)
    n_slots = len(T_per_seq)
    max_pos = max(s + t for s, t in zip(starts, T_per_seq))
    max_blocks = -(-(max_pos // ratio + 1) // bs)
    perm = torch.randperm(n_slots * max_blocks, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    table = perm.view(n_slots, max_blocks)
    pool = r(n_slots * max_blocks, bs, D).to(dtype)
    slots, positions = [], []
    for s, (st, t) in enumerate(zip(starts, T_per_seq)):
        slots += [n_slots - 1 - s] * t
        positions += list(range(st, st + t))
    T = len(slots)
    q = r(T, H, D).to(dtype)
    w = (r(T, H) * H ** -0.5).to(dtype)
    return q, w, pool, table, torch.tensor(slots), torch.tensor(positions)


@pytest.mark.parametrize("topk", [4, 64])
def test_indexer_cann_path_selects_the_reference_sets(topk):
    # prefill of 129 tokens from 0 (pools from empty to 32 entries), plus a decode row at 300
    q, w, pool, table, slots, pos = _index_case(2, [129, 1], [0, 300])
    o = ops()
    got = o.indexer_topk(q, w, pool, table, slots, pos, 4, topk)
    assert o.path["indexer_topk"] == "cann:npu_lightning_indexer"
    want = REF.indexer_topk(q.float(), w.float(), pool.float(), table, slots, pos, 4, topk)
    assert got.dtype == torch.int32 and got.shape == want.shape
    for t in range(q.shape[0]):
        g = set(got[t].tolist()) - {-1}
        assert g == set(want[t].tolist()) - {-1}, f"row {t} (position {int(pos[t])})"
        assert (got[t] == -1).sum() == (want[t] == -1).sum()
    assert (got[:3] == -1).all()  # positions 0..2 see no entry yet


def test_indexer_falls_back_to_the_kernel_outside_cann_limits():
    # fp32 (the CANN op takes bf16/fp16 only) and the 950 (no lightning indexer there)
    q, w, pool, table, slots, pos = _index_case(3, [9], [0], dtype=torch.float32)
    o = ops()
    got = o.indexer_topk(q, w, pool, table, slots, pos, 4, 4)
    assert o.path["indexer_topk"] == "triton-ascend:indexer"
    want = REF.indexer_topk(q, w, pool, table, slots, pos, 4, 4)
    assert [set(a) for a in got.tolist()] == [set(a) for a in want.tolist()]


def test_w8a8_linear_is_per_channel_int8_with_per_token_activations():
    r = gen(4)
    w, x = r(48, 64), r(5, 64).to(BF16)
    pw = ops(weights="w8a8").prepare_linear(w, BF16)
    assert isinstance(pw, W8A8Weight) and pw.q_t.dtype == torch.int8 and pw.q_t.shape == (64, 48)
    # the independent formula: per-row amax / 127 scales, round, then the same for each token
    sw = w.abs().amax(1) / 127
    qw = torch.round(w / sw[:, None])
    xf = x.float()
    sx = xf.abs().amax(1) / 127
    qx = torch.round(xf / sx[:, None])
    want = (qx @ qw.t()) * sx[:, None] * sw[None, :]
    o = ops(weights="w8a8")
    got = o.linear(x, pw)
    assert o.path["linear"] == "cann:npu_dynamic_quant+npu_quant_matmul"
    assert got.dtype == BF16 and rel(got, want) < 8e-3
    assert rel(got, xf @ w.t()) < 3e-2  # and close to the float product


def test_fp8_checkpoint_weight_is_dequantised_at_load():
    r = gen(5)
    w = r(256, 128)
    qw = quant.QuantizedWeight("fp8", *quant.quant_fp8_block(w))
    got = ops().prepare_linear(qw, BF16)
    assert got.dtype == BF16 and torch.equal(got, qw.dequantize(torch.float32).to(BF16))


@pytest.mark.parametrize(
    "weights,dtype,tol", [("dequant", torch.float32, 2e-6), ("dequant", BF16, 1.5e-2), ("w8a8", BF16, 5e-2)]
)
def test_moe_experts_grouped_matmul_matches_reference(weights, dtype, tol):
    r = gen(6)
    E, D, inter, T, k = 8, 64, 32, 13, 2
    w1s, w3s, w2s = (
        [r(inter, D) * 0.2 for _ in range(E)],
        [r(inter, D) * 0.2 for _ in range(E)],
        [r(D, inter) * 0.2 for _ in range(E)],
    )
    x = r(T, D).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(t))[:k] for t in range(T)]).to(
        torch.int32
    )
    ids[0] = torch.tensor([3, 3 + 1])  # expert 0 and others may get no token at all
    rw = torch.rand(T, k, generator=torch.Generator().manual_seed(7))
    sw1, sw3, sw2 = r(inter, D) * 0.2, r(inter, D) * 0.2, r(D, inter) * 0.2  # the shared expert
    o = ops(weights=weights)
    w13, w2 = o.prepare_experts(w1s, w3s, w2s, dtype)
    s13, s2 = o.prepare_experts([sw1], [sw3], [sw2], dtype)
    got = o.moe_experts(x, ids, rw, w13, w2, (s13[0], s2[0]), 10.0)
    assert o.path["moe_experts"].startswith("cann:npu_grouped_matmul")
    rf13, rf2 = REF.prepare_experts(w1s, w3s, w2s, torch.float64)
    rs13, rs2 = REF.prepare_experts([sw1], [sw3], [sw2], torch.float64)
    want = REF.moe_experts(x.double(), ids, rw.double(), rf13, rf2, (rs13[0], rs2[0]), 10.0)
    assert rel(got, want) < tol
    assert got.dtype == dtype


def test_w8a8_needs_a_16_bit_working_dtype_for_quantisation():
    w = gen(8)(16, 32)
    assert isinstance(ops(weights="w8a8").prepare_linear(w, BF16), W8A8Weight)
    assert ops(weights="w8a8").prepare_linear(w, torch.float32).dtype == torch.float32  # fp32 projections stay float
    with pytest.raises(ValueError, match="ascend_weights"):
        ops(weights="int4")


def test_exact_mode_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="plain mode"):
        ops().linear(torch.ones(2, 4), torch.ones(3, 4), act_quant=True)


def test_quantize_w8a8_round_trip_error_is_bounded():
    w = gen(9)(32, 64)
    q = quantize_w8a8(w, BF16)
    err = (q.dequantize().float() - w).abs().max(1).values
    assert bool((err <= w.abs().amax(1) / 127 * 0.5 + w.abs().amax(1) * 2 ** -8).all())
