"""Ascend compressor kernel (backends/ascend/kernels/compress.py) against the reference compressor,
fed step after step (one call per case, every backend: tests/conformance/test_compress.py).

The kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set before triton is
imported). Every step is fed in lockstep to three implementations on the same inputs:
- the kernel (fp32 inputs and state; fp32 or bf16 pool),
- ReferenceOps in fp32 (same dtypes): the state must be bit-identical, entries and pool rows
  equal to fp32 rounding (one bf16 ulp where the pool is bf16 and fp32 rounding differs just
  below the cast),
- ReferenceOps in fp64 on the same values (ground truth): entries and pool rows within what fp32
  allows; the angle of the RoPE is an fp32 product in both fp32 implementations, which at
  positions ~1000 alone accounts for ~1e-4 (near position 1M for ~0.03 rad, so that test compares
  with the fp32 reference only).
Where the pool is bf16, nearly all elements must also be bit-identical to the fp32 reference
(rounding to nearest even, which the interpreter's own fp32 -> bf16 cast does not do).
"""

import inspect

import pytest
import torch

from backends.ascend.kernels import compress as ck
from backends.ascend.kernels import launch
from backends.reference.ops import ReferenceOps
from v4.ops import CompressSpec

REF = ReferenceOps("cpu")
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
C, ROPE = 64, 32


def _spec(m, c=C, quant="none"):
    return CompressSpec(m, c, m == 4, quant, ROPE, 1e-6)


def _close(got, ref, rtol, atol, what):
    got, ref = got.double(), ref.double()
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    if ref.numel():
        err = (got - ref).abs() - (atol + rtol * ref.abs())
        assert bool((err <= 0).all()), f"{what}: max excess {float(err.max()):.3g}"


class _Three:
    """Kernel, fp32 reference and fp64 reference compressor state for `slots` sequences."""

    def __init__(self, spec, slots, bs, pool_dtype, seed, tokens, start, fp64=True):
        g = torch.Generator().manual_seed(seed)
        self.spec, self.pool_dtype, self.fp64 = spec, pool_dtype, fp64
        k, m, c = (2 if spec.overlap else 1), spec.ratio, spec.dim
        self.streams = [(torch.randn(tokens, k * c, generator=g), 2 * torch.randn(tokens, k * c, generator=g))
                        for _ in range(slots)]
        self.ape = 0.5 * torch.randn(m, k * c, generator=g)
        self.norm_w = 1.0 + 0.1 * torch.randn(c, generator=g)
        self.inv = (1.0 / 10000.0 ** (torch.arange(ROPE // 2, dtype=F64) / (ROPE // 2))).to(F32)
        per = -(-((max(start) + tokens) // m + 1) // bs)
        # far-out start positions: the logical blocks a slot touches are a handful of consecutive
        # ones, so they may share physical blocks modulo `phys` (keeps the pools small)
        phys = min(per, 16) if max(start) > 10_000 else per
        nb = slots * phys + 3
        perm = torch.randperm(nb, generator=g)[: slots * phys].view(slots, phys)
        self.table = perm[:, torch.arange(per) % phys].to(torch.int32)
        # a slot that starts at start > 0 reads this (random) state as its earlier tokens, identically on all sides
        state = (torch.randn(slots, k * m, k * c, generator=g), torch.randn(slots, k * m, k * c, generator=g))
        self.k = [state[0].clone(), state[1].clone(), torch.zeros(nb, bs, c, dtype=pool_dtype)]
        self.r32 = [state[0].clone(), state[1].clone(), torch.zeros(nb, bs, c, dtype=pool_dtype)]
        self.r64 = [state[0].double(), state[1].double(), torch.zeros(nb, bs, c, dtype=F64)]
        self.pos = list(start)
        self.used = [0] * slots

    def step(self, batch):
        """batch: [(slot, n_new)]; runs all three, compares, returns the kernel's entries."""
        kv, z, seqs, off = [], [], [], 0
        for slot, n in batch:
            kv.append(self.streams[slot][0][self.used[slot]:self.used[slot] + n])
            z.append(self.streams[slot][1][self.used[slot]:self.used[slot] + n])
            seqs.append((slot, self.pos[slot], n, off))
            off += n
            self.used[slot] += n
            self.pos[slot] += n
        kv, z = torch.cat(kv), torch.cat(z)
        a = (self.ape, self.spec, self.norm_w, self.inv)
        got = ck.compress(kv, z, *a, *self.k, self.table, seqs)
        r32 = REF.compress(kv, z, *a, *self.r32, self.table, seqs)
        r64 = REF.compress(kv.double(), z.double(), self.ape.double(), self.spec, self.norm_w.double(),
                           self.inv.double(), *self.r64, self.table, seqs)
        assert got.dtype == self.pool_dtype
        assert torch.equal(self.k[0], self.r32[0]) and torch.equal(self.k[1], self.r32[1]), "state differs"
        _close(self.k[1], self.r64[1], 1e-6, 1e-6, "score state vs fp64")
        if self.pool_dtype == BF16:
            tol32, tol64 = (2 ** -7, 1e-3), (2 ** -7, 3e-3)
        else:
            tol32, tol64 = (1e-5, 1e-5), (3e-4, 3e-4)
        for g, r, r6, what in ((got, r32, r64, "entries"), (self.k[2], self.r32[2], self.r64[2], "pool")):
            _close(g, r, *tol32, f"{what} vs fp32 reference")
            if self.fp64:
                _close(g, r6, *tol64, f"{what} vs fp64 reference")
            if self.pool_dtype == BF16 and r.numel():
                # rounding to nearest even (not truncation): nearly every element is bit-identical
                same = float((g == r).double().mean())
                assert same >= 0.97, f"{what}: only {same:.1%} of bf16 elements equal the reference"
        return got


def _run(spec, steps, *, slots=1, start=None, bs=3, pool_dtype=F32, seed=0, fp64=True):
    start = list(start or [0] * slots)
    tokens = max(sum(n for st in steps for s, n in st if s == k) for k in range(slots))
    three = _Three(spec, slots, bs, pool_dtype, seed, tokens, start, fp64)
    return [three.step(st) for st in steps], three


# ---------------------------------------------------------------------------------------- prefill


# ---------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("m,steps", [
    (4, [6] + [1] * 7),  # crosses the boundaries at 8 and 12 one token at a time
    (16, [13] + [1] * 5 + [14]),  # closes at 16 in decode, then a chunk that closes exactly at 32
    (128, [126] + [1] * 3),  # closes at 128 in decode
])
def test_prefill_then_decode_across_windows(m, steps):
    outs, _ = _run(_spec(m), [[(0, n)] for n in steps], seed=3 * m, bs=2)
    assert [o.shape[0] for o in outs] == [(sum(steps[:i + 1]) // m) - (sum(steps[:i]) // m) for i in range(len(steps))]


@pytest.mark.parametrize("m,steps", [(4, [3, 1, 4, 5, 3]), (16, [16, 15, 1, 17])])
def test_chunks_that_close_windows_exactly(m, steps):
    # state head + new tokens fill a window exactly (have > 0, left == 0), and a chunk starting at
    # a boundary that closes its window with its last token
    _run(_spec(m), [[(0, n)] for n in steps], seed=7 + m)


# ---------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("m", [4, 16])
def test_positions_near_one_million(m):
    # angles up to ~1e6 rad: the kernel reduces them mod 2*pi (Cody-Waite, both halves of the
    # multiple of 2*pi non-zero) before cos/sin. Against the fp32 reference only: an fp32 angle
    # of 1e6 is itself off by up to 0.03 rad from the fp64 one, in both fp32 implementations.
    steps = [[(0, 9), (1, 5)], [(1, 1), (0, 1)], [(0, 6), (1, 11)]]
    _run(_spec(m), steps, slots=2, start=[2 ** 19 + 5, 1_000_001], seed=40 + m, fp64=False)


def test_step_without_new_tokens_is_a_no_op():
    _, three = _run(_spec(4), [[(0, 5)]], seed=1)
    before = [t.clone() for t in three.k]
    kv = torch.zeros(0, 2 * C)
    out = ck.compress(kv, kv, three.ape, three.spec, three.norm_w, three.inv, *three.k, three.table, [(0, 5, 0, 0)])
    assert out.shape == (0, C) and all(torch.equal(a, b) for a, b in zip(three.k, before))


# ---------------------------------------------------------------------------------------- bf16 pool
@pytest.mark.parametrize("m,steps", [(4, [9, 1, 1, 1, 7]), (16, [20, 1, 12]), (128, [129])])
def test_bf16_pool(m, steps):
    _run(_spec(m), [[(0, n)] for n in steps], pool_dtype=BF16, seed=20 + m)


def test_entry_width_128_bf16():
    _run(_spec(4, c=128), [[(0, 10)], [(0, 2)]], pool_dtype=BF16, seed=5)


# ---------------------------------------------------------------------------------------- work split
def test_long_prefill_split_into_entry_chunks(monkeypatch):
    # two "cores": 23 entries past the state-reading ones go out in chunks of 3, several items per program
    monkeypatch.setattr(launch, "cores", lambda kind, device=None: 2)
    spec = _spec(4)
    plan, items, E = ck._plan([(0, 0, 100, 0)], 4, True, torch.device("cpu"))
    assert E == 25 and items == 1 + 8 and plan[1:, 6].tolist() == [3] * 7 + [2]
    _run(spec, [[(0, 100)], [(0, 1)]], seed=31)


# ---------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("quant", ["fp8", "fp4"])
def test_exact_mode_is_not_available(quant):
    kv = torch.zeros(4, 2 * C)
    with pytest.raises(NotImplementedError, match="FP8"):
        ck.compress(kv, kv, torch.zeros(4, 2 * C), _spec(4, quant=quant), torch.ones(C), torch.ones(ROPE // 2),
                    torch.zeros(1, 8, 2 * C), torch.zeros(1, 8, 2 * C), torch.zeros(2, 3, C),
                    torch.zeros(1, 2, dtype=torch.int32), [(0, 0, 4, 0)])


def test_fp64_is_rejected():
    kv = torch.zeros(4, 2 * C, dtype=F64)
    with pytest.raises(ValueError, match="float64"):
        ck.compress(kv, kv, torch.zeros(4, 2 * C, dtype=F64), _spec(4), torch.ones(C, dtype=F64),
                    torch.ones(ROPE // 2, dtype=F64), torch.zeros(1, 8, 2 * C, dtype=F64),
                    torch.zeros(1, 8, 2 * C, dtype=F64), torch.zeros(2, 3, C, dtype=F64),
                    torch.zeros(1, 2, dtype=torch.int32), [(0, 0, 4, 0)])


def test_lowering_cases_cover_the_kernel_and_fit_the_unified_buffer():
    names = {c.name for c in ck.LOWERING_CASES}
    assert names == {"compress_csa_main", "compress_csa_indexer", "compress_hca"}
    fn = ck.LOWERING_CASES[0].fn
    params = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
    for case in ck.LOWERING_CASES:
        assert set(case.signature) | set(case.constexprs) == set(params)
        assert not set(case.signature) & set(case.constexprs)
    for m, c, ov in ((4, 512, True), (4, 128, True), (128, 512, False)):
        assert ck._tiles(m, c, 64, ov)[-1] <= launch.UB_BUDGET
