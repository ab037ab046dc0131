"""mHC (manifold-constrained hyper-connections) as Triton-Ascend kernels (spec §2.2, ascend.md §1.5).

Reference semantics: `ReferenceOps.hc_pre`, `.hc_post`, `.hc_head` (vllm-ascend: `npu_hc_pre_v2`,
`npu_hc_post`). X is [T, n, D] (V4-Flash: n = 4 streams, D = 4096, bf16); x_t = flatten(X_t) has
K = n*D = 16384 elements; fn, base, scale are fp32 parameters. Everything inside is fp32.

hc_pre(X, fn [(2+n)n, K], base [(2+n)n], scale [3], iters, hc_eps, norm_eps) -> (u, post, comb):
    m      = (fn . x_t) * rsqrt(mean(x_t^2) + norm_eps)
    pre_k  = sigmoid(m_k * scale0 + base_k) + hc_eps                       k < n
    post_k = 2 sigmoid(m_{n+k} * scale1 + base_{n+k})
    comb   = Sinkhorn(softmax_rows(m_{2n..} * scale2 + base_{2n..}) + hc_eps)   [n, n]
             (column-normalise, then iters - 1 rounds of row / column normalisation,
              each M / (sum + hc_eps))
    u      = sum_k pre_k X_k  ([T, D], X's dtype); post [T, n], comb [T, n, n] fp32.
hc_head(X, fn [n, K], base [n], scale [1], hc_eps, norm_eps) -> u with only the pre row block.
hc_post(y [T, D], X, post, comb) -> X'_k = post_k y + sum_j comb[j, k] X_j (X's dtype).

`_hc_collapse_kernel` (hc_pre and hc_head), one token block of BLOCK_T = 16 tokens per work item:
1. mix: walk K in BLOCK_K sub-tiles; per sub-tile one [BLOCK_T, BLOCK_K] tile of x (widened to
   fp32) feeds both the sum of squares (vector) and `tl.dot` with the fn rows (cube, fp32 inputs,
   IEEE precision, fp32 accumulation). Cube, not a vector reduction, because the mix is a skinny
   GEMM whose cost is the fn operand: a per-token vector reduction re-reads all of fn (1.5 MiB
   fp32 at V4 shapes, 48x the token's own 32 KiB) for every token and spends ~1 MFLOP of vector
   work per token, while the dot reads fn once per 16 tokens and leaves the multiply-adds to the
   cube. The fn rows go into two dots so that no column slicing is needed afterwards:
   x . fn[0:2n]^T -> [BLOCK_T, PP] (pre and post, PP = 16 columns: the cube's fractal) and
   fn[2n:] . x^T -> [CC, BLOCK_T] (the n*n comb logits, CC = NP*NP = 16, computed TRANSPOSED so
   that the Sinkhorn tile below is a plain reshape of it). fn stays fp32 on the cube: rounding it
   to bf16 would move post/comb by ~1e-3, far outside what the fp32 reference allows.
2. coefficients: pre / post from the [BLOCK_T, PP] tile; Sinkhorn on a [NP (row j), NP (column
   k), BLOCK_T] tile. Tokens sit on the tail axis (64 B) on purpose: with a [BLOCK_T, n, n] tile
   the 16 B tail cannot be aligned by BiShengIR ("cannot align 1 axis" on the iteration loop,
   then a PlanMemory crash under multi-buffering). All the softmax / row / column sums in this
   layout reduce along leading axes. The result is transposed back to [BLOCK_T, n*n] so comb is
   stored as whole contiguous rows.
3. collapse: u = sum_k pre_k X_k, walking D in BLOCK_D sub-tiles (a second read of X_t; the
   coefficients need all of x_t first).
Grid: `programs("cube", token blocks)`, at most one program per AI core, each walking token
blocks `range(pid, n_blocks, NPROG)` (the grid binds to physical cores on Ascend). Decode (a few
tokens) therefore runs on one core, which then reads all of fn; a split-K variant (partial mixes
to a scratch, then a finish pass) would spread that read, at the cost of a second launch.

Unified Buffer per iteration (V4-Flash: BLOCK_T 16, BLOCK_K 256, BLOCK_D 256, bf16 X, fp32 fn;
counted conservatively as if the cube operands were staged in UB too; phases do not overlap):
  mix      x 16x256 bf16 8 KiB + fp32 16 KiB + x^2 16 KiB + fn tiles 2 x 16x256 fp32 32 KiB
           + accumulators 2 KiB                                          = 74 KiB (hc_head: 48)
  collapse X_k 16x256 bf16 8 KiB + fp32 16 KiB + product 16 KiB + u 16 KiB + u out 8 KiB = 64 KiB
  Sinkhorn a few [4, 4, 16] fp32 tiles                                   ~ 6 KiB
all under `launch.UB_BUDGET` (96 KiB, half the 192 KiB UB for double buffering); the wrapper
checks the same sum (`collapse_ub_bytes`) for the actual shapes. The lowering check (BiShengIR,
multi-buffering on) also accepts BLOCK_K or BLOCK_D up to 1024 at these shapes, so the margin is
real.

`_hc_post_kernel`: pure vector; a work item is (token, D sub-tile of BLOCK_D), the 1D item index
split into the pair by scalar division; tile [NP, BLOCK_D] (the n output streams of one D slice),
acc = post y + sum_j comb[j, :] X_j with the n stream rows of X loaded one by one (contiguous
BLOCK_D runs). Grid: `programs("vector", items)`. BLOCK_D = 1024 (UB: acc 16 KiB + product
16 KiB + y and X_j 2 x 6 KiB + out 8 KiB = 52 KiB at bf16), halved (not below 256) while there
are fewer items than vector cores, so decode still spreads over the cores.

Interpreter (TRITON_INTERPRET=1, CPU): Triton 3.9's interpreter casts fp32 -> bf16 by truncation;
with ROUND_BF16 the bf16 outputs are rounded to nearest even by bit arithmetic first (the dot
operands are always fp32 here, so its bf16 dot bug does not arise).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...triton_common import collapse_buffers, interpreting, pow2, round_bf16
from .launch import LoweringCase, check_ub, programs

_BLOCK_T = 16  # tokens per work item of the collapse kernel: the cube's M fractal
_MAX_BLOCK_K = 256  # K sub-tile of the mix: 512 B bf16 / 1 KiB fp32 rows (cube tail alignment)
_MAX_BLOCK_D = 256  # D sub-tile of the collapse
_POST_BLOCK_D = 1024
_POST_MIN_BLOCK_D = 256
_MIN_DOT = 16  # smallest dot extent used (cube fractal; also upstream Triton's minimum)


@triton.jit
def _hc_collapse_kernel(x_ptr, fn_ptr, base_ptr, scale_ptr, u_ptr, post_ptr, comb_ptr,
                        T, D, iters, hc_eps, norm_eps,
                        N: tl.constexpr, NP: tl.constexpr, PP: tl.constexpr, ROWS_PP: tl.constexpr,
                        CC: tl.constexpr, SINKHORN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    K = N * D
    t = tl.arange(0, BLOCK_T)
    c = tl.arange(0, PP)
    c_ok = c < ROWS_PP
    kk = tl.arange(0, BLOCK_K)
    cc = tl.arange(0, CC)
    if N == NP:  # comb row j, column k at fn row 2n + cc: one contiguous run of fn rows
        c_row = cc
        c_ok2 = cc < CC
    else:
        c_row = (cc // NP) * N + cc % NP
        c_ok2 = ((cc // NP) < N) & ((cc % NP) < N)
    scale0 = tl.load(scale_ptr).to(tl.float32)
    n_blocks = tl.cdiv(T, BLOCK_T)
    for tb in range(pid, n_blocks, nprog):
        row0 = tb * BLOCK_T
        t_ok = (row0 + t) < T
        # 64-bit only in the scalar block base: the in-block offsets stay int32 (< BLOCK_T * K)
        x_blk = x_ptr + row0.to(tl.int64) * K

        # ---- 1. mix: acc_pp = x . fn[:ROWS_PP]^T, acc_c = fn[2n:] . x^T, sq = sum x^2
        acc_pp = tl.zeros([BLOCK_T, PP], dtype=tl.float32)
        acc_c = tl.zeros([CC, BLOCK_T], dtype=tl.float32)  # comb logits transposed: tokens on the tail
        sq = tl.zeros([BLOCK_T], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            k_ok = k < K
            x = tl.load(x_blk + t[:, None] * K + k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            sq += tl.sum(x * x, axis=1)
            f_pp = tl.load(fn_ptr + c[:, None] * K + k[None, :], mask=c_ok[:, None] & k_ok[None, :],
                           other=0.0).to(tl.float32)
            acc_pp = tl.dot(x, tl.trans(f_pp), acc_pp, input_precision="ieee")
            if SINKHORN:
                f_c = tl.load(fn_ptr + (2 * N + c_row[:, None]) * K + k[None, :],
                              mask=c_ok2[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                acc_c = tl.dot(f_c, tl.trans(x), acc_c, input_precision="ieee")
        rho = 1.0 / tl.sqrt(sq / K + norm_eps)

        # ---- 2. coefficients
        b_pp = tl.load(base_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        if SINKHORN:
            scale1 = tl.load(scale_ptr + 1).to(tl.float32)
            sc = tl.where(c < N, scale0, scale1)
        else:
            sc = tl.zeros([PP], dtype=tl.float32) + scale0
        sig = tl.sigmoid(acc_pp * rho[:, None] * sc[None, :] + b_pp[None, :])
        pre = tl.where((c < N)[None, :], sig + hc_eps, 0.0)  # [BLOCK_T, PP], only columns < n used
        if SINKHORN:
            is_post = (c >= N) & c_ok
            tl.store(post_ptr + row0.to(tl.int64) * N + t[:, None] * N + (c[None, :] - N), 2.0 * sig,
                     mask=t_ok[:, None] & is_post[None, :])
            # Sinkhorn on [NP (row j), NP (column k), BLOCK_T] tiles: tokens on the tail axis keep
            # it 64 B wide (a [BLOCK_T, n, n] tile has a 16 B tail that BiShengIR cannot align)
            # and every reduction / broadcast runs along a leading axis
            scale2 = tl.load(scale_ptr + 2).to(tl.float32)
            b_c = tl.load(base_ptr + 2 * N + c_row, mask=c_ok2, other=0.0).to(tl.float32)  # [CC]
            logits = acc_c * (rho * scale2)[None, :] + b_c[:, None]
            lg = tl.reshape(logits, [NP, NP, BLOCK_T])
            if N < NP:  # padded rows / columns: out of every softmax and sum, exactly 0 throughout
                ok3 = tl.reshape(c_ok2[:, None] & (t >= 0)[None, :], [NP, NP, BLOCK_T])
                lg = tl.where(ok3, lg, float("-inf"))
                mx = tl.max(lg, axis=1)
                mx = tl.where(mx == float("-inf"), 0.0, mx)
                ex = tl.where(ok3, tl.exp(lg - mx[:, None, :]), 0.0)
                den = tl.sum(ex, axis=1)
                den = tl.where(den == 0.0, 1.0, den)
                M = tl.where(ok3, ex / den[:, None, :] + hc_eps, 0.0)
            else:
                mx = tl.max(lg, axis=1)
                ex = tl.exp(lg - mx[:, None, :])
                M = ex / tl.sum(ex, axis=1)[:, None, :] + hc_eps  # softmax over each row k, + eps
            M = M / (tl.sum(M, axis=0)[None, :, :] + hc_eps)  # column normalisation
            for _ in range(1, iters):
                M = M / (tl.sum(M, axis=1)[:, None, :] + hc_eps)
                M = M / (tl.sum(M, axis=0)[None, :, :] + hc_eps)
            Mt = tl.trans(tl.reshape(M, [CC, BLOCK_T]))  # [BLOCK_T, CC]: whole comb rows per token
            if N == NP:
                c_out = cc
            else:
                c_out = (cc // NP) * N + cc % NP
            tl.store(comb_ptr + row0.to(tl.int64) * (N * N) + t[:, None] * (N * N) + c_out[None, :], Mt,
                     mask=t_ok[:, None] & c_ok2[None, :])

        # ---- 3. collapse u = sum_k pre_k X_k
        u_blk = u_ptr + row0.to(tl.int64) * D
        dd = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dd
            m2 = t_ok[:, None] & (d < D)[None, :]
            u = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            for s in tl.static_range(N):
                pre_s = tl.sum(tl.where((c == s)[None, :], pre, 0.0), axis=1)
                xs = tl.load(x_blk + t[:, None] * K + s * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
                u += pre_s[:, None] * xs
            if ROUND_BF16:
                u = round_bf16(u)
            tl.store(u_blk + t[:, None] * D + d[None, :], u.to(u_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _hc_post_kernel(y_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, T, D,
                    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_dblk = tl.cdiv(D, BLOCK_D)
    j = tl.arange(0, NP)
    j_ok = j < N
    dd = tl.arange(0, BLOCK_D)
    for item in range(pid, T * n_dblk, nprog):
        tok = item // n_dblk
        d = (item - tok * n_dblk) * BLOCK_D + dd
        d_ok = d < D
        tok64 = tok.to(tl.int64)
        x_tok = x_ptr + tok64 * (N * D)
        c_tok = comb_ptr + tok64 * (N * N)
        post = tl.load(post_ptr + tok64 * N + j, mask=j_ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + tok64 * D + d, mask=d_ok, other=0.0).to(tl.float32)
        acc = post[:, None] * y[None, :]  # [NP (output stream k), BLOCK_D]
        for s in tl.static_range(N):
            cs = tl.load(c_tok + s * N + j, mask=j_ok, other=0.0).to(tl.float32)  # comb[s, :]
            xs = tl.load(x_tok + s * D + d, mask=d_ok, other=0.0).to(tl.float32)
            acc += cs[:, None] * xs[None, :]
        if ROUND_BF16:
            acc = round_bf16(acc)
        tl.store(out_ptr + tok64 * (N * D) + j[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=j_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------
# launchers


def _check_dtypes(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t.dtype == torch.float64:
            raise ValueError(f"{op}: {name} is float64; Ascend kernels have no fp64 (use fp32 or bf16)")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def collapse_ub_bytes(block_k: int, block_d: int, x_bytes: int, fn_bytes: int, pp: int, cc: int,
                      block_t: int = _BLOCK_T) -> int:
    """Live UB bytes of one `_hc_collapse_kernel` iteration: the larger of its mix and collapse phases."""
    mix = block_t * block_k * (x_bytes + 4 + 4)  # x as loaded, widened, squared
    mix += (pp + cc) * block_k * max(fn_bytes, 4) + block_t * (pp + cc) * 4 + block_t * 4
    collapse = block_t * block_d * (x_bytes + 4 + 4 + 4 + x_bytes)  # X_k, widened, product, u, u out
    sinkhorn = 6 * block_t * cc * 4
    return max(mix, collapse, sinkhorn)


def post_ub_bytes(block_d: int, x_bytes: int, np_: int) -> int:
    """Live UB bytes of one `_hc_post_kernel` iteration."""
    return np_ * block_d * (4 + 4 + x_bytes) + 2 * block_d * (x_bytes + 4)


def _collapse(X, fn, base, scale, sinkhorn: bool, iters: int, hc_eps: float, norm_eps: float):
    T, n, D = X.shape
    X, u, post, comb = collapse_buffers(X)
    fn = fn.contiguous()
    if T == 0:
        return u, post, comb
    NP = max(4, pow2(n))  # NP*NP >= 16: the comb dot keeps the cube's minimum extent
    PP = max(_MIN_DOT, pow2(2 * n if sinkhorn else n))
    block_k = max(_MIN_DOT, min(_MAX_BLOCK_K, pow2(n * D)))
    block_d = min(_MAX_BLOCK_D, pow2(D))
    check_ub("mhc collapse", collapse_ub_bytes(block_k, block_d, X.element_size(), fn.element_size(), PP,
                                               NP * NP if sinkhorn else 0))
    n_blocks = triton.cdiv(T, _BLOCK_T)
    kern = _hc_collapse_kernel
    kern[(programs("cube", n_blocks, X.device),)](
        X, fn, base.contiguous(), scale.contiguous(), u, post, comb,
        T, D, int(iters), float(hc_eps), float(norm_eps),
        N=n, NP=NP, PP=PP, ROWS_PP=2 * n if sinkhorn else n, CC=NP * NP, SINKHORN=sinkhorn,
        BLOCK_T=_BLOCK_T, BLOCK_K=block_k, BLOCK_D=block_d,
        ROUND_BF16=interpreting(kern) and X.dtype == torch.bfloat16,
    )
    return u, post, comb


def hc_pre(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
           sinkhorn_iters: int, hc_eps: float, norm_eps: float):
    """mHC entry. X: [T, n, D] -> (u [T, D] in X's dtype, post [T, n] fp32, comb [T, n, n] fp32)."""
    _check_dtypes("hc_pre", X=X, fn=fn, base=base, scale=scale)
    T, n, D = X.shape
    rows = (2 + n) * n
    if tuple(fn.shape) != (rows, n * D):
        raise ValueError(f"hc_pre: fn must be [{rows}, {n * D}], got {tuple(fn.shape)}")
    if base.numel() != rows or scale.numel() < 3:
        raise ValueError(f"hc_pre: base must have {rows} entries and scale 3, got {base.numel()} and {scale.numel()}")
    if int(sinkhorn_iters) < 1:
        raise ValueError("hc_pre: at least one Sinkhorn iteration")
    return _collapse(X, fn, base, scale, True, sinkhorn_iters, hc_eps, norm_eps)


def hc_head(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Stream collapse for the head: h = sum_k (sigmoid(m_k * scale + base_k) + eps) X_k."""
    _check_dtypes("hc_head", X=X, fn=fn, base=base, scale=scale)
    T, n, D = X.shape
    if tuple(fn.shape) != (n, n * D):
        raise ValueError(f"hc_head: fn must be [{n}, {n * D}], got {tuple(fn.shape)}")
    if base.numel() != n or scale.numel() < 1:
        raise ValueError(f"hc_head: base must have {n} entries and scale 1, got {base.numel()} and {scale.numel()}")
    return _collapse(X, fn, base, scale, False, 1, hc_eps, norm_eps)[0]


def _post_block_d(T: int, D: int, device) -> int:
    block_d = min(_POST_BLOCK_D, pow2(D))
    cores = programs("vector", 1 << 30, device)
    while block_d > _POST_MIN_BLOCK_D and T * triton.cdiv(D, block_d) < cores:
        block_d //= 2
    return block_d


def hc_post(y: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k * y + sum_j comb[j, k] X_j (fp32 math, output in X's dtype)."""
    _check_dtypes("hc_post", y=y, X=X, post=post, comb=comb)
    T, n, D = X.shape
    if tuple(y.shape) != (T, D) or tuple(post.shape) != (T, n) or tuple(comb.shape) != (T, n, n):
        raise ValueError(f"hc_post: shapes y {tuple(y.shape)}, post {tuple(post.shape)}, comb {tuple(comb.shape)} "
                         f"do not match X {tuple(X.shape)}")
    X = X.contiguous()
    out = torch.empty_like(X)
    if T == 0:
        return out
    NP = pow2(n)
    block_d = _post_block_d(T, D, X.device)
    check_ub("mhc post", post_ub_bytes(block_d, X.element_size(), NP))
    items = T * triton.cdiv(D, block_d)
    kern = _hc_post_kernel
    kern[(programs("vector", items, X.device),)](
        y.contiguous(), X, post.contiguous(), comb.contiguous(), out, T, D,
        N=n, NP=NP, BLOCK_D=block_d, ROUND_BF16=interpreting(kern) and X.dtype == torch.bfloat16,
    )
    return out


# --------------------------------------------------------------------------------------------
# offline lowering check (V4-Flash: n = 4, D = 4096, bf16 streams, fp32 parameters, 20 iterations)

_V4_N, _V4_D = 4, 4096
_COLLAPSE_SIG = {
    "x_ptr": "*bf16", "fn_ptr": "*fp32", "base_ptr": "*fp32", "scale_ptr": "*fp32",
    "u_ptr": "*bf16", "post_ptr": "*fp32", "comb_ptr": "*fp32",
    "T": "i32", "D": "i32", "iters": "i32", "hc_eps": "fp32", "norm_eps": "fp32",
}
_COLLAPSE_CONST = dict(N=_V4_N, NP=4, CC=16, BLOCK_T=_BLOCK_T, BLOCK_K=_MAX_BLOCK_K, BLOCK_D=_MAX_BLOCK_D,
                       ROUND_BF16=False)

LOWERING_CASES = [
    LoweringCase("hc_pre", _hc_collapse_kernel, dict(_COLLAPSE_SIG),
                 dict(_COLLAPSE_CONST, PP=16, ROWS_PP=2 * _V4_N, SINKHORN=True), kind="cube"),
    LoweringCase("hc_head", _hc_collapse_kernel, dict(_COLLAPSE_SIG),
                 dict(_COLLAPSE_CONST, PP=16, ROWS_PP=_V4_N, SINKHORN=False), kind="cube"),
    LoweringCase("hc_post", _hc_post_kernel,
                 {"y_ptr": "*bf16", "x_ptr": "*bf16", "post_ptr": "*fp32", "comb_ptr": "*fp32",
                  "out_ptr": "*bf16", "T": "i32", "D": "i32"},
                 dict(N=_V4_N, NP=4, BLOCK_D=_POST_BLOCK_D, ROUND_BF16=False), kind="vector"),
]
