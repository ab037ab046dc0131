"""CUDA backend GEMMs (backends/cuda/kernels/gemm.py) against the reference ops.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set before triton is imported); with one they run on it. Ground truth: ReferenceOps("cpu"), in the
same working dtype (the kernels keep the reference's rounding points, so bf16 results agree to a
bf16 ulp here and there from fp32 summation order) and in fp64 for the fp32 runs. FP8 / FP4
weights come from v4.quant.quant_fp8_block / quant_fp4 of random weights; the reference dequantises
them in prepare_linear, the kernels dequantise tiles in registers.
"""

import pytest
import torch

from backends.conformance import FP8_MMA_GPU_TOL, GEMM_TOL, GEMM_TOL_ACT_QUANT, stored_weight
from backends.cuda.kernels import gemm
from backends.reference.ops import ReferenceOps
from v4 import quant

GPU = torch.cuda.is_available()

pytestmark = pytest.mark.gpu  # bench/gpu_check.sh runs these natively on a GPU

DEV = "cuda" if GPU else "cpu"
REF = ReferenceOps("cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


stored = stored_weight  # a random float weight in one of the checkpoint's stored forms


def ref_w(w, dtype):
    return REF.prepare_linear(w, dtype)


# bf16 agreement to an ulp, one FP8 code with act_quant; FP8 MMA on a GPU (the conformance rules)
TOL, TOL_AQ = GEMM_TOL, GEMM_TOL_ACT_QUANT
FP8_MMA_ON_GPU = GPU and gemm._fp8_mma_default(torch.empty(0, device=DEV))


# ------------------------------------------------------------------------------------ act quant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [128, 64])
def test_act_quant_bit_exact(dtype, block):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 300, generator=g) * torch.logspace(-6, 3, 37)[:, None]
    x[3] = 0  # all-zero row: the 1e-4 amax floor
    x[4, :128] = 448.0 * 2.0 ** torch.arange(-64, 64).float().div(8).floor()  # powers of two (fp16-finite)
    # exact e4m3 midpoints (ties go to even) and subnormal midpoints, relative to a 448 amax
    x[5, 0] = 448.0
    x[5, 1:9] = torch.tensor([1.0625, 1.1875, 9.0, 11.0, 2**-10, 3 * 2**-10, 5 * 2**-10, 460.0])
    x[5, 9:17] = -x[5, 1:9]
    x = x.to(dtype)
    want = quant.act_quant_fp8(x, block)
    got = gemm.act_quant_fp8(x.to(DEV), block).cpu()
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32))


# ------------------------------------------------------------------------------------ weights


def test_prepare_linear_keeps_stored_form():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(200, 160, generator=g)
    for fmt in ("fp8", "fp4"):
        q = stored(w, fmt)
        cw = gemm.prepare_linear(q, torch.bfloat16, DEV)
        assert cw.fmt == fmt and cw.shape == (200, 160) and cw.dtype == torch.bfloat16
        assert cw.data.dtype == (torch.float8_e4m3fn if fmt == "fp8" else torch.int8)
        assert cw.scale.dtype == torch.float32
        assert cw.scale.shape == ((2, 2) if fmt == "fp8" else (200, 5))
        assert torch.equal(cw.dequantize().cpu(), ref_w(q, torch.bfloat16))
    cw = gemm.prepare_linear(w, torch.float16, DEV)
    assert cw.fmt == "dense" and cw.scale is None and cw.data.dtype == torch.float16
    with pytest.raises(ValueError):
        gemm.prepare_linear(quant.QuantizedWeight("fp8", w.to(torch.float8_e4m3fn), torch.ones(1, 1)), torch.bfloat16)
    with pytest.raises(ValueError):
        gemm.prepare_linear(w, torch.float64)


def test_prepare_experts_stacks_halves():
    g = torch.Generator().manual_seed(3)
    E, inter, D = 3, 96, 160  # inter not a multiple of 128: W1 and W3 keep separate fp8 scale rows
    for fmt in ("dense", "fp8", "fp4"):
        w1 = [stored(torch.randn(inter, D, generator=g), fmt) for _ in range(E)]
        w3 = [stored(torch.randn(inter, D, generator=g), fmt) for _ in range(E)]
        w2 = [stored(torch.randn(D, inter, generator=g), fmt) for _ in range(E)]
        c13, c2 = gemm.prepare_experts(w1, w3, w2, torch.float32, DEV)
        assert c13.shape == (E, 2 * inter, D) and c2.shape == (E, D, inter) and c13.split == inter
        want13 = torch.stack([torch.cat([ref_w(a, torch.float32), ref_w(b, torch.float32)]) for a, b in zip(w1, w3)])
        assert torch.equal(c13.dequantize().cpu(), want13)
        assert torch.equal(c2[1].dequantize().cpu(), ref_w(w2[1], torch.float32))
    with pytest.raises(ValueError):
        gemm.prepare_experts(w1, w3[:2], w2, torch.float32)


# ------------------------------------------------------------------------------------ linear


@pytest.mark.parametrize("fmt", ["dense", "fp8", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 96, 160), (129, 72, 288)])
def test_linear(fmt, dtype, act_quant, M, N, K):
    g = torch.Generator().manual_seed(M * 7 + N)
    w = stored(torch.randn(N, K, generator=g) * 0.05, fmt)
    x = (torch.randn(M, K, generator=g) * 3).to(dtype)
    y = gemm.linear(x.to(DEV), gemm.prepare_linear(w, dtype, DEV), act_quant)
    assert y.dtype == dtype and y.shape == (M, N)
    want = REF.linear(x, ref_w(w, dtype), act_quant)
    fp8_mma = FP8_MMA_ON_GPU and fmt == "fp8" and act_quant
    tol = (TOL_AQ if act_quant else TOL)[dtype]
    assert rel(y, want) <= (max(tol, FP8_MMA_GPU_TOL) if fp8_mma else tol)
    if dtype == torch.float32:  # fp64 ground truth of the same (dequantised / fake-quantised) operands
        x64 = quant.act_quant_fp8(x).double() if act_quant else x.double()
        assert rel(y, REF.linear(x64, ref_w(w, torch.float64))) <= (FP8_MMA_GPU_TOL if fp8_mma else 1e-6)


def test_linear_mixed_dtypes_and_shapes():
    """x in another dtype than the weight (rounded like x.to(w.dtype)); leading dims; fp16; K = 0 rows."""
    g = torch.Generator().manual_seed(5)
    w = stored(torch.randn(48, 256, generator=g) * 0.05, "fp8")
    x = torch.randn(2, 3, 256, generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        y = gemm.linear(x.to(DEV), gemm.prepare_linear(w, dtype, DEV), True)
        assert y.shape == (2, 3, 48) and y.dtype == dtype
        assert rel(y, REF.linear(x, ref_w(w, dtype), True)) <= TOL_AQ[dtype]
    # a plain tensor is a dense weight in its own dtype
    wd = torch.randn(48, 256, generator=g, dtype=torch.float32)
    assert rel(gemm.linear(x.to(DEV), wd.to(DEV)), REF.linear(x, wd)) <= TOL[torch.float32]
    assert gemm.linear(x[:0].to(DEV), wd.to(DEV)).shape == (0, 3, 48)


def test_fp8_native_dot_path_matches_dequant_path():
    """act_quant x FP8 weights: native fp8 dot (scaled per 128-block) vs q*s fed in the working dtype."""
    g = torch.Generator().manual_seed(6)
    w = gemm.prepare_linear(stored(torch.randn(80, 384, generator=g) * 0.05, "fp8"), torch.bfloat16, DEV)
    x = torch.randn(20, 384, generator=g).bfloat16().to(DEV)
    a = gemm.linear(x, w, True, fp8_mma=True)
    b = gemm.linear(x, w, True, fp8_mma=False)
    assert rel(a, b) <= TOL[torch.bfloat16]
    assert rel(a, REF.linear(x.cpu(), w.dequantize().cpu(), True)) <= TOL_AQ[torch.bfloat16]


# ------------------------------------------------------------------------------------ grouped out proj


@pytest.mark.parametrize("fmt_a,fmt_b,dtype,act_quant,groups,T", [
    ("fp8", "fp8", torch.bfloat16, True, 4, 5),
    ("fp8", "fp8", torch.float32, False, 2, 129),
    ("dense", "fp4", torch.bfloat16, False, 2, 3),
    ("dense", "dense", torch.float32, True, 4, 1),
])
def test_grouped_out_proj(fmt_a, fmt_b, dtype, act_quant, groups, T):
    g = torch.Generator().manual_seed(groups * 10 + T)
    R, Kg, D = 48, 96, 160  # R, Kg, D not multiples of 128: groups straddle fp8 scale blocks
    wo_a = stored(torch.randn(groups * R, Kg, generator=g) * 0.1, fmt_a)
    wo_b = stored(torch.randn(D, groups * R, generator=g) * 0.1, fmt_b)
    o = torch.randn(T, groups * Kg, generator=g).to(dtype)
    y = gemm.grouped_out_proj(o.to(DEV), gemm.prepare_linear(wo_a, dtype, DEV), gemm.prepare_linear(wo_b, dtype, DEV),
                              groups, act_quant)
    assert y.dtype == dtype and y.shape == (T, D)
    want = REF.grouped_out_proj(o, ref_w(wo_a, dtype), ref_w(wo_b, dtype), groups, act_quant)
    assert rel(y, want) <= (TOL_AQ if act_quant else TOL)[dtype]


# ------------------------------------------------------------------------------------ MoE


def _routing(T, E, k, pattern, g):
    if pattern == "random":
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    elif pattern == "one_expert_all":  # expert 1 gets every token (slot 0), the rest spread
        rest = torch.stack([torch.randperm(E - 1, generator=g)[: k - 1] for _ in range(T)])
        ids = torch.cat([torch.ones(T, 1, dtype=torch.long), rest + (rest >= 1).long()], dim=1)
    elif pattern == "few_experts":  # most experts get no token
        ids = torch.stack([torch.randperm(3, generator=g)[:k] for _ in range(T)]) * 2
    else:
        raise ValueError(pattern)
    w = torch.rand(T, k, generator=g) * 2 + 0.1
    return ids.to(torch.int32), w


def _experts(E, inter, D, fmt, g, scale=0.1):
    w1 = [stored(torch.randn(inter, D, generator=g) * scale, fmt) for _ in range(E)]
    w3 = [stored(torch.randn(inter, D, generator=g) * scale, fmt) for _ in range(E)]
    w2 = [stored(torch.randn(D, inter, generator=g) * scale, fmt) for _ in range(E)]
    return w1, w3, w2


def _ref_stack(w1, w3, w2, dtype):
    w13 = torch.stack([torch.cat([ref_w(a, dtype), ref_w(b, dtype)]) for a, b in zip(w1, w3)])
    return w13, torch.stack([ref_w(c, dtype) for c in w2])


MOE_CASES = [
    # T, E, D, inter, fmt, shared_fmt, dtype, act_quant, pattern
    (1, 8, 128, 64, "fp4", "fp8", torch.bfloat16, True, "random"),
    (3, 4, 64, 32, "dense", None, torch.float32, False, "random"),
    (4, 8, 96, 64, "fp8", "fp8", torch.bfloat16, False, "few_experts"),
    (5, 6, 128, 32, "fp4", "dense", torch.float32, True, "one_expert_all"),
    (5, 4, 64, 64, "fp8", None, torch.float32, True, "random"),
    (127, 8, 128, 64, "fp4", "fp8", torch.bfloat16, True, "random"),
    (128, 4, 64, 32, "dense", "dense", torch.bfloat16, False, "one_expert_all"),
    (129, 6, 96, 64, "fp8", "fp8", torch.float32, False, "few_experts"),
    (129, 4, 128, 32, "fp4", None, torch.float32, False, "random"),
]


@pytest.mark.parametrize("T,E,D,inter,fmt,shared_fmt,dtype,act_quant,pattern", MOE_CASES)
def test_moe_experts(T, E, D, inter, fmt, shared_fmt, dtype, act_quant, pattern):
    g = torch.Generator().manual_seed(T * 100 + E)
    k, limit = 2, 1.5
    w1, w3, w2 = _experts(E, inter, D, fmt, g)
    ids, wts = _routing(T, E, k, pattern, g)
    x = (torch.randn(T, D, generator=g) * 2).to(dtype)
    c13, c2 = gemm.prepare_experts(w1, w3, w2, dtype, DEV)
    r13, r2 = _ref_stack(w1, w3, w2, dtype)
    shared = ref_shared = None
    if shared_fmt is not None:
        s1, s3, s2 = _experts(1, inter, D, shared_fmt, g)
        cs13, cs2 = gemm.prepare_experts(s1, s3, s2, dtype, DEV)
        shared = (cs13[0], cs2[0])
        rs13, rs2 = _ref_stack(s1, s3, s2, dtype)
        ref_shared = (rs13[0], rs2[0])
    y = gemm.moe_experts(x.to(DEV), ids.to(DEV), wts.to(DEV), c13, c2, shared, limit, act_quant)
    assert y.dtype == dtype and y.shape == (T, D)
    want = REF.moe_experts(x, ids, wts, r13, r2, ref_shared, limit, act_quant)
    assert rel(y, want) <= (TOL_AQ if act_quant else TOL)[dtype]
    if dtype == torch.float32 and not act_quant:
        r13d, r2d = _ref_stack(w1, w3, w2, torch.float64)
        sd = None
        if shared is not None:
            a, b = _ref_stack(s1, s3, s2, torch.float64)
            sd = (a[0], b[0])
        assert rel(y, REF.moe_experts(x.double(), ids, wts.double(), r13d, r2d, sd, limit)) <= 1e-5


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter: sigmoid(-large)
def test_moe_clamp_is_active_and_plain_tensors():
    """Large activations hit the SwiGLU clamp; stacked torch tensors work as dense weights; T = 0."""
    g = torch.Generator().manual_seed(9)
    E, inter, D, T, k = 4, 32, 64, 6, 2
    w13 = torch.randn(E, 2 * inter, D, generator=g)
    w2 = torch.randn(E, D, inter, generator=g) * 0.1
    ids, wts = _routing(T, E, k, "random", g)
    x = torch.randn(T, D, generator=g) * 4
    h = x @ w13[0].t()
    assert h.abs().max() > 10  # the limit below bites
    y = gemm.moe_experts(
        x.to(DEV), ids.to(DEV), wts.to(DEV), w13.to(DEV), w2.to(DEV), (w13[1].to(DEV), w2[1].to(DEV)), 7.0
    )
    want = REF.moe_experts(x, ids, wts, w13, w2, (w13[1], w2[1]), 7.0)
    assert rel(y, want) <= TOL[torch.float32]
    assert gemm.moe_experts(
        x[:0].to(DEV), ids[:0].to(DEV), wts[:0].to(DEV), w13.to(DEV), w2.to(DEV), None, 7.0
    ).shape == (0, D)


def test_moe_topk_six_expert_order_sum():
    """k = 6 (V4's top-k): the combine sums each token's pairs in expert order, as the reference does."""
    g = torch.Generator().manual_seed(10)
    E, inter, D, T, k = 8, 32, 64, 4, 6
    w1, w3, w2 = _experts(E, inter, D, "dense", g)
    ids, wts = _routing(T, E, k, "random", g)
    x = torch.randn(T, D, generator=g)
    c13, c2 = gemm.prepare_experts(w1, w3, w2, torch.float32, DEV)
    r13, r2 = _ref_stack(w1, w3, w2, torch.float32)
    y = gemm.moe_experts(x.to(DEV), ids.to(DEV), wts.to(DEV), c13, c2, None, 10.0)
    assert rel(y, REF.moe_experts(x, ids, wts, r13, r2, None, 10.0)) <= TOL[torch.float32]
