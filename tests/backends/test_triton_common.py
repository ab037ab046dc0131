"""backends/triton_common.py: every shared @triton.jit helper against a torch formula on its edge cases
(ties, subnormals, signed zero, inf / nan where the helper meets them), run through `apply_kernel` in
Triton's interpreter. The MoE gates of both kernel families around softplus' threshold:
tests/conformance/test_gate.py."""

import math
import os

import torch
import torch.nn.functional as F

from backends import triton_common as tc

F32_MIN_NORMAL = 2.0 ** -126


def _bits(*patterns) -> torch.Tensor:
    return torch.tensor([p - (1 << 32) if p >= 1 << 31 else p for p in patterns], dtype=torch.int32).view(torch.float32)


def _apply(op: int, x: torch.Tensor, out_dtype=torch.float32, rne: bool = False) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=out_dtype)
    tc.apply_kernel[(2,)](x, out, x.numel(), OP=op, RNE_BF16=rne, BLOCK=64)
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit equality, any NaN matching any NaN (torch writes a canonical NaN, the helpers keep the input's)."""
    assert a.dtype == b.dtype
    if a.is_floating_point():
        nan = a.isnan()
        assert torch.equal(nan, b.isnan())
        a, b = a[~nan], b[~nan]
    ia = a.view(torch.int16 if a.element_size() == 2 else torch.int32)
    ib = b.view(torch.int16 if b.element_size() == 2 else torch.int32)
    bad = (ia != ib).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} differ, first at {bad[:4].tolist()}: {a[bad[:4]].tolist()} vs {b[bad[:4]].tolist()}"
    )


BF16_EDGES = _bits(
    0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,  # ties to even (down, up), just above / below a tie
    0xBF808000, 0xBF818000,  # the same, negative
    0x00008000, 0x00018000, 0x00007FFF, 0x00000001, 0x80008000, 0x807FFFFF,  # subnormals, ties among them
    0x00000000, 0x80000000,  # signed zero
    0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000,  # near the top: round up to inf, stay, tie
    0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,  # inf, quiet NaN
)


def _bf16_cases() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.cat([BF16_EDGES, torch.randn(4000) * 10.0 ** torch.randint(-30, 30, (4000,)).float()])


def test_round_bf16_matches_torchs_cast():
    x = _bf16_cases()
    _same_bits(_apply(tc.OP_ROUND_BF16, x), x.to(torch.bfloat16).float())


def test_cast_rne_to_bf16_matches_torchs_cast():
    x = _bf16_cases()
    # the interpreter's own fp32 -> bf16 cast flushes subnormal results to zero (round_bf16 keeps them)
    x = x[~((x.abs() < F32_MIN_NORMAL) & (x != 0))]
    _same_bits(_apply(tc.OP_CAST_BF16, x, torch.bfloat16, rne=True), x.to(torch.bfloat16))


def test_round_to_bf16_keeps_the_rounded_value_in_fp32():
    x = _bf16_cases()
    _same_bits(_apply(tc.OP_ROUND_TO_BF16, x, rne=True), x.to(torch.bfloat16).float())


def test_every_helper_has_a_lowering_case():
    from backends.ascend.kernels import common, lowering_cases

    ops = {c.constexprs["OP"] for c in common.LOWERING_CASES}
    assert ops == set(range(tc.OP_ROUND_TO_BF16 + 1))
    assert all(c in lowering_cases() for c in common.LOWERING_CASES)


def test_exp2i_is_exact_over_the_normal_range():
    k = torch.arange(-126, 128, dtype=torch.int32)
    _same_bits(_apply(tc.OP_EXP2I, k), torch.tensor([math.ldexp(1.0, int(i)) for i in k], dtype=torch.float32))


def test_ceil_log2_on_powers_of_two_and_their_neighbours():
    p = torch.tensor([math.ldexp(1.0, e) for e in range(-126, 128)], dtype=torch.float32)
    up = torch.nextafter(p, torch.tensor(math.inf))
    down = torch.nextafter(p, torch.tensor(0.0))[1:]  # below 2^-126 is subnormal: outside the domain
    x = torch.cat([p, up, down, torch.tensor([F32_MIN_NORMAL, 3.4028234663852886e38, 448.0, 1e-4 / 448])])
    want = torch.ceil(torch.log2(x.double())).to(torch.int32)
    assert torch.equal(_apply(tc.OP_CEIL_LOG2, x, torch.int32), want)


def _e4m3_cases() -> torch.Tensor:
    step = 2.0 ** -9  # the e4m3 subnormal step
    edges = [0.0, -0.0, step / 2, -step / 2, 3 * step / 2, step / 4, -step / 4, 2.0 ** -6, 2.0 ** -6 - step / 2,
             1.0625, 1.1875, -1.0625, 1.0625 + 2.0 ** -20, 448.0, -448.0, 440.0, 432.0, 424.0, 240.0, 232.0]
    torch.manual_seed(1)
    rnd = torch.randn(4000) * 10.0 ** torch.randint(-4, 3, (4000,)).float()
    return torch.cat([torch.tensor(edges), rnd]).clamp(-448.0, 448.0)


def test_round_fp_e4m3_matches_torchs_fp8_cast():
    x = _e4m3_cases()
    _same_bits(_apply(tc.OP_E4M3, x), x.to(torch.float8_e4m3fn).float())


def _e2m1_truth(x: torch.Tensor) -> torch.Tensor:
    """Nearest FP4 e2m1 value, ties to the even code (the grid index), sign kept (also for zero)."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    d = (x.double().abs()[:, None] - grid[None, :]).abs()
    best = d.min(1, keepdim=True).values
    idx = torch.where(d == best, torch.arange(8), 99)
    even = torch.where(idx % 2 == 0, idx, 99).min(1).values
    idx = torch.where(even < 99, even, idx.min(1).values)
    return torch.copysign(grid[idx].float(), x)


def test_round_fp_e2m1_ties_to_even_and_keeps_the_sign_of_zero():
    edges = [0.0, -0.0, 0.25, -0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 6.0, 0.1, -0.1, 0.2500001, 4.9999995]
    torch.manual_seed(2)
    x = torch.cat([torch.tensor(edges), (torch.rand(3000) * 12 - 6)])
    _same_bits(_apply(tc.OP_E2M1, x), _e2m1_truth(x))


# ------------------------------------------------------------------------------- sqrt-softplus


def _sqrt_softplus_cases() -> torch.Tensor:
    around = torch.linspace(19.0, 21.0, 2001)  # crosses the threshold 20
    return torch.cat([around, torch.tensor([20.0, 20.000002, 19.999998, 0.0, -0.0, 1e-30, -1e-30,
                                            -20.0, -87.0, -88.7, -103.0, -104.0, -200.0, 88.0, 1e6,
                                            float("inf"), float("-inf")]),
                      torch.linspace(-120.0, 40.0, 4001), torch.randn(2000) * 5])


def test_sqrt_softplus_is_the_references_definition():
    z = _sqrt_softplus_cases()
    got = _apply(tc.OP_SQRT_SOFTPLUS, z)
    truth = torch.sqrt(F.softplus(z.double()))  # threshold 20 as well: z itself above it
    # above the threshold the score is sqrt(z) itself: correctly rounded, as float64's sqrt rounded
    above = z > 20
    _same_bits(got[above], truth[above].float())
    # everywhere within 2 ulp of the float64 value of the same definition; where softplus itself is
    # subnormal in fp32 (z < -87.3) it is off by up to half a step, 2^-150: sqrt(2^-150) more
    ulp = (truth.float().abs() * 2.0 ** -23).double()
    tol = 2 * ulp + torch.where(truth * truth < F32_MIN_NORMAL, 2.0 ** -75, 0.0)
    fin = torch.isfinite(truth)
    assert ((got.double() - truth).abs()[fin] <= tol[fin]).all()
    assert torch.equal(got[~fin], truth[~fin].float())


def test_interpreting_reads_the_kernels_own_type():
    assert tc.interpreting(tc.apply_kernel)
    assert not tc.interpreting(lambda: None)
    assert tc.interpreting() == (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


def test_pow2():
    assert [tc.pow2(n) for n in (0, 1, 2, 3, 16, 17)] == [1, 1, 2, 4, 16, 32]
