"""RMSNorm and interleaved partial RoPE as Triton kernels (reference: `ReferenceOps.rms_norm`, `.rope`).

Each program takes a block of about `_TILE` elements (several narrow rows, or one wide row).

rms_norm: x viewed as rows [R, d] (all leading dims flattened); fp32 math; rows up to `_ROW_BLOCK`
wide stay in registers (one read), wider rows are reduced in `_ROW_BLOCK` chunks and read a second
time to normalise (that read mostly hits L2).

rope: x viewed as [T, M, d] (M rows per token, e.g. heads); a program takes a [tokens, rows] block,
computes cos/sin of `float(pos) * inv_freq` once per token in fp32 (the reference's formula) and
broadcasts them over the rows; the rope slice (the LAST 2 * len(inv_freq) dims) rotates pairwise
(2i, 2i+1), the leading "nope" dims are copied unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROW_BLOCK = 8192  # widest row normalised in registers in one pass
_TILE = 4096  # elements per program tile: narrow rows are handled several per program


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, R, N, eps,
                     HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * N
    o_rows = out_ptr + rows.to(tl.int64)[:, None] * N
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = rmask[:, None] & (cols < N)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        y = x * r[:, None]
        if HAS_W:
            y = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :] * y
        tl.store(o_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            c = start + cols
            x = tl.load(x_rows + c[None, :], mask=rmask[:, None] & (c < N)[None, :], other=0.0).to(tl.float32)
            acc += x * x
        r = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / N + eps)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = rmask[:, None] & (c < N)[None, :]
            y = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32) * r[:, None]
            if HAS_W:
                y = tl.load(w_ptr + c, mask=c < N, other=0.0).to(tl.float32)[None, :] * y
            tl.store(o_rows + c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`w * x / sqrt(mean(x^2) + eps)` over the last dim (fp32 inside); weight None = unweighted."""
    N = x.shape[-1]
    xc = x.contiguous()
    out = torch.empty_like(xc)
    rows = xc.numel() // N if N else 0
    if rows == 0:
        return out
    if weight is not None:
        assert weight.numel() == N, "rms_norm: weight must match the last dim"
        weight = weight.contiguous()
    one_pass = N <= _ROW_BLOCK
    block = triton.next_power_of_2(N) if one_pass else _ROW_BLOCK
    block_r = min(triton.next_power_of_2(rows), max(1, _TILE // block))
    _rms_norm_kernel[(triton.cdiv(rows, block_r),)](
        xc, weight if weight is not None else xc, out, rows, N, float(eps),
        HAS_W=weight is not None, BLOCK_R=block_r, BLOCK=block, ONE_PASS=one_pass,
        num_warps=4 if block_r * block <= 2048 else 8,
    )
    return out


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, inv_ptr, out_ptr, T, M, D, R2,
                 INVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_I: tl.constexpr, BLOCK_NOPE: tl.constexpr):
    """x viewed as [T, M, D]; a [BLOCK_T, BLOCK_M] block of rows, cos/sin once per token."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = ((toks < T)[:, None] & (ms < M)[None, :])[:, :, None]  # [BLOCK_T, BLOCK_M, 1]
    base = ((toks.to(tl.int64)[:, None] * M + ms[None, :]) * D)[:, :, None]
    nope = D - 2 * R2
    if BLOCK_NOPE > 0:
        c = tl.arange(0, BLOCK_NOPE)[None, None, :]
        m = rmask & (c < nope)
        tl.store(out_ptr + base + c, tl.load(x_ptr + base + c, mask=m), mask=m)
    i = tl.arange(0, BLOCK_I)
    imask = i < R2
    pos = tl.load(pos_ptr + toks, mask=toks < T, other=0).to(tl.float32)
    ang = pos[:, None] * tl.load(inv_ptr + i, mask=imask, other=0.0)[None, :]  # fp32 float(pos) * inv_freq
    cos = tl.cos(ang)[:, None, :]
    sin = tl.sin(ang)[:, None, :]
    if INVERSE:
        sin = -sin
    m = rmask & imask[None, None, :]
    off = base + nope + 2 * i[None, None, :]
    ev = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    od = tl.load(x_ptr + off + 1, mask=m, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + off, (ev * cos - od * sin).to(ty), mask=m)
    tl.store(out_ptr + off + 1, (ev * sin + od * cos).to(ty), mask=m)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Interleaved rotary embedding on the LAST 2*len(inv_freq) dims of x: [T, ..., d]; positions [T]."""
    R2 = inv_freq.numel()
    T, D = x.shape[0], x.shape[-1]
    assert x.dim() >= 2 and 2 * R2 <= D, "rope: x must be [T, ..., d] with d >= 2 * len(inv_freq)"
    assert positions.numel() == T, "rope: one position per token"
    xc = x.contiguous()
    out = torch.empty_like(xc)
    if xc.numel() == 0:
        return out
    M = xc.numel() // (T * D)  # rows per token (heads)
    inv = inv_freq.to(torch.float32).contiguous()  # the reference casts inv_freq to fp32 likewise
    nope = D - 2 * R2
    block_nope = triton.next_power_of_2(nope) if nope > 0 else 0
    dp = triton.next_power_of_2(D)
    block_m = min(triton.next_power_of_2(M), max(1, _TILE // dp))
    block_t = min(triton.next_power_of_2(T), max(1, _TILE // (block_m * dp)))
    _rope_kernel[(triton.cdiv(T, block_t), triton.cdiv(M, block_m))](
        xc, positions.contiguous(), inv, out, T, M, D, R2,
        INVERSE=bool(inverse), BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_I=triton.next_power_of_2(max(R2, 1)),
        BLOCK_NOPE=block_nope, num_warps=4)
    return out
