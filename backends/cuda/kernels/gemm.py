"""Triton GEMMs of the CUDA backend: `linear`, `grouped_out_proj`, `moe_experts`.

Weights stay in their stored form (`CudaWeight`): dense bf16/fp16/fp32, FP8 e4m3 with one fp32
multiplier per 128x128 block, or FP4 e2m1 (two per byte, element 2k in the LOW nibble) with one fp32
multiplier per 32 input channels. The kernels dequantise each weight tile in registers; nothing is
expanded in memory.

Numerics (the rounding points of `backends/reference/ops.py`, kept on purpose):
- "working dtype" = the dtype given to `prepare_linear` (`CudaWeight.dtype`). The activation tile is
  rounded to it, the weight tile is dequantised exactly into it (e4m3 * 2^k and e2m1 * 2^k are
  bf16-exact), products accumulate in fp32 (`tl.dot`, fp32 operands with input_precision="ieee"),
  and the output is rounded to it: exactly `F.linear(x.to(w.dtype), w_dequantised)`.
- act_quant (exact mode): the activation tile is quantised in the GEMM prologue, per row per 128
  channels (BK = 128, so one K tile is one quantisation block), with `v4.quant.act_quant_fp8`
  semantics: s = 2^ceil(log2(max(amax, 1e-4) / 448)), q = e4m3_rne(clamp(x / s, +-448)). The e4m3
  rounding is done with integer bit arithmetic, so it is round-to-nearest-even with subnormals on
  the GPU and in the interpreter alike. With FP8 weights on sm89+ the product is a native
  fp8 x fp8 `tl.dot` per 128-wide K block, scaled by s_x (row) * s_w (block) and added to the fp32
  accumulator once per block ("promotion" every 128 channels); otherwise q * s is fed to the MMA
  in the working dtype (exact).
- The interpreter casts fp32 -> bf16 by truncation and cannot `tl.dot` bf16; with `soft` numerics
  (CPU tensors) bf16 rounding is done by bit arithmetic and dots run on fp32 copies of the
  bf16-rounded operands, which is the same arithmetic as a bf16 MMA with fp32 accumulation.

Kernel map:
- `_linear_kernel`      grid (M tiles, N tiles, groups): y[:, g] = x[:, g] W_g^T; `linear` is groups=1,
                        `grouped_out_proj` runs its wo_a stage as one launch with groups=G.
- `_moe_up_kernel`      grid (expert row tiles, I tiles): rows sorted by expert; gathers token rows,
                        one K loop feeds both the W1 and the W3 tile (A loaded / quantised once),
                        epilogue = clamped SwiGLU * routing weight, rounded to x's dtype.
- `_moe_down_kernel`    grid (expert row tiles, D tiles): per-pair rows h @ W2_e^T, written per pair
                        (rounded to W2's working dtype, as the reference does).
- `_moe_combine_kernel` grid (token tiles, D tiles): out[t] = sum of its k pair rows in expert order
                        (+ the shared expert's row) in fp32, one rounding to x's dtype.
- `_act_quant_kernel`   standalone FP8 fake-quant (`act_quant_fp8`), same numerics as the prologue.

MoE routing glue (torch, on the device, no host sync): argsort of the flat expert ids (stable) gives
the sorted (token, slot) pairs, a scatter-add counts the rows per expert, and a searchsorted over the cumulative
row-tile counts maps program t to (expert, first row, row end); the grid is the host-side bound
min(P, cdiv(P, BM) + min(E, P)) and surplus programs exit at once. The shared expert runs through
the same two kernels as one expert over all tokens with no routing weight. Per-pair rows + a
separate combine instead of fp32 atomics: the result is deterministic (the parity noise floor is
"same backend twice"), the pair outputs are rounded to W2's dtype exactly where the reference rounds
them, and the sum order equals the reference's index_add order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from v4 import quant

from ...triton_common import cast_rne, ceil_log2, exp2i, round_fp

FP8_BLOCK = 128
FP4_BLOCK = 32
_FMT = {"dense": 0, "fp8": 1, "fp4": 2}
_WORK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ============================================================================================ weights


@dataclass(eq=False)
class CudaWeight:
    """A weight in the form the kernels read (never dequantised in memory).

    fmt "dense": data [..., N, K] in `dtype`; scale None.
    fmt "fp8":   data float8_e4m3fn [..., N, K]; scale fp32 multipliers [..., ceil(N/128), ceil(K/128)].
    fmt "fp4":   data int8 [..., N, K // 2] (element 2k in the low nibble); scale fp32 [..., N, K // 32].
    dtype: the working dtype (operands are rounded to it, the output is in it).
    split: for a stacked [W1; W3] (w13) the number of W1 rows; each half keeps its own scale rows
      (for fp8 the first ceil(split/128) scale rows belong to W1). 0 when not stacked.
    A leading dim, when present, is the expert dim: `w[e]` is expert e as a 2-D CudaWeight.
    """

    fmt: str
    data: torch.Tensor
    scale: torch.Tensor | None
    dtype: torch.dtype
    split: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, n, k = self.data.shape
        return (*lead, n, 2 * k if self.fmt == "fp4" else k)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dim(self) -> int:
        return self.data.dim()

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def split_scale_rows(self) -> int:
        if self.fmt == "fp8":
            return -(-self.split // FP8_BLOCK)
        return self.split if self.fmt == "fp4" else 0

    def __getitem__(self, i: int) -> "CudaWeight":
        if self.data.dim() != 3:
            raise IndexError("only a stacked (3-D) CudaWeight can be indexed by expert")
        return CudaWeight(self.fmt, self.data[i], None if self.scale is None else self.scale[i], self.dtype, self.split)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense tensor (for checks and debugging; the kernels never do this)."""
        dtype = dtype or self.dtype
        if self.data.dim() == 3:
            return torch.stack([self[e].dequantize(dtype) for e in range(len(self))])
        if self.fmt == "dense":
            return self.data.to(dtype)
        deq = quant.dequant_fp8_block if self.fmt == "fp8" else quant.dequant_fp4
        if not self.split:
            return deq(self.data, self.scale).to(dtype)
        s, ss = self.split, self.split_scale_rows
        return torch.cat([deq(self.data[:s], self.scale[:ss]), deq(self.data[s:], self.scale[ss:])]).to(dtype)


def _check_dtype(dtype: torch.dtype):
    if dtype not in _WORK_DTYPES:
        raise ValueError(f"the CUDA GEMMs support working dtypes float32/bfloat16/float16, got {dtype}")


def _scale_f32(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return quant.ue8m0_decode(scale)
    return scale.to(torch.float32)


def prepare_linear(w, dtype: torch.dtype, device=None) -> CudaWeight:
    """Stored weight (float tensor or v4.quant.QuantizedWeight) -> CudaWeight, without dequantising.

    FP8/FP4 data are kept as stored bytes; their UE8M0 (or float) scales become fp32 multipliers.
    Dense tensors are cast to `dtype`.
    """
    _check_dtype(dtype)
    if isinstance(w, CudaWeight):
        return w if w.dtype == dtype else CudaWeight(
            w.fmt, w.data.to(dtype) if w.fmt == "dense" else w.data, w.scale, dtype, w.split)
    if isinstance(w, quant.QuantizedWeight):
        dev = torch.device(device) if device is not None else w.data.device
        data = w.data
        if w.fmt == "fp8":
            if data.dtype != torch.float8_e4m3fn:
                if data.element_size() != 1:
                    raise ValueError(f"fp8 weight data must be 1-byte, got {data.dtype}")
                data = data.view(torch.float8_e4m3fn)
            out, inp = data.shape
            nb = (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK))
            if tuple(w.scale.shape) != nb:
                raise ValueError(
                    f"fp8 weight {tuple(data.shape)} needs a scale of shape {nb}, got {tuple(w.scale.shape)}"
                )
        elif w.fmt == "fp4":
            if data.element_size() != 1 or data.is_floating_point():
                raise ValueError(f"fp4 weight data must be packed int8/uint8, got {data.dtype}")
            data = data.view(torch.int8)
            out, half = data.shape
            inp = 2 * half
            if inp % FP4_BLOCK or tuple(w.scale.shape) != (out, inp // FP4_BLOCK):
                raise ValueError(f"fp4 weight [{out}, {inp}] needs in % 32 == 0 and a scale of shape "
                                 f"{(out, inp // FP4_BLOCK)}, got {tuple(w.scale.shape)}")
        else:
            raise ValueError(f"unknown quantized format {w.fmt!r}")
        return CudaWeight(w.fmt, data.to(dev).contiguous(), _scale_f32(w.scale).to(dev).contiguous(), dtype)
    if isinstance(w, torch.Tensor):
        if not w.is_floating_point() or w.element_size() == 1:
            raise ValueError(
                f"a dense weight must be a float tensor of 2+ bytes, got {w.dtype} (FP8/FP4 need a QuantizedWeight)"
            )
        dev = torch.device(device) if device is not None else w.device
        return CudaWeight("dense", w.to(device=dev, dtype=dtype).contiguous(), None, dtype)
    raise TypeError(f"cannot prepare a weight of type {type(w).__name__}")


def _stack(parts: list[list[CudaWeight]], dtype, split: int) -> CudaWeight:
    """parts[e] = row blocks of expert e (concatenated along rows), experts stacked along a new dim 0."""
    fmts = {p.fmt for ps in parts for p in ps}
    if len(fmts) != 1:
        raise ValueError(f"experts must share one stored format, got {sorted(fmts)}")
    fmt = fmts.pop()
    first = parts[0]
    rows = sum(p.data.shape[0] for p in first)
    cols = first[0].data.shape[1]
    E = len(parts)
    data = torch.empty((E, rows, cols), dtype=first[0].data.dtype, device=first[0].device)
    scale = None
    if fmt != "dense":
        srows = sum(p.scale.shape[0] for p in first)
        scale = torch.empty((E, srows, first[0].scale.shape[1]), dtype=torch.float32, device=first[0].device)
    for e, ps in enumerate(parts):
        if [p.data.shape for p in ps] != [p.data.shape for p in first]:
            raise ValueError(
                f"expert {e} has shapes {[tuple(p.shape) for p in ps]}, expert 0 {[tuple(p.shape) for p in first]}"
            )
        torch.cat([p.data for p in ps], out=data[e])
        if scale is not None:
            torch.cat([p.scale for p in ps], out=scale[e])
    return CudaWeight(fmt, data, scale, dtype, split)


def prepare_experts(w1s: list, w3s: list, w2s: list, dtype: torch.dtype, device=None) -> tuple[CudaWeight, CudaWeight]:
    """Per-expert stored W1 [I, D], W3 [I, D], W2 [D, I] -> (w13 [E, 2I, D], w2 [E, D, I]) CudaWeights.

    w13 stacks [W1; W3] by rows (split = I); each half keeps its own block scales. Use
    `prepare_experts([w1], [w3], [w2], dtype)` and index `[0]` for the shared expert.
    """
    if not (len(w1s) == len(w3s) == len(w2s) >= 1):
        raise ValueError(f"need as many W1/W3/W2 as experts (>= 1), got {len(w1s)}/{len(w3s)}/{len(w2s)}")
    w13_parts, w2_parts = [], []
    for a, b, c in zip(w1s, w3s, w2s):
        pa, pb, pc = (prepare_linear(t, dtype, device) for t in (a, b, c))
        if pa.shape != pb.shape or pc.shape != (pa.shape[1], pa.shape[0]):
            raise ValueError(
                f"expert shapes W1 {pa.shape}, W3 {pb.shape}, W2 {pc.shape} do not fit [I, D], [I, D], [D, I]"
            )
        w13_parts.append([pa, pb])
        w2_parts.append([pc])
    inter = w13_parts[0][0].shape[0]
    return _stack(w13_parts, dtype, inter), _stack(w2_parts, dtype, 0)


def _as_weight(w, split_half: bool = False) -> CudaWeight:
    """Accept plain dense tensors too (their own dtype is the working dtype)."""
    if isinstance(w, CudaWeight):
        return w
    if isinstance(w, torch.Tensor):
        cw = prepare_linear(w, w.dtype)
        if split_half:
            cw.split = w.shape[-2] // 2
        return cw
    raise TypeError(f"expected a CudaWeight or a tensor, got {type(w).__name__}")


# ============================================================================================ numerics helpers


@triton.jit
def _quant_rows(a):
    """a [R, B] fp32 -> (q, s [R]): FP8 fake-quant per row of the tile (v4.quant.act_quant_fp8).

    s = 2^ceil(log2(max(amax, 1e-4) / 448)) from the exponent bits (exact, = quant.pow2_scale);
    q = x / s clamped to +-448 and rounded to the nearest e4m3 value, ties to even, subnormals kept,
    by integer arithmetic on the fp32 bits (the interpreter's fp8 cast does not round to even).
    """
    # div_rn (as compress.py does): Triton may lower a plain fp32 `/` to an approximate division,
    # which could land one ulp above an exact power of two (amax = 448 * 2^k) and bump the scale
    amax = tl.div_rn(tl.maximum(tl.max(tl.abs(a), axis=1), 1e-4), 448.0)
    e = ceil_log2(amax)
    s = exp2i(e)
    inv = exp2i(-e)
    y = tl.minimum(tl.maximum(a * inv[:, None], -448.0), 448.0)
    q = round_fp(y, -6, 3)  # e4m3: 3 mantissa bits, subnormals below 2^-6
    return q, s


@triton.jit
def _w_tile(w_ptr, s_ptr, rows, rmask, k0, K, stride_wn, stride_sn,
            W_FMT: tl.constexpr, RAW: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Weight tile [BN, BK] of rows `rows`, columns k0..k0+BK: dense as stored, FP8 raw e4m3 (RAW)
    or dequantised fp32, FP4 dequantised fp32."""
    if W_FMT == 2:
        kb = k0 // 2 + tl.arange(0, BK // 2)
        b = tl.load(w_ptr + rows[:, None] * stride_wn + kb[None, :],
                    mask=rmask[:, None] & (kb < K // 2)[None, :], other=0).to(tl.int32) & 0xFF
        codes = tl.interleave(b & 15, b >> 4)  # element 2k = low nibble
        # e2m1 code -> fp16 bit pattern (sign, 2-bit exponent, 1-bit mantissa at the top) * 2^14
        bits = ((codes & 8) << 12) | ((codes & 7) << 9)
        v = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0
        ks = k0 // 32 + tl.arange(0, BK // 32)
        s = tl.load(s_ptr + rows[:, None] * stride_sn + ks[None, :],
                    mask=rmask[:, None] & (ks < K // 32)[None, :], other=0.0)
        w = tl.reshape(tl.reshape(v, (BN, BK // 32, 32)) * s[:, :, None], (BN, BK))
    else:
        kk = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + rows[:, None] * stride_wn + kk[None, :],
                    mask=rmask[:, None] & (kk < K)[None, :], other=0.0)
        if W_FMT == 1 and not RAW:
            sw = tl.load(s_ptr + (rows // 128) * stride_sn + k0 // 128, mask=rmask, other=0.0)
            w = w.to(tl.float32) * sw[:, None]
    return w


@triton.jit
def _a_operand(a, A_QUANT: tl.constexpr, FP8_PATH: tl.constexpr, CDT: tl.constexpr, DOT_DT: tl.constexpr,
               SOFT: tl.constexpr):
    """Activation tile as loaded -> (MMA operand, per-row scale; the scale only on the FP8 path)."""
    if A_QUANT:
        q, sa = _quant_rows(a.to(tl.float32))
        if FP8_PATH:
            op = q.to(tl.float8e4nv)  # exact: q is on the e4m3 grid
        else:
            # act_quant returns q * s in x's dtype (exact); the reference then casts to the working dtype
            op = q * sa[:, None]
            if a.dtype != tl.float32:
                op = cast_rne(op, a.dtype, SOFT)
            op = cast_rne(op, CDT, SOFT).to(DOT_DT)
    else:
        sa = tl.full((a.shape[0],), 1.0, tl.float32)  # unused off the FP8 path
        if a.dtype != CDT:
            op = cast_rne(a, CDT, SOFT).to(DOT_DT)
        else:
            op = a.to(DOT_DT)
    return op, sa


@triton.jit
def _w_step(acc, a_op, sa, w_ptr, s_ptr, rows, rmask, k0, K, stride_wn, stride_sn,
            W_FMT: tl.constexpr, FP8_PATH: tl.constexpr, CDT: tl.constexpr, DOT_DT: tl.constexpr,
            PREC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """acc += a_op @ (weight tile of `rows`)^T. FP8_PATH: native fp8 dot, scaled and promoted per 128-block."""
    if FP8_PATH:
        wq = _w_tile(w_ptr, s_ptr, rows, rmask, k0, K, stride_wn, stride_sn, W_FMT, True, BN, BK)
        sw = tl.load(s_ptr + (rows // 128) * stride_sn + k0 // 128, mask=rmask, other=0.0)
        acc += tl.dot(a_op, tl.trans(wq)) * sa[:, None] * sw[None, :]
    else:
        w = _w_tile(w_ptr, s_ptr, rows, rmask, k0, K, stride_wn, stride_sn, W_FMT, False, BN, BK)
        acc = tl.dot(a_op, tl.trans(w.to(CDT).to(DOT_DT)), acc, input_precision=PREC)
    return acc


@triton.jit
def _gemm_loop(acc, a_base, amask, w_ptr, s_ptr, rows, rmask, K, stride_wn, stride_sn,
               W_FMT: tl.constexpr, A_QUANT: tl.constexpr, FP8_PATH: tl.constexpr, CDT: tl.constexpr,
               DOT_DT: tl.constexpr, PREC: tl.constexpr, SOFT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(a_base + kk[None, :], mask=amask[:, None] & (kk < K)[None, :], other=0.0)
        a_op, sa = _a_operand(a, A_QUANT, FP8_PATH, CDT, DOT_DT, SOFT)
        acc = _w_step(acc, a_op, sa, w_ptr, s_ptr, rows, rmask, k0, K, stride_wn, stride_sn,
                      W_FMT, FP8_PATH, CDT, DOT_DT, PREC, BN, BK)
    return acc


@triton.jit
def _expert_tile(tile_e_ptr, tile_r0_ptr, tile_r1_ptr, N, BM: tl.constexpr, BN: tl.constexpr):
    """This program's tile of an expert GEMM (tile program_id(0), output columns program_id(1)): its
    expert e (-1: an empty tile, which the kernel skips), its sorted rows [r0, r1) padded to BM and its
    BN columns of N, with their masks: (e, rows, rmask, cols, cmask). The tile tables have an entry for
    every tile, so the loads stay in bounds for an empty one too."""
    t = tl.program_id(0)
    rows = tl.load(tile_r0_ptr + t) + tl.arange(0, BM)
    rmask = rows < tl.load(tile_r1_ptr + t)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    return tl.load(tile_e_ptr + t), rows, rmask, cols, cols < N


# ============================================================================================ kernels


@triton.jit
def _linear_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                   W_FMT: tl.constexpr, A_QUANT: tl.constexpr, FP8_PATH: tl.constexpr, CDT: tl.constexpr,
                   DOT_DT: tl.constexpr, PREC: tl.constexpr, SOFT: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[:, g*N:(g+1)*N] = x[:, g*K:(g+1)*K] @ W[g*N:(g+1)*N]^T for program axis 2 = g."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    wrows = g * N + cols
    a_base = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + g * K
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _gemm_loop(acc, a_base, rmask, w_ptr, s_ptr, wrows.to(tl.int64), cmask, K, stride_wn, stride_sn,
                     W_FMT, A_QUANT, FP8_PATH, CDT, DOT_DT, PREC, SOFT, BN, BK)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + wrows[None, :], cast_rne(acc, CDT, SOFT),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _moe_up_kernel(x_ptr, tok_ptr, rw_ptr, tile_e_ptr, tile_r0_ptr, tile_r1_ptr, w_ptr, s_ptr, h_ptr,
                   inter, K, limit, stride_xm, stride_we, stride_wn, stride_se, stride_sn, split_srows, stride_hm,
                   HAS_RW: tl.constexpr, W_FMT: tl.constexpr, A_QUANT: tl.constexpr, FP8_PATH: tl.constexpr,
                   CDT: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr, SOFT: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """h[r, n] = swiglu_L(x[tok[r]] W1_e^T, x[tok[r]] W3_e^T)[n] * rw[r] for the sorted rows of one tile."""
    e, rows, rmask, cols, cmask = _expert_tile(tile_e_ptr, tile_r0_ptr, tile_r1_ptr, inter, BM, BN)
    if e < 0:
        return
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0)
    wcols = cols.to(tl.int64)
    w1 = w_ptr + e.to(tl.int64) * stride_we
    s1 = s_ptr + e.to(tl.int64) * stride_se
    w3 = w1 + inter * stride_wn
    s3 = s1 + split_srows * stride_sn
    a_base = x_ptr + tok.to(tl.int64)[:, None] * stride_xm
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc3 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(a_base + kk[None, :], mask=rmask[:, None] & (kk < K)[None, :], other=0.0)
        a_op, sa = _a_operand(a, A_QUANT, FP8_PATH, CDT, DOT_DT, SOFT)  # loaded / quantised once
        acc1 = _w_step(acc1, a_op, sa, w1, s1, wcols, cmask, k0, K, stride_wn, stride_sn,
                       W_FMT, FP8_PATH, CDT, DOT_DT, PREC, BN, BK)
        acc3 = _w_step(acc3, a_op, sa, w3, s3, wcols, cmask, k0, K, stride_wn, stride_sn,
                       W_FMT, FP8_PATH, CDT, DOT_DT, PREC, BN, BK)
    # the reference's x @ w13^T is a GEMM in the working dtype: round, then SwiGLU in fp32
    h1 = tl.minimum(cast_rne(acc1, CDT, SOFT).to(tl.float32), limit)
    h3 = tl.minimum(tl.maximum(cast_rne(acc3, CDT, SOFT).to(tl.float32), -limit), limit)
    h = h1 * tl.sigmoid(h1) * h3
    if HAS_RW:
        h = h * tl.load(rw_ptr + rows, mask=rmask, other=0.0)[:, None]
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :],
             cast_rne(h, h_ptr.dtype.element_ty, SOFT), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _moe_down_kernel(h_ptr, tile_e_ptr, tile_r0_ptr, tile_r1_ptr, w_ptr, s_ptr, y_ptr,
                     N, K, stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_ym,
                     W_FMT: tl.constexpr, A_QUANT: tl.constexpr, FP8_PATH: tl.constexpr, CDT: tl.constexpr,
                     DOT_DT: tl.constexpr, PREC: tl.constexpr, SOFT: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y[r] = h[r] @ W2_e^T for the sorted rows r of one (expert, row tile), rounded to W2's dtype."""
    e, rows, rmask, cols, cmask = _expert_tile(tile_e_ptr, tile_r0_ptr, tile_r1_ptr, N, BM, BN)
    if e < 0:
        return
    a_base = h_ptr + rows.to(tl.int64)[:, None] * stride_hm
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _gemm_loop(acc, a_base, rmask, w_ptr + e.to(tl.int64) * stride_we, s_ptr + e.to(tl.int64) * stride_se,
                     cols.to(tl.int64), cmask, K, stride_wn, stride_sn,
                     W_FMT, A_QUANT, FP8_PATH, CDT, DOT_DT, PREC, SOFT, BN, BK)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], cast_rne(acc, CDT, SOFT),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _moe_combine_kernel(y_ptr, pos_ptr, sh_ptr, out_ptr, T, D, stride_ym, stride_sm, stride_om,
                        TOPK: tl.constexpr, HAS_SHARED: tl.constexpr, SOFT: tl.constexpr,
                        BT: tl.constexpr, BD: tl.constexpr):
    """out[t] = sum_j y[pos[t, j]] (+ shared[t]) in fp32, pos sorted (= expert order), one rounding."""
    toks = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = toks < T
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = tmask[:, None] & (cols < D)[None, :]
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        p = tl.load(pos_ptr + toks * TOPK + j, mask=tmask, other=0).to(tl.int64)
        acc += tl.load(y_ptr + p[:, None] * stride_ym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(sh_ptr + toks.to(tl.int64)[:, None] * stride_sm + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(out_ptr + toks.to(tl.int64)[:, None] * stride_om + cols[None, :],
             cast_rne(acc, out_ptr.dtype.element_ty, SOFT), mask=mask)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, M, K, stride_xm, stride_ym, SOFT: tl.constexpr,
                      BR: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    q, s = _quant_rows(x.to(tl.float32))
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :],
             cast_rne(q * s[:, None], y_ptr.dtype.element_ty, SOFT), mask=mask)


# ============================================================================================ launch glue


def _soft(t: torch.Tensor) -> bool:
    """CPU tensors run in Triton's interpreter: bf16 casts / dots need the soft path there."""
    return t.device.type != "cuda"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _fp8_mma_default(t: torch.Tensor) -> bool:
    """Native fp8 x fp8 dot: Ada/Hopper and later; the interpreter runs fp8 dots in fp16 (exact for e4m3)."""
    if t.device.type != "cuda":
        return True
    return _capability(t.device.index if t.device.index is not None else torch.cuda.current_device()) >= (8, 9)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _tiles(M: int, N: int, w: CudaWeight, act_quant: bool, soft: bool):
    """(BM, BN, BK, num_warps, num_stages). BK = 128 under act_quant (one quantisation block) and
    divides 128 for FP8 weights (one scale block per K tile). GPU values: untuned first choices, but for
    16-bit dense prefill (swept on an H200)."""
    if soft:  # interpreter: few, large programs
        return min(128, max(16, _pow2(M))), min(128, max(16, _pow2(N))), 128, 4, 1
    fp32 = w.dtype == torch.float32
    if M > 64 and not fp32 and not act_quant and w.fmt == "dense":
        # prefill over 16-bit weights: swept on an H200 (bench/cuda_tune.py), bf16 MoE at T = 4096
        # went 7.41 -> 5.83 ms with the wider N tile (half the re-reads of the gathered x rows)
        return 128, 128, 64, 8, 4
    bk = 128 if (act_quant or not fp32) else 32
    if M <= 16:
        bm, bn = 16, 64
    elif M <= 32:
        bm, bn = 32, 64
    elif M <= 64:
        bm, bn = 64, 64
    else:
        bm, bn = (64, 64) if fp32 else (128, 64)
    if M <= 64 and triton.cdiv(M, bm) * triton.cdiv(N, bn) < 128 and N >= 32 * 128:
        bn = 32  # decode: more programs to keep the SMs streaming weights
    return bm, bn, bk, 4 if bm * bn <= 64 * 64 else 8, 4 if bm <= 32 else 3


def _fmt_args(w: CudaWeight, x: torch.Tensor, act_quant: bool, fp8_mma: bool | None):
    soft = _soft(x)
    cdt = _TL[w.dtype]
    dot_dt = tl.float32 if soft else cdt
    prec = "ieee" if (w.dtype == torch.float32 or soft) else "tf32"
    fp8 = (_fp8_mma_default(x) if fp8_mma is None else fp8_mma) and w.fmt == "fp8" and act_quant
    return dict(W_FMT=_FMT[w.fmt], A_QUANT=bool(act_quant), FP8_PATH=bool(fp8), CDT=cdt, DOT_DT=dot_dt,
                PREC=prec, SOFT=soft)


def _scale_or_dummy(w: CudaWeight) -> torch.Tensor:
    return w.scale if w.scale is not None else w.data


def _sstride(w: CudaWeight, i: int) -> int:
    return w.scale.stride(i) if w.scale is not None else 0


def _launch_linear(x2: torch.Tensor, w: CudaWeight, y: torch.Tensor, groups: int, N: int, K: int,
                   act_quant: bool, fp8_mma: bool | None):
    M = x2.shape[0]
    if M == 0 or N == 0:
        return
    if K == 0:
        y.zero_()
        return
    soft = _soft(x2)
    bm, bn, bk, nw, ns = _tiles(M, N, w, act_quant, soft)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), groups)
    _linear_kernel[grid](x2, w.data, _scale_or_dummy(w), y, M, N, K, x2.stride(0), w.data.stride(0),
                         _sstride(w, 0), y.stride(0), BM=bm, BN=bn, BK=bk, num_warps=nw, num_stages=ns,
                         **_fmt_args(w, x2, act_quant, fp8_mma))


def _rows2d(x: torch.Tensor, K: int) -> torch.Tensor:
    x2 = x.reshape(-1, K)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def linear(x: torch.Tensor, w, act_quant: bool = False, *, fp8_mma: bool | None = None) -> torch.Tensor:
    """y = x W^T from the weight's stored form; act_quant = FP8 activation fake-quant first (in-kernel).

    x: [..., K] any float dtype (rounded to the working dtype like the reference's `x.to(w.dtype)`).
    Output: [..., N] in the working dtype `w.dtype` (the reference returns F.linear in the prepared
    weight's dtype). fp8_mma: force/forbid the native fp8 x fp8 dot (default: sm89+ / interpreter).
    """
    w = _as_weight(w)
    if w.data.dim() != 2:
        raise ValueError(f"linear needs a 2-D weight, got {w.shape}")
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"linear: x has {x.shape[-1]} features, the weight expects {K}")
    lead = x.shape[:-1]
    x2 = _rows2d(x, K)
    y = torch.empty((x2.shape[0], N), dtype=w.dtype, device=x.device)
    _launch_linear(x2, w, y, 1, N, K, act_quant, fp8_mma)
    return y.view(*lead, N)


def grouped_out_proj(o: torch.Tensor, wo_a, wo_b, groups: int, act_quant: bool = False, *,
                     fp8_mma: bool | None = None) -> torch.Tensor:
    """o: [T, H*d]; head group g (contiguous) -> wo_a rows [g*R, (g+1)*R) -> concat -> wo_b.

    Stage 1 is one launch over (row tiles, R tiles, G) with z in wo_a's working dtype and no
    activation quantisation (the official code runs it as a bf16 einsum); stage 2 is `linear`.
    """
    wa = _as_weight(wo_a)
    T = o.shape[0]
    GR, Kg = wa.shape
    if GR % groups or o.numel() != T * groups * Kg:
        raise ValueError(f"grouped_out_proj: o {tuple(o.shape)}, wo_a {wa.shape} and {groups} groups do not fit")
    o2 = _rows2d(o, groups * Kg)
    z = torch.empty((T, GR), dtype=wa.dtype, device=o.device)
    _launch_linear(o2, wa, z, groups, GR // groups, Kg, False, fp8_mma)
    return linear(z, wo_b, act_quant, fp8_mma=fp8_mma)


def act_quant_fp8(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Triton version of v4.quant.act_quant_fp8 (FP8 fake-quant per row per `block` channels), same bits."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"act_quant_fp8: block must be a power of two >= 16, got {block}")
    K = x.shape[-1]
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    x2 = _rows2d(x, K)
    y2 = y.view(-1, K)
    M = x2.shape[0]
    br = 16
    _act_quant_kernel[(triton.cdiv(M, br), triton.cdiv(K, block))](
        x2, y2, M, K, x2.stride(0), y2.stride(0), SOFT=_soft(x), BR=br, BLOCK=block)
    return y


def _moe_tiles(P: int, E: int, soft: bool) -> int:
    """Row tile BM from the mean rows per active expert (decode: 16, prefill: up to 128 on GPU)."""
    avg = P / max(1, min(E, P)) * (2 if soft else 1)  # interpreter: fewer, larger programs
    return min(128, max(16, _pow2(math.ceil(avg))))


def _expert_tile_map(counts: torch.Tensor, bm: int, max_tiles: int):
    """Work items (expert, first row, row end) over rows sorted by expert; -1 = idle program.

    All on the device (no host sync): max_tiles is a host-side upper bound.
    """
    E = counts.numel()
    starts = torch.cumsum(counts, 0) - counts
    tiles = (counts + bm - 1) // bm
    tend = torch.cumsum(tiles, 0)
    t = torch.arange(max_tiles, device=counts.device)
    te = torch.searchsorted(tend, t, right=True)
    tec = te.clamp(max=E - 1)
    r0 = starts[tec] + (t - (tend - tiles)[tec]) * bm
    r1 = starts[tec] + counts[tec]
    te = torch.where(te < E, te, torch.full_like(te, -1))
    return te.to(torch.int32), r0.to(torch.int32), r1.to(torch.int32)


def _run_expert_mlp(x, tok, rw, tile_e, tile_r0, tile_r1, n_rows, bm, w13: CudaWeight, w2: CudaWeight,
                    limit: float, act_quant: bool, fp8_mma):
    """Up (fused SwiGLU) + down GEMMs over sorted rows; returns per-row outputs [n_rows, D] in w2.dtype."""
    soft = _soft(x)
    E, twoI, D = w13.shape
    inter = w13.split
    if twoI != 2 * inter or w2.shape != (E, D, inter):
        raise ValueError(f"moe: w13 {w13.shape} (split {inter}) and w2 {w2.shape} do not fit [E, 2I, D], [E, D, I]")
    h = torch.empty((n_rows, inter), dtype=x.dtype, device=x.device)
    y = torch.empty((n_rows, D), dtype=w2.dtype, device=x.device)
    n_tiles = tile_e.numel()
    _, bn, bk, nw, ns = _tiles(bm, inter, w13, act_quant, soft)
    _moe_up_kernel[(n_tiles, triton.cdiv(inter, bn))](
        x, tok, rw if rw is not None else x, tile_e, tile_r0, tile_r1, w13.data, _scale_or_dummy(w13), h,
        inter, D, float(limit), x.stride(0), w13.data.stride(0), w13.data.stride(1), _sstride(w13, 0), _sstride(w13, 1),
        w13.split_scale_rows, h.stride(0), HAS_RW=rw is not None, BM=bm, BN=bn, BK=bk, num_warps=nw, num_stages=ns,
        **_fmt_args(w13, x, act_quant, fp8_mma))
    _, bn, bk, nw, ns = _tiles(bm, D, w2, act_quant, soft)
    _moe_down_kernel[(n_tiles, triton.cdiv(D, bn))](
        h, tile_e, tile_r0, tile_r1, w2.data, _scale_or_dummy(w2), y,
        D, inter, h.stride(0), w2.data.stride(0), w2.data.stride(1), _sstride(w2, 0), _sstride(w2, 1), y.stride(0),
        BM=bm, BN=bn, BK=bk, num_warps=nw, num_stages=ns, **_fmt_args(w2, h, act_quant, fp8_mma))
    return y


def _as_stack(w, name: str) -> CudaWeight:
    cw = _as_weight(w, split_half=(name == "w13"))
    if cw.data.dim() == 2:  # a single expert (the shared one)
        cw = CudaWeight(cw.fmt, cw.data[None], None if cw.scale is None else cw.scale[None], cw.dtype, cw.split)
    if name == "w13" and not cw.split:
        cw = CudaWeight(cw.fmt, cw.data, cw.scale, cw.dtype, cw.shape[-2] // 2)
    return cw


def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13, w2, shared, limit: float,
                act_quant: bool = False, *, fp8_mma: bool | None = None) -> torch.Tensor:
    """Routed experts (clamped SwiGLU, routing weight before W2) + shared expert; = ReferenceOps.moe_experts.

    x [T, D]; ids [T, k] (int); weights [T, k]; w13 [E, 2I, D] ([W1; W3]); w2 [E, D, I];
    shared: (w13 [2I, D], w2 [D, I]) or None. Output [T, D] in x's dtype, summed in fp32.
    """
    T, D = x.shape
    out = torch.empty((T, D), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    if limit is None:
        limit = math.inf
    x = x if x.stride(-1) == 1 else x.contiguous()
    soft = _soft(x)
    W13, W2 = _as_stack(w13, "w13"), _as_stack(w2, "w2")
    E = W13.shape[0]
    k = ids.shape[1]
    P = T * k
    # (token, slot) pairs grouped by expert: sorted row r holds pair order[r]
    flat = ids.reshape(-1).long()
    order = flat.argsort(stable=True)
    # (bincount on CUDA reads the largest id back to size its output: a host sync, which a CUDA
    # graph capture forbids; a scatter-add into E counters is the same count without it)
    counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    tok = (order // k).to(torch.int32)
    rw = weights.reshape(-1)[order].to(torch.float32)
    pos = torch.empty(P, dtype=torch.long, device=x.device)
    pos[order] = torch.arange(P, device=x.device)
    pos = pos.view(T, k).sort(dim=1).values.to(torch.int32)  # per token, its rows in expert order
    bm = _moe_tiles(P, E, soft)
    max_tiles = min(P, triton.cdiv(P, bm) + min(E, P))
    te, r0, r1 = _expert_tile_map(counts, bm, max_tiles)
    y = _run_expert_mlp(x, tok, rw, te, r0, r1, P, bm, W13, W2, limit, act_quant, fp8_mma)
    ysh = None
    if shared is not None:
        S13, S2 = _as_stack(shared[0], "w13"), _as_stack(shared[1], "w2")
        bms = _moe_tiles(T, 1, soft)
        nt = triton.cdiv(T, bms)
        ar = torch.arange(nt, device=x.device, dtype=torch.int32)
        ysh = _run_expert_mlp(x, torch.arange(T, device=x.device, dtype=torch.int32), None,
                              torch.zeros_like(ar), ar * bms, torch.full_like(ar, T), T, bms, S13, S2,
                              limit, act_quant, fp8_mma)
    bd = min(256 if not soft else 1024, _pow2(D))
    bt = max(1, min(64 if soft else 4, _pow2(T)))
    _moe_combine_kernel[(triton.cdiv(T, bt), triton.cdiv(D, bd))](
        y, pos, ysh if ysh is not None else y, out, T, D, y.stride(0), ysh.stride(0) if ysh is not None else 0,
        out.stride(0), TOPK=k, HAS_SHARED=ysh is not None, SOFT=soft, BT=bt, BD=bd)
    return out
