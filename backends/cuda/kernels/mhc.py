"""mHC (manifold-constrained hyper-connections) as Triton kernels (spec §2.2, §2.10).

Reference semantics: `ReferenceOps.hc_pre`, `.hc_post`, `.hc_head`.

hc_pre / hc_head run two kernels:
1. `_hc_mix_kernel`, a split-K skinny GEMM over the flattened streams x = flatten(X_t) (length nD):
   grid (token blocks, K splits); each program accumulates, for BLOCK_T tokens and its slice of
   the nD axis, the partial dot products fn . x (fp32 `tl.dot`, IEEE precision) and the partial
   sum of squares of x, and stores them to an fp32 scratch [splits, T, MP] / [splits, T].
   Deterministic (no atomics): the next kernel adds the splits in a fixed order.
2. `_hc_finish_kernel`, grid (token blocks, D splits), BLOCK_T tokens per program: adds the
   splits, m = (fn . x) * rsqrt(mean(x^2) + eps), then pre (and for hc_pre post and the n x n comb
   logits: softmax over each row + eps, column normalisation, then iters - 1 rounds of row/column
   normalisation, each M / (sum + eps), all in registers as a [BLOCK_T, n, n] tile), and collapses
   u = sum_k pre_k X_k over its share of D. D is split across programs only when the tokens are
   too few to fill the machine (decode); each split recomputes the (tiny) coefficients and the
   first one stores post and comb.

hc_post: one kernel, grid (token blocks, D blocks), a [BLOCK_T, n, BLOCK_D] fp32 tile:
X'_k = post_k y + sum_j comb[j, k] X_j.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ...triton_common import collapse_buffers
from .launch import MAX_SPLITS, target_programs

_BLOCK_K = 128  # nD chunk of the mix GEMM
_BLOCK_D = 1024  # widest D chunk of the collapse / post kernels
_TILE = 4096  # elements of a [tokens, streams, D] tile in the collapse / post kernels




@triton.jit
def _hc_mix_kernel(x_ptr, fn_ptr, mpart_ptr, sqpart_ptr, T, K, ROWS, K_PER,
                   MP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial fn . x and sum(x^2) over nD columns [split * K_PER, (split + 1) * K_PER)."""
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    rows = tl.arange(0, MP)
    rmask = rows < ROWS
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_T, MP], dtype=tl.float32)
    sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    k_lo = split * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    x_rows = x_ptr + toks.to(tl.int64)[:, None] * K
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + kk
        kmask = k < k_hi
        x = tl.load(x_rows + k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(fn_ptr + rows[None, :].to(tl.int64) * K + k[:, None],
                    mask=kmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)  # [BLOCK_K, MP]
        acc = tl.dot(x, w, acc, input_precision="ieee")
        sq += tl.sum(x * x, axis=1)
    out = (split * T + toks).to(tl.int64)
    tl.store(mpart_ptr + out[:, None] * MP + rows[None, :], acc, mask=tmask[:, None])
    tl.store(sqpart_ptr + out, sq, mask=tmask)


@triton.jit
def _hc_finish_kernel(x_ptr, mpart_ptr, sqpart_ptr, base_ptr, scale_ptr,
                      u_ptr, post_ptr, comb_ptr,
                      T, D, SPLITS, D_PER, iters, hc_eps, norm_eps,
                      N: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,
                      SINKHORN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Coefficients (and Sinkhorn) for BLOCK_T tokens, then u over this program's share of D."""
    pid_d = tl.program_id(1)
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    toks64 = toks.to(tl.int64)
    s = tl.arange(0, NP)  # stream index: pre/post entry, comb row j
    smask = s < N
    ts_mask = tmask[:, None] & smask[None, :]  # [BLOCK_T, NP]
    # [BLOCK_T, NP (j), NP (k)] index pieces of the comb matrices
    j3 = s[None, :, None]
    k3 = s[None, None, :]
    jk_mask = (j3 < N) & (k3 < N)
    c_mask = tmask[:, None, None] & jk_mask

    # ---- m = (fn . x) * rsqrt(mean(x^2) + eps), summing the K splits in a fixed order
    m_pre = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    if SINKHORN:
        m_post = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
        m_comb = tl.zeros([BLOCK_T, NP, NP], dtype=tl.float32)
    for sp in range(0, SPLITS):
        row = (sp * T + toks64) * MP  # [BLOCK_T]
        m_pre += tl.load(mpart_ptr + row[:, None] + s[None, :], mask=ts_mask, other=0.0)
        if SINKHORN:
            m_post += tl.load(mpart_ptr + row[:, None] + N + s[None, :], mask=ts_mask, other=0.0)
            m_comb += tl.load(mpart_ptr + row[:, None, None] + 2 * N + j3 * N + k3, mask=c_mask, other=0.0)
        sq += tl.load(sqpart_ptr + sp * T + toks64, mask=tmask, other=0.0)
    rho = (1.0 / tl.sqrt(sq / (N * D) + norm_eps))[:, None]
    pre = tl.sigmoid(m_pre * rho * tl.load(scale_ptr) + tl.load(base_ptr + s, mask=smask, other=0.0)[None, :]) + hc_eps
    pre = tl.where(ts_mask, pre, 0.0)

    if SINKHORN:
        if pid_d == 0:
            b_post = tl.load(base_ptr + N + s, mask=smask, other=0.0)[None, :]
            post = 2.0 * tl.sigmoid(m_post * rho * tl.load(scale_ptr + 1) + b_post)
            tl.store(post_ptr + toks64[:, None] * N + s[None, :], post, mask=ts_mask)
            b_comb = tl.load(base_ptr + 2 * N + j3 * N + k3, mask=jk_mask, other=0.0)
            logits = m_comb * rho[:, :, None] * tl.load(scale_ptr + 2) + b_comb
            logits = tl.where(jk_mask, logits, float("-inf"))
            # softmax over each row (k), + eps; padded rows/columns stay exactly 0 throughout
            mx = tl.max(logits, axis=2)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            e = tl.where(jk_mask, tl.exp(logits - mx[:, :, None]), 0.0)
            den = tl.sum(e, axis=2)
            den = tl.where(den == 0.0, 1.0, den)
            M = tl.where(jk_mask, e / den[:, :, None] + hc_eps, 0.0)
            # column normalisation, then (iters - 1) x (row, column), each M / (sum + eps)
            M = M / (tl.sum(M, axis=1)[:, None, :] + hc_eps)
            for _ in range(1, iters):
                M = M / (tl.sum(M, axis=2)[:, :, None] + hc_eps)
                M = M / (tl.sum(M, axis=1)[:, None, :] + hc_eps)
            tl.store(comb_ptr + toks64[:, None, None] * N * N + j3 * N + k3, M, mask=c_mask)

    # ---- u = sum_k pre_k X_k over this program's share of D
    d_lo = pid_d * D_PER
    d_hi = tl.minimum(d_lo + D_PER, D)
    dd = tl.arange(0, BLOCK_D)
    x_base = x_ptr + toks64[:, None, None] * N * D + s[None, :, None] * D  # [BLOCK_T, NP, 1]
    u_base = u_ptr + toks64[:, None] * D  # [BLOCK_T, 1]
    for d0 in range(d_lo, d_hi, BLOCK_D):
        d = d0 + dd
        dmask = d < d_hi
        x = tl.load(x_base + d[None, None, :], mask=ts_mask[:, :, None] & dmask[None, None, :], other=0.0)
        u = tl.sum(pre[:, :, None] * x.to(tl.float32), axis=1)
        tl.store(u_base + d[None, :], u.to(u_ptr.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])


def _mix(X: torch.Tensor, fn: torch.Tensor, rows: int):
    """Launch the split-K mix; returns (mpart [S, T, MP], sqpart [S, T], S, MP)."""
    T = X.shape[0]
    K = X.shape[1] * X.shape[2]
    assert fn.shape == (rows, K), f"mHC: fn must be [{rows}, {K}], got {tuple(fn.shape)}"
    MP = max(16, triton.next_power_of_2(rows))
    block_t = 16 if T <= 16 else 32
    n_tb = triton.cdiv(T, block_t)
    k_blocks = triton.cdiv(K, _BLOCK_K)
    splits = max(1, min(k_blocks, MAX_SPLITS, target_programs(X.device) // n_tb))
    k_per = triton.cdiv(k_blocks, splits) * _BLOCK_K
    splits = triton.cdiv(K, k_per)
    mpart = torch.empty(splits, T, MP, dtype=torch.float32, device=X.device)
    sqpart = torch.empty(splits, T, dtype=torch.float32, device=X.device)
    _hc_mix_kernel[(n_tb, splits)](X, fn.contiguous(), mpart, sqpart, T, K, rows, k_per,
                                   MP=MP, BLOCK_T=block_t, BLOCK_K=_BLOCK_K, num_warps=4)
    return mpart, sqpart, splits, MP


def _finish_blocks(T: int, D: int, NP: int, device) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_D, programs per token block along D, D per program) of the finish kernel."""
    block_t = min(16, triton.next_power_of_2(T))
    block_d = min(_BLOCK_D, triton.next_power_of_2(D), max(16, _TILE // (block_t * NP)))
    n_tb = triton.cdiv(T, block_t)
    d_blocks = triton.cdiv(D, block_d)
    per_tb = max(1, min(d_blocks, target_programs(device) // n_tb))  # split D only when tokens are few
    d_per = triton.cdiv(d_blocks, per_tb) * block_d
    return block_t, block_d, triton.cdiv(D, d_per), d_per


def _hc_collapse(X, fn, base, scale, rows, sinkhorn, iters, hc_eps, norm_eps):
    T, n, D = X.shape
    X, u, post, comb = collapse_buffers(X)
    if T == 0:
        return u, post, comb
    mpart, sqpart, splits, MP = _mix(X, fn, rows)
    NP = triton.next_power_of_2(n)
    block_t, block_d, d_progs, d_per = _finish_blocks(T, D, NP, X.device)
    _hc_finish_kernel[(triton.cdiv(T, block_t), d_progs)](
        X, mpart, sqpart, base.to(torch.float32).contiguous(), scale.to(torch.float32).contiguous(),
        u, post, comb, T, D, splits, d_per, int(iters), float(hc_eps), float(norm_eps),
        N=n, NP=NP, MP=MP, SINKHORN=sinkhorn, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=4 if block_t * NP * block_d <= 2048 else 8,
    )
    return u, post, comb


def hc_pre(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
           sinkhorn_iters: int, hc_eps: float, norm_eps: float):
    """mHC entry. X: [T, n, D] -> (u [T, D] in X's dtype, post [T, n] fp32, comb [T, n, n] fp32)."""
    n = X.shape[1]
    assert sinkhorn_iters >= 1, "hc_pre: at least one Sinkhorn iteration"
    return _hc_collapse(X, fn, base, scale, (2 + n) * n, True, sinkhorn_iters, hc_eps, norm_eps)


def hc_head(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Stream collapse for the head: h = sum_k (sigmoid(m_k * scale + base_k) + eps) X_k."""
    return _hc_collapse(X, fn, base, scale, X.shape[1], False, 1, hc_eps, norm_eps)[0]


@triton.jit
def _hc_post_kernel(y_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, T, D,
                    N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    toks64 = toks.to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    k = tl.arange(0, NP)
    tk_mask = tmask[:, None] & (k < N)[None, :]
    td_mask = tmask[:, None] & dmask[None, :]
    post = tl.load(post_ptr + toks64[:, None] * N + k[None, :], mask=tk_mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + toks64[:, None] * D + d[None, :], mask=td_mask, other=0.0).to(tl.float32)
    acc = post[:, :, None] * y[:, None, :]  # [BLOCK_T, NP (k), BLOCK_D]
    x_tok = x_ptr + toks64[:, None] * N * D + d[None, :]
    c_tok = comb_ptr + toks64[:, None] * N * N + k[None, :]
    for j in tl.static_range(N):
        cj = tl.load(c_tok + j * N, mask=tk_mask, other=0.0).to(tl.float32)  # comb[t, j, :]
        xj = tl.load(x_tok + j * D, mask=td_mask, other=0.0).to(tl.float32)  # X[t, j, d]
        acc += cj[:, :, None] * xj[:, None, :]
    off = toks64[:, None, None] * N * D + k[None, :, None] * D + d[None, None, :]
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=tk_mask[:, :, None] & dmask[None, None, :])


def hc_post(y: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k * y + sum_j comb[j, k] X_j (fp32 math, output in X's dtype)."""
    T, n, D = X.shape
    X = X.contiguous()
    out = torch.empty_like(X)
    if T == 0:
        return out
    NP = triton.next_power_of_2(n)
    block_t = min(16, triton.next_power_of_2(T))
    block_d = min(_BLOCK_D, triton.next_power_of_2(D), max(16, _TILE // (block_t * NP)))
    _hc_post_kernel[(triton.cdiv(T, block_t), triton.cdiv(D, block_d))](
        y.contiguous(), X, post.contiguous(), comb.contiguous(), out, T, D,
        N=n, NP=NP, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=4 if block_t * NP * block_d <= 2048 else 8,
    )
    return out
