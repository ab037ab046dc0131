"""Tiny self-made kernels for the Ascend lowering check (backends/ascend/lowering.py), not model kernels.

    .venv-ascend/bin/python -m backends.ascend.lowering --module tests.ascend_lowering_samples
    .venv-ascend/bin/python -m backends.ascend.lowering --module tests.ascend_lowering_samples:BROKEN_CASES

LOWERING_CASES must all PASS (they prove the tool itself works: a vector kernel in the persistent-loop
shape the real kernels use, a row reduction, and a cube `tl.dot` GEMM). BROKEN_CASES must all FAIL,
each at a different stage (front-end fp64 rejection, an op verifier in HFusion->HIVM, Unified Buffer
overflow in HIVM memory planning), so the check can be shown to catch what it claims to catch.
tests/backends/ascend/test_lowering.py runs both.
"""

from __future__ import annotations

import triton
import triton.language as tl

from backends.ascend.kernels.launch import LoweringCase


@triton.jit
def sample_add(x_ptr, y_ptr, out_ptr, n, NPROG: tl.constexpr, BLOCK: tl.constexpr):
    # persistent 1D grid: program `pid` walks blocks pid, pid + NPROG, ...
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n, BLOCK)
    for blk in range(pid, n_blocks, NPROG):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, x + y, mask=mask)


@triton.jit
def sample_rms_rows(x_ptr, w_ptr, out_ptr, n_rows, eps, NPROG: tl.constexpr, D: tl.constexpr):
    # one row per iteration: bf16 in, fp32 math, bf16 out (D = 512, a 1 KiB bf16 row)
    pid = tl.program_id(0)
    cols = tl.arange(0, D)
    w = tl.load(w_ptr + cols).to(tl.float32)
    for row in range(pid, n_rows, NPROG):
        x = tl.load(x_ptr + row * D + cols).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        tl.store(out_ptr + row * D + cols, (x * inv * w).to(tl.bfloat16))


@triton.jit
def sample_gemm(a_ptr, b_ptr, c_ptr, M, N, K, NPROG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr):
    # C[M, N] = A[M, K] @ B[K, N], fp16 in, fp32 accumulate; persistent loop over output tiles
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BN)
    n_tiles = tl.cdiv(M, BM) * tiles_n
    for tile in range(pid, n_tiles, NPROG):
        rm = (tile // tiles_n) * BM + tl.arange(0, BM)
        rn = (tile % tiles_n) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + rk[:, None] * N + rn[None, :], mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def broken_fp64_scale(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # fp64 loads/stores: Ascend has no fp64 (ascend.md section 2.2); triton-ascend's front end rejects it
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0, mask=mask)


@triton.jit
def broken_ub_overflow(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # one 64 Ki-element fp32 tile (256 KiB, several live copies): far over the 192 KiB Unified Buffer
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, tl.exp(x) + tl.sqrt(x) * x)


@triton.jit
def broken_sort_i32(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # tl.sort lacks int32 on Ascend (ascend.md section 2.2): BiShengIR's hivm.hir.vsort verifier rejects it
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.sort(tl.load(x_ptr + offs)))


LOWERING_CASES = [
    LoweringCase("sample_add", sample_add, {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"},
                 {"NPROG": 40, "BLOCK": 1024}),
    LoweringCase("sample_rms_rows", sample_rms_rows,
                 {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "n_rows": "i32", "eps": "fp32"},
                 {"NPROG": 40, "D": 512}),
    LoweringCase("sample_gemm", sample_gemm,
                 {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32"},
                 {"NPROG": 20, "BM": 64, "BN": 64, "BK": 32}, kind="cube"),
]

BROKEN_CASES = [
    LoweringCase("broken_fp64_scale", broken_fp64_scale, {"x_ptr": "*fp64", "out_ptr": "*fp64", "n": "i32"},
                 {"BLOCK": 256}),
    LoweringCase("broken_ub_overflow", broken_ub_overflow, {"x_ptr": "*fp32", "out_ptr": "*fp32"},
                 {"BLOCK": 65536}),
    LoweringCase("broken_sort_i32", broken_sort_i32, {"x_ptr": "*i32", "out_ptr": "*i32"}, {"BLOCK": 256}),
]
