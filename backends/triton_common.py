"""Helpers shared by the CUDA and the Ascend Triton kernels (one definition of each rounding rule).

The `@triton.jit` helpers stay inside the Ascend-legal subset (`backends/ascend/kernels/__init__.py`):
int32 bit arithmetic and fp32 math only, no fp64, no unsigned types, no fp8, no libdevice. Both
kernel families import them, so the backends round by construction the same way:
- `round_bf16`: fp32 -> the nearest-even bf16 value, kept in fp32 (Triton's interpreter casts
  fp32 -> bf16 by truncation; the GPU, the NPU and torch round to nearest even);
- `cast_rne`: `x.to(OUT)`, through `round_bf16` first where asked (the interpreter's bf16 casts);
  `round_to`: the same rounding, the value kept in fp32;
- `exp2i`, `ceil_log2`: exact powers of two and exponents from the fp32 bits (UE8M0 scales);
- `round_fp`: round to a small float grid (FP8 e4m3: EMIN -6, MBITS 3; FP4 e2m1: EMIN 0,
  MBITS 1), ties to even, subnormals kept, sign of zero kept;
- `with_sign_of`: copy a sign bit by bit (unary minus is 0 - x in some Triton versions);
- `sqrt_softplus`: the MoE gate score, softplus as the reference (torch) defines it.
Host side: `interpreting`, `pow2` and `gate_buffers` (the MoE gate launches' outputs and operands).

`apply_kernel` runs one helper elementwise; tests/backends/test_triton_common.py checks every helper with it
against torch, and backends/ascend/kernels/common.py lists its lowering cases.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# ------------------------------------------------------------------------------------ host side


def interpreting(kernel=None) -> bool:
    """Whether `kernel` runs in Triton's interpreter. triton.jit picks the interpreter when the
    kernel is decorated (TRITON_INTERPRET at import), so a kernel's own type decides; without a
    kernel, whether a kernel decorated now would be interpreted."""
    if kernel is not None:
        return type(kernel).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pow2(n: int) -> int:
    """The smallest power of two >= max(1, n) (tile sizes)."""
    return triton.next_power_of_2(max(1, int(n)))


def gate_buffers(x, weight, k: int):
    """A MoE gate launch's outputs (weights fp32 [T, k], expert ids int32 [T, k]) and its operands
    x [T, K], weight [E, K] with contiguous rows: (w_out, id_out, x, weight)."""
    T = x.shape[0]
    w_out = torch.empty(T, k, dtype=torch.float32, device=x.device)
    id_out = torch.empty(T, k, dtype=torch.int32, device=x.device)
    return w_out, id_out, x.contiguous(), weight.contiguous()


def collapse_buffers(X):
    """An mHC collapse launch's outputs for X [T, n, D] (u [T, D] in X's dtype, post [T, n] and comb
    [T, n, n] in fp32) and X itself with contiguous rows: (X, u, post, comb)."""
    T, n, D = X.shape
    u = torch.empty(T, D, dtype=X.dtype, device=X.device)
    post = torch.empty(T, n, dtype=torch.float32, device=X.device)
    comb = torch.empty(T, n, n, dtype=torch.float32, device=X.device)
    return X.contiguous(), u, post, comb


# ------------------------------------------------------------------------------------ jit helpers


@triton.jit
def round_bf16(x):
    """fp32 x -> the nearest-even bf16 value, still fp32 (the bits rounded as torch rounds them;
    NaN stays NaN unless its payload sits in the low 16 bits only)."""
    b = x.to(tl.int32, bitcast=True)
    return ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def cast_rne(x, OUT: tl.constexpr, RNE_BF16: tl.constexpr):
    """x.to(OUT); with RNE_BF16 (the interpreter) a cast to bf16 rounds to nearest even by hand first."""
    if RNE_BF16 and OUT == tl.bfloat16 and x.dtype != tl.bfloat16:
        return round_bf16(x.to(tl.float32)).to(OUT)
    else:
        return x.to(OUT)


@triton.jit
def round_to(x, OUT: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 x rounded to OUT's precision, returned as fp32; with RNE_BF16 (the interpreter) by
    `round_bf16` instead of the interpreter's truncating cast (which also flushes bf16 subnormals)."""
    if RNE_BF16:
        return round_bf16(x.to(tl.float32))
    else:
        return x.to(OUT).to(tl.float32)


@triton.jit
def exp2i(k):
    """Exact float32 2**k for int32 k in [-126, 127], from the bit pattern."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def ceil_log2(a):
    """ceil(log2(a)) for positive normal float32 a, exactly (from the exponent and mantissa bits)."""
    bits = a.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)


@triton.jit
def with_sign_of(mag, bits):
    """fp32 mag (>= 0) with the sign bit of the int32 pattern `bits`, so that -0.0 stays -0.0 (Triton
    3.6 compiles unary minus as 0 - x, which turns -(+0.0) into +0.0; 3.9 and numpy negate)."""
    return (mag.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def round_fp(v, EMIN: tl.constexpr, MBITS: tl.constexpr):
    """Round float32 v (already clamped to the format's range) to the nearest value with MBITS
    mantissa bits and minimum normal exponent EMIN (subnormals below), ties to even, by integer
    arithmetic on the fp32 bits (the interpreter's fp8 cast does not round to even)."""
    u = v.to(tl.int32, bitcast=True)
    # below 2^EMIN the grid step is 2^(EMIN - MBITS), the fp32 ulp at 2^(EMIN - MBITS + 23): adding
    # that power of two rounds to the step, ties to even (e4m3: 2^14, e2m1: 2^22)
    sub = (tl.abs(v) + (1 << (EMIN - MBITS + 23))) - (1 << (EMIN - MBITS + 23))
    sub = with_sign_of(sub, u)  # -0 and tiny negatives give -0, like the fp8 cast
    tiny = ((u >> 23) & 0xFF) < EMIN + 127  # |v| < 2^EMIN
    u = (u + ((1 << (22 - MBITS)) - 1) + ((u >> (23 - MBITS)) & 1)) & -(1 << (23 - MBITS))  # ties to even
    return tl.where(tiny, sub, u.to(tl.float32, bitcast=True))


@triton.jit
def sqrt_softplus(z):
    """sqrt(softplus(z)) with softplus as the reference's F.softplus: z above the threshold 20,
    else log1p(exp(z)); exp of at most 20 (no overflow), and log1p(u) = log(1 + u) * u / ((1 + u) - 1),
    the correction that keeps it accurate when 1 + u rounds (u itself when 1 + u rounds to 1):
    tl.exp / tl.log only, no libdevice."""
    u = tl.exp(tl.minimum(z, 20.0))
    w = 1.0 + u
    den = w - 1.0
    lp = tl.where(den == 0.0, u, tl.log(w) * (u / tl.where(den == 0.0, 1.0, den)))
    return tl.sqrt(tl.where(z > 20.0, z, lp))


# ------------------------------------------------------------------------------------ harness

# apply_kernel's OP codes
OP_ROUND_BF16, OP_CAST_BF16, OP_EXP2I, OP_CEIL_LOG2, OP_E4M3, OP_E2M1, OP_SQRT_SOFTPLUS, OP_ROUND_TO_BF16 = range(8)


@triton.jit
def apply_kernel(x_ptr, out_ptr, n, OP: tl.constexpr, RNE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """out = helper(x) elementwise over n elements; a persistent loop over blocks (the Ascend shape).
    x: fp32 (int32 for OP_EXP2I); out: fp32 (bf16 for OP_CAST_BF16, int32 for OP_CEIL_LOG2)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for blk in range(pid, tl.cdiv(n, BLOCK), nprog):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0)
        if OP == 0:
            y = round_bf16(x)
        elif OP == 1:
            y = cast_rne(x, tl.bfloat16, RNE_BF16)
        elif OP == 2:
            y = exp2i(x)
        elif OP == 3:
            y = ceil_log2(x)
        elif OP == 4:
            y = round_fp(x, -6, 3)
        elif OP == 5:
            y = round_fp(x, 0, 1)
        elif OP == 6:
            y = sqrt_softplus(x)
        else:
            y = round_to(x, tl.bfloat16, RNE_BF16)
        tl.store(out_ptr + offs, y, mask=m)
