"""Sparse MQA attention with a sink: one Triton kernel family for every V4 attention layer.

Semantics are those of `ReferenceOps.attention` (backends/reference/ops.py): query t attends to
the KV rows its index lists name (sliding window list, then the compressed list: top-k selected
for CSA, all visible entries for HCA, none for sliding-only layers), -1 entries are ignored, and
the per-head sink is one more softmax logit with a zero value vector:

    o_h = sum_s e^{l_hs} v_s / (sum_s e^{l_hs} + e^{sink_h}),   l_hs = scale * q_h . k_s

K and V are the same single head (MQA), so prefill and decode are the same computation; the
index lists already encode which rows each query sees.

Kernel design
-------------
- Grid `(T, cdiv(H, BLOCK_H), NSPLIT)`: one program per (query token, block of heads, split of
  the index lists; see Split-KV below). The program loads its `[BLOCK_H, d]` query tile once,
  then walks its part of the window list and the compressed list in chunks of BLOCK_K indices.
  Each chunk's KV rows are gathered once as a `[BLOCK_K, d]` tile and serve all BLOCK_H heads
  through two tensor-core products: `S = Q K^T` (`[BLOCK_H, BLOCK_K]`) and `acc += P V`
  (`[BLOCK_H, d]`), with V = K = the same tile (no second load).
- Online softmax in fp32, base 2 (`exp2`, logits pre-multiplied by log2 e). The running max and
  sum start from the sink (`m = sink, l = 1`), which folds the sink term into the denominator
  exactly as "add e^{sink} at the end" would, and keeps the running max finite, so chunks and
  whole rows whose indices are all -1 need no special case (their probabilities are exactly 0;
  a row with no valid index gets o = 0, as the reference does).
- -1 entries (and the ragged tail past Kw / Kc) are masked out of the gather (masked loads do not
  touch memory) and get logit -inf; a chunk with no valid index at all is skipped by a scalar
  branch, so padded top-k lists cost an index read, not a KV read.
- Precision: 16-bit q/kv -> 16-bit tensor-core products with fp32 accumulation, probabilities cast
  to the KV dtype before `P V` (what the official kernels do); fp32 inputs -> fp32 products with
  `input_precision="ieee"` (no TF32), so fp32 runs are a real fp32 reference.
- head dim d must be a power of two (V4: 512, tests: 128); the whole d is kept in one tile.
- Tile defaults (`_blocks`): 16-bit d <= 128: BLOCK_H <= 64, BLOCK_K 64 (32 FP8), 4 warps;
  d = 512: BLOCK_H <= 32, BLOCK_K 32 (16 FP8), 8 warps; fp32: 16 x 16. All compile for sm_90a
  with no register spills (checked offline with ptxas); they are not yet tuned on a GPU.

Split-KV (flash-decoding)
-------------------------
A decode step has T = batch size queries and V4 has 64 heads, i.e. 2 head blocks at d = 512: a
batch-1 step would be 2 programs walking up to Kw + Kc = 128 + 512 (CSA) or thousands (HCA,
padded to a static width under CUDA graphs) indices each, on a 132-SM GPU. So each (token, head
block) is split into NSPLIT programs (`_num_splits`):

- The window list's chunks followed by the compressed list's form one sequence of
  cdiv(Kw, BLOCK_K) + cdiv(Kc, BLOCK_K) chunks; split s takes a contiguous run of
  `chunks_per_split` of them (part of one list, of both, or nothing at all past the end).
  Counting chunks per list keeps each chunk inside one list when Kw % BLOCK_K != 0.
- Each split runs the same online softmax. Only split 0 starts from the sink; the others start
  empty (m = -1e30, finite so that no -inf - -inf arises, l = 0, acc = 0). A split writes its
  unnormalised state (m, l per head, acc per head x d, fp32) to scratch `[T, NSPLIT, H(, d)]`,
  and `_combine_splits_kernel` merges the splits of each (token, head tile, d tile):
  M = max_s m_s, o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s (a running max, one pass).
  Splits with no valid index contribute 2^(-1e30 - M) = 0; split 0 carries the sink, so a row
  with no valid index still gets o = 0.
- NSPLIT = 1 is the single-kernel path writing the output directly (no scratch, no merge).
- NSPLIT comes from static sizes only (T, H, BLOCK_H, Kw + Kc, BLOCK_K, d, KV row bytes, and
  `launch.target_programs`, 2 x SM count): never from tensor contents, no host sync, so equal
  shapes launch equal grids and a captured CUDA graph stays valid. Rule: as many splits as
  bring T x head_blocks x NSPLIT up to target_programs (so none when T x head_blocks already
  fills the GPU: prefill, decode batches >= ~128), but every split at least `min_chunks` long,
  where min_chunks x BLOCK_K KV rows weigh at least the split's `BLOCK_H x d` fp32 partial state
  (V4 bf16: 64 rows = 2 chunks of 32; FP8: 113 rows -> 8 chunks of 16); then rounded so that no split is empty.
  E.g. 132 SMs, V4 decode, bf16 KV: CSA (Kc = 512) batch 1..8 -> 10 splits of 2 chunks,
  32 -> 4, 64 -> 2, 128 -> 1; HCA with Kc = 8192 batch 1 -> 130, 8 -> 16, 64 -> 2. FP8 KV, CSA:
  batch 1..16 -> 5 splits of 8 chunks. Not tuned on a GPU yet (below min_chunks the partials
  would mostly stay in L2, so shorter splits may still pay off for small batches): `splits=`
  overrides the choice (tests, benchmark).

FP8 KV cache (spec performance.md §1, v4-architecture.md §3.3, "MODEL1")
-------------------------------------------------------------------------
One row per token / compressed entry, `row_bytes(d)` bytes, d = nope + 64, nope % 64 == 0:

    [0, nope)                  e4m3fn bytes of the nope dims (value / scale, saturated at +-448)
    [nope, nope + 128)         the 64 rope dims as bf16 (little-endian)
    [nope + 128, +nope/64)     one UE8M0 scale byte per 64 nope dims (2^(b-127))
    then zero padding          up to a multiple of 8 bytes for the scale group

For V4 (d = 512) that is 448 + 128 + 7 + 1 = 584 B, the paper's figure. FlashMLA's page layout
stores all 576-B payloads of a page first and the 8-B scale groups after them; we keep each
row's payload and scales together in one 584-B row because our caches are addressed by row
(ring slot / pool row ids in the index lists, no page arithmetic in the kernel): a row is then
self-describing, ring and pool writes touch one contiguous row, and a gathered row's scales sit
next to its payload. The byte count per entry, and so the decode roofline, is the same.

`attention_fp8kv` is the same kernel with an FP8 gather: e4m3 bytes and scale bytes are decoded in
registers (`e4m3 * 2^(b-127)`, exact in bf16) and the rope dims read as bf16.

Interpreter notes (TRITON_INTERPRET=1, CPU)
-------------------------------------------
Triton 3.9's interpreter stores bf16 as raw uint16 and its `tl.dot` multiplies those integers, and
its fp32 -> bf16 cast truncates instead of rounding to nearest even. In interpreter mode
(constexprs EMULATE / ROUND_BF16_OUT) the dot operands are therefore rounded to the 16-bit dtype
(bf16 by explicit round-to-nearest-even bit arithmetic) and then widened to fp32 for the product,
and the bf16 output is rounded the same way before the store: bf16 x bf16 products are exact in
fp32, so this computes what a GPU bf16 MMA with fp32 accumulation and an RTNE output cast
computes (up to summation order). The interpreter's float8e4nv bitcast decodes 0x7f/0xff as
+-480 instead of NaN; our encoder saturates at 448 and never writes those bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4 import quant

from ...triton_common import interpreting, round_bf16, with_sign_of
from .launch import target_programs

ROPE_DIM = 64
FP8_GROUP = 64  # nope dims per UE8M0 scale
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# FP8 KV row layout (torch; the executable definition of the byte format)


def _fp8_geometry(d: int) -> tuple[int, int, int]:
    """(nope, number of scale bytes, row bytes) of the packed row for head dim d."""
    nope = d - ROPE_DIM
    if nope < 0 or nope % FP8_GROUP:
        raise ValueError(f"FP8 KV rows need d = nope + {ROPE_DIM} with nope % {FP8_GROUP} == 0, got d = {d}")
    nsc = nope // FP8_GROUP
    return nope, nsc, nope + 2 * ROPE_DIM + -(-nsc // 8) * 8


def row_bytes(d: int) -> int:
    """Bytes per packed FP8 KV row: 584 for d = 512."""
    return _fp8_geometry(d)[2]


def pack_fp8_kv(kv: torch.Tensor) -> torch.Tensor:
    """[N, d] float -> [N, row_bytes(d)] uint8 (layout in the module docstring).

    nope dims: per 64 dims s = pow2_scale(amax, 448, 1e-4), e4m3(clamp(x / s)), i.e. exactly
    what `quant.kv_fake_quant_fp8` computes; rope dims: bf16 (round to nearest even).
    """
    if kv.dim() != 2:
        raise ValueError(f"pack_fp8_kv expects [N, d], got {tuple(kv.shape)}")
    N, d = kv.shape
    nope, nsc, rb = _fp8_geometry(d)
    x = kv.to(torch.float32)
    out = torch.zeros(N, rb, dtype=torch.uint8, device=kv.device)
    if nsc:
        blocks = x[:, :nope].reshape(N, nsc, FP8_GROUP)
        s = quant.pow2_scale(blocks.abs().amax(dim=-1), quant.FP8_MAX, quant.FP8_AMAX_FLOOR)  # [N, nsc]
        out[:, :nope] = quant.e4m3_encode(blocks / s.unsqueeze(-1)).view(torch.uint8).reshape(N, nope)
        out[:, nope + 2 * ROPE_DIM: nope + 2 * ROPE_DIM + nsc] = quant.ue8m0_encode(s).view(torch.uint8)
    out[:, nope: nope + 2 * ROPE_DIM] = kv[:, nope:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return out


def unpack_fp8_kv(packed: torch.Tensor, d: int) -> torch.Tensor:
    """[N, row_bytes(d)] uint8 -> [N, d] float32 (the values the FP8 kernel attends over)."""
    nope, nsc, rb = _fp8_geometry(d)
    if packed.dim() != 2 or packed.shape[1] != rb or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_fp8_kv expects uint8 [N, {rb}] for d = {d}, got {packed.dtype} {tuple(packed.shape)}")
    N = packed.shape[0]
    vals = quant.e4m3_decode(packed[:, :nope].contiguous())
    s = quant.ue8m0_decode(packed[:, nope + 2 * ROPE_DIM: nope + 2 * ROPE_DIM + nsc].contiguous())
    nope_vals = (vals.view(N, nsc, FP8_GROUP) * s.unsqueeze(-1)).view(N, nope)
    rope = packed[:, nope: nope + 2 * ROPE_DIM].contiguous().view(torch.bfloat16).to(torch.float32)
    return torch.cat([nope_vals, rope], dim=1)


# --------------------------------------------------------------------------------------------
# kernel


@triton.jit
def _e4m3_to_f32(b, NATIVE_FP8: tl.constexpr):
    """uint8 e4m3fn bit patterns -> float32 (0x7f/0xff, the NaN codes, are never written)."""
    if NATIVE_FP8:
        return b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        bi = b.to(tl.int32)
        em = bi & 0x7F
        sign = (bi & 0x80) << 24
        # normal: exponent e + 120 (bias 7 -> 127), 3 mantissa bits at the top of fp32's 23
        normal = (sign | ((em + (120 << 3)) << 20)).to(tl.float32, bitcast=True)
        # subnormal (e == 0): m * 2^-9
        sub = (em & 7).to(tl.float32) * 0.001953125
        sub = with_sign_of(sub, sign)  # keeps -0 (0x80)
        return tl.where(em < 8, sub, normal)


@triton.jit
def _kv_tile(kv_ptr, kv16_ptr, rows, valid, stride_kv, stride_kv16,
             D: tl.constexpr, BLOCK_K: tl.constexpr, NOPE: tl.constexpr,
             FP8: tl.constexpr, NATIVE_FP8: tl.constexpr):
    """Gather the [BLOCK_K, D] KV tile of `rows` (invalid rows read as 0)."""
    offs_d = tl.arange(0, D)
    r = rows.to(tl.int64)[:, None]
    if FP8:
        NG: tl.constexpr = D // 64
        is_nope = offs_d < NOPE
        byte = tl.load(kv_ptr + r * stride_kv + offs_d[None, :], mask=valid[:, None] & is_nope[None, :], other=0)
        nope = _e4m3_to_f32(byte, NATIVE_FP8)
        rope = tl.load(kv16_ptr + r * stride_kv16 + (NOPE // 2 + offs_d[None, :] - NOPE),
                       mask=valid[:, None] & (offs_d[None, :] >= NOPE), other=0.0).to(tl.float32)
        x = tl.where(is_nope[None, :], nope, rope)
        # one UE8M0 byte per 64 dims; groups past the nope dims (the rope group) get 2^0
        offs_g = tl.arange(0, NG)
        sb = tl.load(kv_ptr + r * stride_kv + (NOPE + 128 + offs_g[None, :]),
                     mask=valid[:, None] & (offs_g[None, :] < NOPE // 64), other=127)
        s = (sb.to(tl.int32) << 23).to(tl.float32, bitcast=True)
        x = tl.reshape(tl.reshape(x, (BLOCK_K, NG, 64)) * s[:, :, None], (BLOCK_K, D))
        return x
    else:
        return tl.load(kv_ptr + r * stride_kv + offs_d[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _fold_chunk(q, m_i, l_i, acc, idx, valid, kv_ptr, kv16_ptr, stride_kv, stride_kv16, scale_log2,
                D: tl.constexpr, BLOCK_K: tl.constexpr, NOPE: tl.constexpr, FP8: tl.constexpr,
                NATIVE_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr, PREC: tl.constexpr):
    """One chunk of BLOCK_K indexed KV rows into the online-softmax state (m_i, l_i, acc)."""
    kv = _kv_tile(kv_ptr, kv16_ptr, tl.where(valid, idx, 0), valid, stride_kv, stride_kv16,
                  D, BLOCK_K, NOPE, FP8, NATIVE_FP8).to(DOT_DTYPE)
    if EMULATE:
        kv = kv.to(tl.float32)
    s = tl.dot(q, tl.trans(kv), input_precision=PREC) * scale_log2  # [BLOCK_H, BLOCK_K], log2 units
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if EMULATE:  # interpreter: round as the GPU cast does, keep fp32 for the product
        if DOT_DTYPE == tl.bfloat16:
            p = round_bf16(p)
        else:
            p = p.to(DOT_DTYPE).to(tl.float32)
    else:
        p = p.to(DOT_DTYPE)
    acc = acc * alpha[:, None] + tl.dot(p, kv, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _fold_list(q, m_i, l_i, acc, idx_ptr, lo, hi, kv_ptr, kv16_ptr, stride_kv, stride_kv16, scale_log2,
                 D: tl.constexpr, BLOCK_K: tl.constexpr, NOPE: tl.constexpr, FP8: tl.constexpr,
                 NATIVE_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
                 PREC: tl.constexpr, SKIP_EMPTY: tl.constexpr):
    """Fold the KV rows named by idx_ptr[lo:hi] (-1 = skip) into the online-softmax state.

    SKIP_EMPTY: branch around each chunk with no valid index. Otherwise (the default) a first pass
    over the int32 indices drops the trailing run of -1 (a captured step's lists are padded to the
    cache's capacity, a short sequence's top-k list to top-k) and the main loop has no branch, so
    Triton software-pipelines its gathers (measured on an H200: 2-3x faster at V4-Flash decode
    shapes, bench/cuda_tune.py); -1 entries left inside the range are masked loads, no bytes."""
    if not SKIP_EMPTY:
        last = lo - 1
        for k0 in range(lo, hi, 128):
            offs = k0 + tl.arange(0, 128)
            idx = tl.load(idx_ptr + offs, mask=offs < hi, other=-1)
            last = tl.maximum(last, tl.max(tl.where(idx >= 0, offs, -1), axis=0))
        hi = last + 1
    for k0 in range(lo, hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + offs_k, mask=offs_k < hi, other=-1)
        valid = idx >= 0
        if SKIP_EMPTY:
            if tl.max(valid.to(tl.int32), axis=0) > 0:
                m_i, l_i, acc = _fold_chunk(q, m_i, l_i, acc, idx, valid, kv_ptr, kv16_ptr, stride_kv, stride_kv16,
                                            scale_log2, D, BLOCK_K, NOPE, FP8, NATIVE_FP8, DOT_DTYPE, EMULATE, PREC)
        else:
            m_i, l_i, acc = _fold_chunk(q, m_i, l_i, acc, idx, valid, kv_ptr, kv16_ptr, stride_kv, stride_kv16,
                                        scale_log2, D, BLOCK_K, NOPE, FP8, NATIVE_FP8, DOT_DTYPE, EMULATE, PREC)
    return m_i, l_i, acc


@triton.jit
def _sink_attention_kernel(
    q_ptr, o_ptr, sink_ptr,
    w_ptr, w16_ptr, widx_ptr, c_ptr, c16_ptr, cidx_ptr,
    pm_ptr, pl_ptr, pacc_ptr,
    H, Kw, Kc, chunks_per_split, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_w, stride_w16, stride_widx, stride_c, stride_c16, stride_cidx,
    D: tl.constexpr, NOPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    FP8: tl.constexpr, NATIVE_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
    PREC: tl.constexpr, ROUND_BF16_OUT: tl.constexpr, SPLIT: tl.constexpr, SKIP_EMPTY: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    hmask = offs_h < H
    offs_d = tl.arange(0, D)

    q = tl.load(q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :], mask=hmask[:, None], other=0.0)
    q = q.to(DOT_DTYPE)
    if EMULATE:
        q = q.to(tl.float32)

    # the sink as the running-softmax start: m = sink, l = e^{sink - m} = 1, acc = 0 (zero value).
    # Only split 0 owns the sink; the others start empty (sink -> -inf: l = 0, and m = -1e30 stays
    # finite so that exp2(m_old - m_new) never meets -inf - -inf)
    sink = tl.load(sink_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
    sink = tl.where(split == 0, sink, float("-inf"))
    m_i = tl.maximum(sink, -1.0e30)
    l_i = tl.exp2(sink - m_i)
    acc = tl.zeros((BLOCK_H, D), dtype=tl.float32)

    # This split's chunks [c0, c1) of the window list's chunks followed by the compressed list's:
    # counting chunks per list (not indices of the concatenation) keeps every chunk inside one
    # list even when Kw is not a multiple of BLOCK_K
    nw = tl.cdiv(Kw, BLOCK_K)
    c0 = split * chunks_per_split
    c1 = c0 + chunks_per_split
    m_i, l_i, acc = _fold_list(q, m_i, l_i, acc, widx_ptr + t * stride_widx,
                                 c0 * BLOCK_K, tl.minimum(c1 * BLOCK_K, Kw),
                                 w_ptr, w16_ptr, stride_w, stride_w16,
                                 scale_log2, D, BLOCK_K, NOPE, FP8, NATIVE_FP8, DOT_DTYPE, EMULATE, PREC, SKIP_EMPTY)
    m_i, l_i, acc = _fold_list(q, m_i, l_i, acc, cidx_ptr + t * stride_cidx,
                                 tl.maximum(c0 - nw, 0) * BLOCK_K, tl.minimum(tl.maximum(c1 - nw, 0) * BLOCK_K, Kc),
                                 c_ptr, c16_ptr, stride_c, stride_c16,
                                 scale_log2, D, BLOCK_K, NOPE, FP8, NATIVE_FP8, DOT_DTYPE, EMULATE, PREC, SKIP_EMPTY)

    if SPLIT:  # unnormalised partial state, merged by _combine_splits_kernel
        row = (t * tl.num_programs(2) + split) * H + offs_h  # scratch [T, NSPLIT, H(, D)]
        tl.store(pm_ptr + row, m_i, mask=hmask)
        tl.store(pl_ptr + row, l_i, mask=hmask)
        # a split that met no valid index (l = 0: not split 0, which holds the sink) has acc = 0:
        # its acc is neither stored nor read back, so the -1 padding of a captured step's HCA list
        # (sized to the cache capacity) costs the partial state no bytes
        tl.store(pacc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=(hmask & (l_i > 0))[:, None])
    else:
        o = acc / l_i[:, None]
        if ROUND_BF16_OUT:  # interpreter: its fp32 -> bf16 cast truncates; round to nearest even first
            o = round_bf16(o)
        tl.store(o_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=hmask[:, None])


@triton.jit
def _combine_splits_kernel(
    o_ptr, pm_ptr, pl_ptr, pacc_ptr, H, NSPLIT, stride_ot, stride_oh,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BF16_OUT: tl.constexpr,
):
    """o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s, for one [BLOCK_H, BLOCK_D]
    tile of one token. M is tracked as a running max (one pass over the splits); every m_s >= -1e30
    is finite, so no -inf - -inf. Split 0 carries the sink, so l_sum > 0 for any finite sink."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    hmask = offs_h < H
    m = tl.full((BLOCK_H,), -1.0e30, tl.float32)
    l_sum = tl.zeros((BLOCK_H,), tl.float32)
    o = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for s in range(NSPLIT):
        row = (t * NSPLIT + s) * H + offs_h
        m_s = tl.load(pm_ptr + row, mask=hmask, other=-1.0e30)
        l_s = tl.load(pl_ptr + row, mask=hmask, other=1.0)  # 1: padded heads divide by 1, not 0
        a_s = tl.load(pacc_ptr + row[:, None] * D + offs_d[None, :], mask=(hmask & (l_s > 0))[:, None], other=0.0)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_s - m_new)
        l_sum = l_sum * alpha + l_s * beta
        o = o * alpha[:, None] + a_s * beta[:, None]
        m = m_new
    o = o / l_sum[:, None]
    if ROUND_BF16_OUT:
        o = round_bf16(o)
    tl.store(o_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=hmask[:, None])


# --------------------------------------------------------------------------------------------
# launchers


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# triton.jit picks the interpreter when the kernel is decorated (TRITON_INTERPRET at import); read
# once here so that tests may wrap the kernel objects to record their launch grids
_INTERPRETING = interpreting(_sink_attention_kernel)


def _check_common(q, window_idx, comp_idx, sink):
    if q.dim() != 3:
        raise ValueError(f"attention expects q [T, H, d], got {tuple(q.shape)}")
    T, H, d = q.shape
    assert d >= 16 and d & (d - 1) == 0, (
        f"attention kernel: head dim d must be a power of two >= 16 (V4 uses 512), got d = {d}")
    if q.dtype not in _TL:
        raise ValueError(f"attention kernel supports float32/bfloat16/float16 q, got {q.dtype}")
    if window_idx.dim() != 2 or window_idx.shape[0] != T:
        raise ValueError(f"window_idx must be [T={T}, Kw], got {tuple(window_idx.shape)}")
    if comp_idx is not None and (comp_idx.dim() != 2 or comp_idx.shape[0] != T):
        raise ValueError(f"comp_idx must be [T={T}, Kc], got {tuple(comp_idx.shape)}")
    if sink.numel() != H:
        raise ValueError(f"sink must have H={H} entries, got {tuple(sink.shape)}")


def _idx(i: torch.Tensor) -> torch.Tensor:
    i = i if i.dtype == torch.int32 else i.to(torch.int32)
    return i if i.stride(-1) == 1 else i.contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _blocks(H: int, d: int, fp32: bool, fp8: bool, block_h, block_k, num_warps, num_stages):
    """Tile defaults (BLOCK_H, BLOCK_K, num_warps, num_stages). d = 512, 16-bit: the fastest of 55
    tilings swept on an H200 at V4-Flash decode shapes (bench/cuda_tune.py, bench/results/); the
    others: no register spills under sm_90 ptxas, not timed on a GPU."""
    # tl.dot needs M, N, K >= 16, hence BLOCK_H >= 16 even for fewer heads (extra rows are masked)
    ns = None
    if fp32:  # exact fp32 products run on CUDA cores: small tiles
        bh, bk, nw = 16, 16, 4 if d <= 128 else 8
    elif d <= 128:
        bh, bk, nw = max(16, min(triton.next_power_of_2(H), 64)), 32 if fp8 else 64, 4
    elif fp8:  # d = 512, e4m3 rows decoded in registers: 0.495 -> 0.283 ms at B = 128 (CSA, 64K)
        bh, bk, nw = max(16, min(triton.next_power_of_2(H), 32)), 32, 4
    else:  # d = 512 bf16: 0.245 -> 0.073 ms at B = 128 (CSA, 64K); 2 stages beat 3
        bh, bk, nw, ns = max(16, min(triton.next_power_of_2(H), 32)), 64, 4, 2
    return block_h or bh, block_k or bk, num_warps or nw, num_stages or ns


def _num_splits(T: int, head_blocks: int, chunks: int, min_chunks: int, device: torch.device) -> int:
    """How many splits of each (token, head block)'s index list, from static sizes only (no tensor
    contents, no sync: the same for every call of one shape, so CUDA-graph safe)."""
    # enough programs to fill the machine; none beyond what the tokens already give (prefill, big
    # decode batches: fill <= 1), and none shorter than min_chunks
    fill = target_programs(device) // (T * head_blocks)
    return max(1, min(fill, chunks // min_chunks))


def _launch(q, w_rows, w16, widx, c_rows, c16, cidx, sink, scale, fp8, nope, dot_dtype,
            block_h, block_k, num_warps, native_fp8, splits, num_stages=None, skip_empty=False):
    T, H, d = q.shape
    out = torch.empty((T, H, d), dtype=q.dtype, device=q.device)
    if T == 0 or H == 0:
        return out
    if splits is not None and (not isinstance(splits, int) or splits < 1):
        raise ValueError(f"splits must be a positive int or None, got {splits!r}")
    block_h, block_k, num_warps, num_stages = _blocks(H, d, dot_dtype == torch.float32, fp8, block_h, block_k,
                                                      num_warps, num_stages)
    emulate = _INTERPRETING and dot_dtype != torch.float32
    round_out = _INTERPRETING and q.dtype == torch.bfloat16
    Kw, Kc = widx.shape[1], cidx.shape[1]
    sink = sink.to(torch.float32).contiguous()
    head_blocks = triton.cdiv(H, block_h)
    chunks = triton.cdiv(Kw, block_k) + triton.cdiv(Kc, block_k)  # per list: no chunk spans both
    if splits is None:
        # a split's partial state (BLOCK_H x d fp32, written, then read back by the combine) should
        # weigh no more than the KV rows the split gathers, or splitting adds more bytes than it spreads
        kv_row = row_bytes(d) if fp8 else d * w_rows.element_size()
        min_chunks = triton.cdiv(triton.cdiv(block_h * d * 4, kv_row), block_k)
        splits = _num_splits(T, head_blocks, chunks, min_chunks, q.device)
        per_split = max(1, triton.cdiv(chunks, splits))
        splits = max(1, triton.cdiv(chunks, per_split))  # drop splits the rounding left empty
    else:  # forced (tests, benchmark): kept as given, even where some splits get no chunk at all
        per_split = max(1, triton.cdiv(chunks, splits))
    if splits == 1:
        per_split = max(1, chunks)
        pm = pl = pacc = out  # unused: the kernel writes the output itself
    else:
        pm = torch.empty((T, splits, H), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty((T, splits, H, d), dtype=torch.float32, device=q.device)
    _sink_attention_kernel[(T, head_blocks, splits)](
        q, out, sink,
        w_rows, w16, widx, c_rows, c16, cidx,
        pm, pl, pacc,
        H, Kw, Kc, per_split, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        w_rows.stride(0), w16.stride(0), widx.stride(0), c_rows.stride(0), c16.stride(0), cidx.stride(0),
        D=d, NOPE=nope, BLOCK_H=block_h, BLOCK_K=block_k, FP8=fp8, NATIVE_FP8=native_fp8,
        DOT_DTYPE=_TL[dot_dtype], EMULATE=emulate, PREC="ieee" if dot_dtype == torch.float32 else "tf32",
        ROUND_BF16_OUT=round_out, SPLIT=splits > 1, SKIP_EMPTY=bool(skip_empty),
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
    )
    if splits > 1:
        # its own, smaller tiles: one token's merge is a short stream over splits x H x d floats,
        # spread over several programs so that a batch-1 merge is not two programs long
        bh, bd = min(triton.next_power_of_2(H), 16), min(d, 128)
        _combine_splits_kernel[(T, triton.cdiv(H, bh), d // bd)](
            out, pm, pl, pacc, H, splits, out.stride(0), out.stride(1),
            D=d, BLOCK_H=bh, BLOCK_D=bd, ROUND_BF16_OUT=round_out, num_warps=4,
        )
    return out


def attention(q: torch.Tensor, window_kv: torch.Tensor, window_idx: torch.Tensor,
              comp_kv: torch.Tensor | None, comp_idx: torch.Tensor | None,
              sink: torch.Tensor, scale: float, *, block_h: int | None = None, block_k: int | None = None,
              num_warps: int | None = None, splits: int | None = None, num_stages: int | None = None,
              skip_empty: bool = False) -> torch.Tensor:
    """`ReferenceOps.attention` (without `chunk`) as one Triton kernel; see the module docstring.

    q: [T, H, d]; window_kv: [Nw, d]; window_idx: [T, Kw] int32; comp_kv: [Nc, d] or None;
    comp_idx: [T, Kc] int32 or None (Kc may be 0); sink: [H] fp32. Output [T, H, d] in q's dtype.
    splits: split-KV programs per (token, head block); None chooses from the shapes (module docstring).
    block_h / block_k / num_warps / num_stages / skip_empty: tiling overrides (bench/cuda_tune.py).
    """
    _check_common(q, window_idx, comp_idx, sink)
    d = q.shape[2]
    if window_kv.dim() != 2 or window_kv.shape[1] != d:
        raise ValueError(f"window_kv must be [Nw, {d}], got {tuple(window_kv.shape)}")
    has_comp = comp_idx is not None and comp_idx.shape[1] > 0
    if has_comp and (comp_kv is None or comp_kv.dim() != 2 or comp_kv.shape[1] != d):
        got = None if comp_kv is None else tuple(comp_kv.shape)
        raise ValueError(f"comp_kv must be [Nc, {d}] when comp_idx is given, got {got}")
    w = _rows(window_kv)
    c = _rows(comp_kv) if has_comp else w
    cidx = _idx(comp_idx) if has_comp else window_idx.new_empty((q.shape[0], 0), dtype=torch.int32)
    dtypes = {q.dtype, w.dtype, c.dtype}
    for x in dtypes:
        if x not in _TL:
            raise ValueError(f"attention kernel supports float32/bfloat16/float16 tensors, got {x}")
    # 16-bit products only when everything is that one 16-bit type; otherwise exact fp32 products
    dot_dtype = q.dtype if len(dtypes) == 1 else torch.float32
    return _launch(q, w, w, _idx(window_idx), c, c, cidx, sink, scale, False, 0, dot_dtype,
                   block_h, block_k, num_warps, False, splits, num_stages, skip_empty)


def _native_fp8_default(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def attention_fp8kv(q: torch.Tensor, window_packed: torch.Tensor, window_idx: torch.Tensor,
                    comp_packed: torch.Tensor | None, comp_idx: torch.Tensor | None,
                    sink: torch.Tensor, scale: float, d: int, *, block_h: int | None = None,
                    block_k: int | None = None, num_warps: int | None = None,
                    native_fp8: bool | None = None, splits: int | None = None, num_stages: int | None = None,
                    skip_empty: bool = False) -> torch.Tensor:
    """`attention` over FP8-packed KV rows (`pack_fp8_kv` layout), dequantised in the kernel.

    Equals `attention(q, unpack_fp8_kv(window_packed, d), ..., unpack_fp8_kv(comp_packed, d), ...)`.
    native_fp8: decode e4m3 with the hardware float8 cast (default on sm_89+) instead of bit
    arithmetic (default elsewhere, interpreter included).
    """
    _check_common(q, window_idx, comp_idx, sink)
    if q.shape[2] != d:
        raise ValueError(f"q head dim {q.shape[2]} != d = {d}")
    nope, _, rb = _fp8_geometry(d)
    has_comp = comp_idx is not None and comp_idx.shape[1] > 0
    for name, p in (("window_packed", window_packed), ("comp_packed", comp_packed if has_comp else window_packed)):
        if p is None or p.dtype != torch.uint8 or p.dim() != 2 or p.shape[1] != rb:
            raise ValueError(f"{name} must be uint8 [N, {rb}] for d = {d}, got "
                             f"{None if p is None else (p.dtype, tuple(p.shape))}")
    w = window_packed.contiguous()
    c = comp_packed.contiguous() if has_comp else w
    cidx = _idx(comp_idx) if has_comp else window_idx.new_empty((q.shape[0], 0), dtype=torch.int32)
    # dequantised values (e4m3 * 2^k, bf16 rope) are exact in bf16, but may exceed fp16's range
    dot_dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    if native_fp8 is None:
        native_fp8 = _native_fp8_default(q.device)
    return _launch(q, w, w.view(torch.bfloat16), _idx(window_idx), c, c.view(torch.bfloat16), cidx, sink, scale,
                   True, nope, dot_dtype, block_h, block_k, num_warps, native_fp8, splits, num_stages, skip_empty)
