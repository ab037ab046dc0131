"""The CUDA compressor's decode form (`DecodeRows`: slots and positions on the device, one token per
row, one launch) against the reference compressor fed the same steps in its list form.

This is the form a captured decode step uses, so the layout varies only in tensor contents: windows
opening, mid-window, closing at this token, the very first window of a sequence (no previous window
for the overlapping compressor), sequences in any order, scratch padding rows that share a slot.
Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before triton loads).
"""

import pytest
import torch

from backends.cuda.kernels.compress import compress
from tests.backends.cuda.test_indexer_compress import BF16, F32, F64, _assert_entries, _compress_inputs, _spec, dev
from backends.conformance import REF
from v4.ops import DecodeRows

pytestmark = pytest.mark.gpu  # bench/gpu_check.sh runs these natively on a GPU


def _decode_lockstep(spec, starts, order_per_step, *, seed=0, bs=3, dtype=F32, pad_rows=0):
    """Sequences b = 0.. start at positions `starts[b]` (state and pool prefilled by the reference
    from zero), then decode one token per listed sequence per step. The reference gets the list
    form, the kernel a DecodeRows over the same rows (plus `pad_rows` rows on a scratch slot)."""
    slots = len(starts)
    scratch = slots  # one more slot that only padding rows touch
    n_steps = len(order_per_step)
    streams, ape, norm_w, inv, table, nb = _compress_inputs(seed, spec, slots + 1, max(starts) + n_steps + 1,
                                                            [s + n_steps for s in starts], bs, dtype)
    K, m, c = (2 if spec.overlap else 1), spec.ratio, spec.dim
    acc = F64 if dtype == F64 else F32
    skv = torch.zeros(slots + 1, K * m, K * c, dtype=acc)
    sz = torch.zeros_like(skv)
    pool = torch.zeros(nb, bs, c, dtype=dtype)
    # prefill every sequence to its start with the reference (a shared starting point)
    pre = [(b, 0, starts[b], sum(starts[:b])) for b in range(slots) if starts[b]]
    if pre:
        kv0 = torch.cat([streams[b][0][:starts[b]] for b in range(slots)]).to(acc)
        z0 = torch.cat([streams[b][1][:starts[b]] for b in range(slots)]).to(acc)
        REF.compress(kv0, z0, ape.to(acc), spec, norm_w, inv, skv, sz, pool, table, pre)
    k_skv, k_sz, k_pool = dev(skv).clone(), dev(sz).clone(), dev(pool).clone()
    pos = list(starts)
    for order in order_per_step:
        rows = [(b, pos[b]) for b in order] + [(scratch, 0)] * pad_rows
        kv = torch.stack([streams[b][0][p] for b, p in rows]).to(acc)
        z = torch.stack([streams[b][1][p] for b, p in rows]).to(acc)
        seqs = [(b, p, 1, i) for i, (b, p) in enumerate(rows[:len(order)])]
        ref = REF.compress(kv[:len(order)], z[:len(order)], ape.to(acc), spec, norm_w, inv, skv, sz, pool, table, seqs)
        dec = DecodeRows(dev(torch.tensor([b for b, _ in rows])), dev(torch.tensor([p for _, p in rows])))
        got = compress(dev(kv), dev(z), dev(ape.to(acc)), spec, dev(norm_w), dev(inv), k_skv, k_sz, k_pool,
                       dev(table), dec)
        assert got.shape == (len(rows), c) and got.dtype == pool.dtype
        closed = [i for i, (_, p) in enumerate(rows[:len(order)]) if (p + 1) % m == 0]
        _assert_entries(got[closed], ref, spec.quant, dtype)
        open_rows = [i for i in range(len(rows)) if i not in closed]
        assert not bool(got[open_rows].any()), "rows whose window stays open return zeros"
        # the scratch slot's state is padding garbage by design; every real slot must match exactly
        assert torch.equal(k_skv[:slots].cpu(), skv[:slots]) and torch.equal(k_sz[:slots].cpu(), sz[:slots]), \
            "compressor state differs"
        _assert_entries(k_pool, pool, spec.quant, dtype)
        for b in order:
            pos[b] += 1
    return pool


@pytest.mark.parametrize("quant", ["none", "fp8", "fp4"])
def test_overlapping_decode_rows_from_position_zero(quant):
    # one sequence from its first token: entry 0 (no previous window), then 1 and 2
    _decode_lockstep(_spec(4, quant), [0], [[0]] * 12, seed=1)


def test_overlapping_decode_rows_mixed_positions_and_order():
    # positions 3 (closes entry 0 now), 6, 1001 (mid-window), 7 (closes now); order changes per step
    starts = [3, 6, 1001, 7]
    orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0], [0, 1, 2, 3], [3, 1, 0, 2]]
    _decode_lockstep(_spec(4, "fp8"), starts, orders, seed=2, pad_rows=3)


@pytest.mark.parametrize("m", [16, 128])
def test_plain_decode_rows_across_a_window(m):
    # one sequence closes its window at the first step, the other at step m - 2
    starts = [m - 1, 2 * m + 1]
    _decode_lockstep(_spec(m), starts, [[0, 1]] * (m - 1 if m == 16 else 3), seed=3, bs=2, pad_rows=1)


def test_plain_decode_rows_ratio_128_closes_mid_run():
    _decode_lockstep(_spec(128), [125], [[0]] * 5, seed=4, bs=1)


def test_decode_rows_bf16_pool_and_fp64():
    _decode_lockstep(_spec(4, "fp8"), [2, 5], [[0, 1]] * 5, seed=5, dtype=BF16)
    _decode_lockstep(_spec(4, "fp4"), [0, 3], [[1, 0]] * 4, seed=6, dtype=BF16, pad_rows=2)
    _decode_lockstep(_spec(16), [14, 0], [[0, 1]] * 3, seed=7, dtype=F64)


def test_decode_rows_reference_form_matches_list_form():
    # the reference's own DecodeRows form is its list form (zeros for open windows)
    spec = _spec(4)
    _, ape, norm_w, inv, table, nb = _compress_inputs(8, spec, 2, 8, [9, 9], 3)
    skv = torch.randn(2, 8, 2 * spec.dim)
    sz = torch.randn(2, 8, 2 * spec.dim)
    pool = torch.zeros(nb, 3, spec.dim)
    kv, z = torch.randn(2, 2 * spec.dim), torch.randn(2, 2 * spec.dim)
    a = [t.clone() for t in (skv, sz, pool)]
    rows = DecodeRows(torch.tensor([1, 0]), torch.tensor([5, 7]))
    out = REF.compress(kv, z, ape, spec, norm_w, inv, *a[:2], a[2], table, rows)
    ref = REF.compress(kv, z, ape, spec, norm_w, inv, skv, sz, pool, table, [(1, 5, 1, 0), (0, 7, 1, 1)])
    assert out.shape == (2, spec.dim) and not bool(out[0].any()) and torch.equal(out[1], ref[0])
    assert torch.equal(a[0], skv) and torch.equal(a[1], sz) and torch.equal(a[2], pool)
