"""CUDA-backend Triton kernels: the compressor against the reference op (the indexer's per-op cases
over every backend are tests/conformance/test_ops.py::test_indexer_topk; its top-k kernel's own
tests are test_indexer_topk.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set here
before triton is imported); with one they run on it. The reference backend on CPU is ground truth,
fed the same inputs.

compress: fed as one prefill and as chunks / decode steps, step after step (one call per case, every
backend: tests/conformance/test_compress.py); states must be identical, entries and pool rows equal
to fp32 rounding (exact-mode fake quant may flip a rare element sitting on a rounding boundary, so a
1% allowance applies there).
"""

import pytest
import torch

from backends.cuda.kernels.compress import compress
from backends.conformance import REF, gen, random_table
from v4.ops import CompressSpec

pytestmark = pytest.mark.gpu  # bench/gpu_check.sh runs these natively on a GPU

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


def dev(t):
    return t.to(DEV)


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
