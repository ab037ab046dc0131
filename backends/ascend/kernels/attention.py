"""Sparse MQA attention with a per-head sink, written for Ascend (triton-ascend).

Semantics: those of `ReferenceOps.attention` (backends/reference/ops.py). Query t attends to the
KV rows its two index lists name (the sliding-window list, then the compressed list; the second
may be None or have width 0), -1 entries are ignored, K = V = one shared head (MQA), and the sink
is one more softmax logit whose value vector is zero:

    o_h = sum_s e^{l_hs} v_s / (sum_s e^{l_hs} + e^{sink_h}),   l_hs = scale * q_h . k_s

A row with no valid index sees only the sink and gets o = 0.

Grid and work items (why the grid is what it is)
------------------------------------------------
On Ascend the launch grid binds to physical cores: a GPU-style grid of T x H/BLOCK_H programs
would be run a core-count at a time with a launch each. The kernel uses `tl.dot`, so the grid is
1D with `launch.programs("cube", n_items)` programs (the AI-core count, 20 on 910B3), and each
program walks its items in a persistent loop `for item in range(pid, n_items, nprog)`.

A work item is (token t, head block of BLOCK_H heads, value slice of DV dims), numbered
token-major. Consecutive items run at the same time on neighbouring cores, so the head blocks
(and value slices) of one token, which gather the very same KV rows, are in flight together and
share those rows through L2 instead of each pulling them from HBM.

Per item: m = sink, l = 1, acc = 0 (the sink folded in as the starting point of the online
softmax, so the running max is always finite and all-(-1) chunks or rows need no special case),
then for each index list, chunks of BLOCK_K indices: gather the [BLOCK_K, d] KV rows (one
contiguous d * itemsize run per row: 1 KiB at V4's bf16 d = 512, a multiple of the 32-byte
alignment the vector core wants), S = Q K^T on the cube unit, online-softmax update in fp32 on
the vector unit, acc = acc * alpha + P V on the cube unit with fp32 accumulation.

Skipping padding: the model's index lists carry their -1 padding at the tail (window rows before
position 0, top-k picks short of k, HCA entries not yet written), so a scalar pre-pass over each
index row finds the last valid position and the chunk loop stops there: padded chunks cost an
index read, not a KV gather and two matmuls. -1 entries inside the walked range are masked (their
gather touches no memory, their logit is -inf). The obvious alternative, a data-dependent branch
around the chunk body, made BiShengIR keep extra copies of the accumulator: with it the V4 tile
below needed 197,376 B of UB (overflow); without it the same tile compiles.

Unified Buffer arithmetic (UB = 192 KiB per core, budget half of it for double buffering)
----------------------------------------------------------------------------------------
`_ub_bytes` counts every tile a chunk iteration keeps live (as the triton-ascend guide says to:
all loaded and intermediate tiles), with es = element size of the product dtype:

    one value slice (DV = d):   q [BH, d] es + kv [BK, d] es + acc [BH, d] 4
    DV < d (d sub-tiled):       q [BH, DV] es + k [BK, DV] es + v [BK, DV] es + acc [BH, DV] 4
    both:                       + S, P [BH, BK] 4 each + P cast [BH, BK] es + indices/rows [BK] 12
                                + m, l, alpha, sink [BH] 4 each (+ widening copies, see _ub_bytes)

V4-Flash (64 heads, d = 512, bf16, top-k 512 + window 128): BH = 16, BK = 32, DV = 512 gives
16 KiB q + 32 KiB kv + 32 KiB acc + 5 KiB S/P + ... = 87,680 B of the 98,304 B budget. 64 heads
-> 4 head blocks per token; the KV rows are re-read per head block, from L2 (see the ordering
above). fp32 at d = 512: a full [16, 512] q + kv + acc (BK = 16) counts 101,824 B, so the d axis
is sub-tiled, DV = 256 (two value slices per head block), S is accumulated over d in 256-wide
sub-tiles of q and k, and each item carries a [16, 256] accumulator (BH = 16, BK = 16: 69,056 B).
Splitting the output's d axis over items recomputes S once per slice, which is why DV = d is
preferred whenever it fits. `_tiles` searches (DV, BH, BK) in that order of preference and
`launch.check_ub` guards explicit overrides.

The count is an estimate; the authority is BiShengIR's memory planning (python -m
backends.ascend.lowering). Checked offline for Ascend910B3 (whole UB incl. multibuffering,
196,608 B available): bf16 d = 512 (BH, BK, DV) = (16, 32, 512) and (16, 16, 512) pass,
(16, 64, 512) needs 262,848 B, (32, 16, 512) 262,848 B, (64, 16, 512) 525,632 B; fp32
(16, 16, 256) and (16, 16, 512) pass, (16, 32, 512) needs 229,888 B. So the count rejects
everything that overflows there, and is conservative for some split tiles (e.g. bf16
(32, 64, 256) compiles but counts 136,448 B): the compiler keeps part of the cube operands out of UB.

Precision
---------
16-bit q and KV of one dtype: 16-bit products on the cube unit, fp32 accumulation, P rounded to
that dtype before P V (what the official kernels do). fp32, or mixed dtypes: every operand is
widened to fp32 and the products are fp32 (`tl.dot` on fp32 operands; triton-ascend's default
fp32 matmul mode decides whether the cube uses HF32 -- not checked on hardware yet). fp64 is
rejected (no fp64 on the chip's vector or cube units). Output in q's dtype.

Interpreter (TRITON_INTERPRET=1, CPU, upstream Triton 3.9): its `tl.dot` multiplies bf16's raw
uint16 storage and its fp32 -> bf16 cast truncates. When interpreting, EMULATE_BF16 widens the
bf16 operands to fp32 (exact: bf16 x bf16 products are exact in fp32) and rounds P to bf16 with
round-to-nearest-even bit arithmetic, and ROUND_BF16_OUT rounds the output the same way before
the store. Neither constexpr is set for the NPU.

Portable subset: the source sticks to what both Triton 3.9's interpreter and triton-ascend 3.2's
front end accept -- 1D grid, int32 program ids and aranges, `range` with a runtime step, no
`input_precision` / `tl.range` options / tensor descriptors / libdevice, no unsigned types.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...triton_common import interpreting, round_bf16
from . import launch
from .launch import LoweringCase

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _fold_list(q, q_row, offs_h, hmask, stride_qh, m_i, l_i, acc,
               idx_row, K, kv_ptr, stride_kv, v0, scale,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_F32: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Fold the KV rows idx_row[0:K] (-1 = skip) into the online-softmax state (m_i, l_i, acc)."""
    offs_v = v0 + tl.arange(0, DV)
    # The model's lists put their -1 padding at the tail (window rows before position 0, top-k
    # picks short of k, HCA entries not yet written): walk only up to the last valid index.
    # A scalar pre-pass over the indices does that without a data-dependent branch around the
    # chunk body, which would make the compiler keep extra copies of acc in the Unified Buffer.
    end = 0
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_row + offs_k, mask=offs_k < K, other=-1)
        end = tl.maximum(end, tl.max(tl.where(idx >= 0, offs_k + 1, 0), axis=0))
    for k0 in range(0, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_row + offs_k, mask=offs_k < end, other=-1)
        valid = idx >= 0
        rows = tl.where(valid, idx, 0).to(tl.int64) * stride_kv
        if D == DV:
            # one value slice: the gathered tile serves as K and as V (one read of the rows)
            kv = tl.load(kv_ptr + rows[:, None] + offs_v[None, :], mask=valid[:, None], other=0.0)
            if DOT_F32 or EMULATE_BF16:
                kv = kv.to(tl.float32)
            else:
                kv = kv.to(q.dtype)
            s = tl.dot(q, tl.trans(kv))
            v = kv
        else:
            # d sub-tiled: S accumulates over DV-wide slices of q and k, then this item's V slice
            s = tl.zeros((BLOCK_H, BLOCK_K), dtype=tl.float32)
            for d0 in range(0, D, DV):
                offs_d = d0 + tl.arange(0, DV)
                qs = tl.load(q_row + offs_h[:, None] * stride_qh + offs_d[None, :], mask=hmask[:, None], other=0.0)
                ks = tl.load(kv_ptr + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
                if DOT_F32 or EMULATE_BF16:
                    qs = qs.to(tl.float32)
                    ks = ks.to(tl.float32)
                else:
                    ks = ks.to(qs.dtype)
                s = tl.dot(qs, tl.trans(ks), s)
            v = tl.load(kv_ptr + rows[:, None] + offs_v[None, :], mask=valid[:, None], other=0.0)
            if DOT_F32 or EMULATE_BF16:
                v = v.to(tl.float32)
            else:
                v = v.to(q_row.dtype.element_ty)
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if EMULATE_BF16:  # what the NPU's cast to bf16 feeds the cube: nearest even, kept in fp32
            p = round_bf16(p)
        elif not DOT_F32:
            p = p.to(v.dtype)
        acc = tl.dot(p, v, acc * alpha[:, None])
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _sink_attention_kernel(
    q_ptr, o_ptr, sink_ptr, w_ptr, widx_ptr, c_ptr, cidx_ptr,
    T, H, Kw, Kc, scale, nprog,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_w, stride_widx, stride_c, stride_cidx,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, EMULATE_BF16: tl.constexpr, ROUND_BF16_OUT: tl.constexpr,
):
    pid = tl.program_id(0)
    NV = D // DV  # value slices per head block (constexpr arithmetic)
    n_hb = (H + BLOCK_H - 1) // BLOCK_H
    per_tok = n_hb * NV
    n_items = T * per_tok
    for item in range(pid, n_items, nprog):
        t = item // per_tok
        r = item - t * per_tok
        hb = r // NV
        v0 = (r - hb * NV) * DV
        t64 = t.to(tl.int64)
        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = offs_h < H
        q_row = q_ptr + t64 * stride_qt

        if D == DV:  # the whole q tile stays resident for every chunk
            offs_d = tl.arange(0, D)
            q = tl.load(q_row + offs_h[:, None] * stride_qh + offs_d[None, :], mask=hmask[:, None], other=0.0)
            if DOT_F32 or EMULATE_BF16:
                q = q.to(tl.float32)
        else:  # q is read in sub-tiles inside the chunk loop; this placeholder is never used
            q = tl.zeros((BLOCK_H, DV), dtype=tl.float32)

        # the sink as the online softmax's start: m = sink, l = e^{sink - m} = 1, acc = 0
        sink = tl.load(sink_ptr + offs_h, mask=hmask, other=0.0)
        # floor the running max at -1e30 so that a -inf sink never gives e^{-inf - (-inf)}
        m_i = tl.maximum(sink, -1.0e30)
        l_i = tl.exp(sink - m_i)
        acc = tl.zeros((BLOCK_H, DV), dtype=tl.float32)

        m_i, l_i, acc = _fold_list(q, q_row, offs_h, hmask, stride_qh, m_i, l_i, acc,
                                   widx_ptr + t64 * stride_widx, Kw, w_ptr, stride_w, v0, scale,
                                   D, DV, BLOCK_H, BLOCK_K, DOT_F32, EMULATE_BF16)
        m_i, l_i, acc = _fold_list(q, q_row, offs_h, hmask, stride_qh, m_i, l_i, acc,
                                   cidx_ptr + t64 * stride_cidx, Kc, c_ptr, stride_c, v0, scale,
                                   D, DV, BLOCK_H, BLOCK_K, DOT_F32, EMULATE_BF16)

        # l = 0 only for a -inf sink with no valid index (0 / 0): give 0 like a row that sees nothing
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        if ROUND_BF16_OUT:  # interpreter: its fp32 -> bf16 cast truncates; round to nearest even first
            o = round_bf16(o)
        offs_v = v0 + tl.arange(0, DV)
        tl.store(o_ptr + t64 * stride_ot + offs_h[:, None] * stride_oh + offs_v[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=hmask[:, None])


# --------------------------------------------------------------------------------------------
# wrapper


def _ub_bytes(block_h: int, block_k: int, d: int, dv: int, load_es: int, dot_es: int) -> int:
    """Bytes of the tiles one chunk iteration keeps live (see the module docstring)."""
    tile_es = load_es + (dot_es if dot_es != load_es else 0)  # a widened tile exists twice
    if dv == d:
        tiles = (block_h * d + block_k * d) * tile_es
    else:
        tiles = (block_h * dv + 2 * block_k * dv) * tile_es
    acc = block_h * dv * 4
    sp = block_h * block_k * (4 + 4 + dot_es)  # S, P, P in the product dtype
    idx = block_k * (4 + 8)  # indices, int64 row offsets
    vecs = block_h * 4 * 4  # m, l, alpha, sink
    return tiles + acc + sp + idx + vecs


def _tiles(H: int, d: int, load_es: int, dot_es: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_K, DV): prefer one value slice, then more heads per tile, then longer chunks."""
    bh_max = max(16, min(64, triton.next_power_of_2(H)))  # cube fractals are 16 rows: BH >= 16
    dv = d
    while dv >= 16:
        bh = bh_max
        while bh >= 16:
            for bk in (64, 32, 16):
                if _ub_bytes(bh, bk, d, dv, load_es, dot_es) <= launch.UB_BUDGET:
                    return bh, bk, dv
            bh //= 2
        dv //= 2
    raise ValueError(f"attention: no tile of head dim {d} fits the {launch.UB_BUDGET} B Unified Buffer budget")


def _idx(i: torch.Tensor) -> torch.Tensor:
    i = i if i.dtype == torch.int32 else i.to(torch.int32)  # int32 indices: no int64 vector loads
    return i if i.stride(-1) == 1 else i.contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_inputs(q, window_kv, window_idx, comp_kv, comp_idx, sink) -> bool:
    """The shapes and dtypes `attention` supports, in the order it reports them; returns whether a
    compressed part is attended (comp_idx given with Kc > 0)."""
    if q.dim() != 3:
        raise ValueError(f"attention expects q [T, H, d], got {tuple(q.shape)}")
    T, H, d = q.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"attention kernel: head dim d must be a power of two >= 16 (V4 uses 512), got {d}")
    if window_kv.dim() != 2 or window_kv.shape[1] != d:
        raise ValueError(f"window_kv must be [Nw, {d}], got {tuple(window_kv.shape)}")
    if window_idx.dim() != 2 or window_idx.shape[0] != T:
        raise ValueError(f"window_idx must be [T={T}, Kw], got {tuple(window_idx.shape)}")
    has_comp = comp_idx is not None and comp_idx.shape[1] > 0
    if comp_idx is not None and (comp_idx.dim() != 2 or comp_idx.shape[0] != T):
        raise ValueError(f"comp_idx must be [T={T}, Kc], got {tuple(comp_idx.shape)}")
    if has_comp and (comp_kv is None or comp_kv.dim() != 2 or comp_kv.shape[1] != d):
        got = None if comp_kv is None else tuple(comp_kv.shape)
        raise ValueError(f"comp_kv must be [Nc, {d}] when comp_idx is given, got {got}")
    if sink.numel() != H:
        raise ValueError(f"sink must have H={H} entries, got {tuple(sink.shape)}")
    tensors = {"q": q, "window_kv": window_kv, "sink": sink}
    if has_comp:
        tensors["comp_kv"] = comp_kv
    for name, x in tensors.items():
        if x.dtype == torch.float64:
            raise ValueError(f"attention (Ascend kernel): {name} is float64; Ascend kernels have no fp64 "
                             "(run fp64 on the reference backend)")
        if x.dtype not in _FLOATS:
            raise ValueError(f"attention (Ascend kernel): {name} must be float32/bfloat16/float16, got {x.dtype}")
    return has_comp


def _launch_tiles(q, w, c, H: int, d: int, block_h, block_k, block_v) -> tuple[bool, int, int, int]:
    """(fp32 products?, BLOCK_H, BLOCK_K, DV) for these operands, overrides applied and checked against
    the Unified Buffer budget."""
    # one 16-bit dtype throughout: 16-bit products; anything else: fp32 products
    dot_f32 = q.dtype == torch.float32 or len({q.dtype, w.dtype, c.dtype}) > 1
    load_es = max(x.element_size() for x in (q, w, c))
    dot_es = 4 if dot_f32 else 2
    bh, bk, dv = _tiles(H, d, load_es, dot_es)
    bh, bk, dv = block_h or bh, block_k or bk, block_v or dv
    if dv > d or d % dv or dv & (dv - 1) or dv < 16:
        raise ValueError(f"attention: block_v must be a power of two >= 16 dividing d = {d}, got {dv}")
    if bh < 16 or bk < 16 or bh & (bh - 1) or bk & (bk - 1):
        raise ValueError(f"attention: block_h / block_k must be powers of two >= 16, got {bh} / {bk}")
    launch.check_ub(f"attention BLOCK_H={bh} BLOCK_K={bk} DV={dv} d={d}", _ub_bytes(bh, bk, d, dv, load_es, dot_es))
    return dot_f32, bh, bk, dv


def attention(q: torch.Tensor, window_kv: torch.Tensor, window_idx: torch.Tensor,
              comp_kv: torch.Tensor | None, comp_idx: torch.Tensor | None,
              sink: torch.Tensor, scale: float, *, block_h: int | None = None,
              block_k: int | None = None, block_v: int | None = None) -> torch.Tensor:
    """`ReferenceOps.attention` (without `chunk`) as one Triton-Ascend kernel; see the module docstring.

    q: [T, H, d]; window_kv: [Nw, d]; window_idx: [T, Kw] int; comp_kv: [Nc, d] or None;
    comp_idx: [T, Kc] int or None (Kc may be 0); sink: [H]. Output [T, H, d] in q's dtype.
    block_h / block_k / block_v override the tile choice (block_v: the value slice DV, a power of
    two dividing d); the override must fit the Unified Buffer budget.
    """
    has_comp = _check_inputs(q, window_kv, window_idx, comp_kv, comp_idx, sink)
    T, H, d = q.shape
    out = torch.empty((T, H, d), dtype=q.dtype, device=q.device)
    if T == 0 or H == 0:
        return out
    q = _rows(q)
    w = _rows(window_kv)
    widx = _idx(window_idx)
    c = _rows(comp_kv) if has_comp else w
    cidx = _idx(comp_idx) if has_comp else widx
    Kc = cidx.shape[1] if has_comp else 0
    sink = sink.reshape(H).to(torch.float32).contiguous()

    dot_f32, bh, bk, dv = _launch_tiles(q, w, c, H, d, block_h, block_k, block_v)

    interp = interpreting(_sink_attention_kernel)
    n_items = T * triton.cdiv(H, bh) * (d // dv)
    nprog = launch.programs("cube", n_items, q.device)
    _sink_attention_kernel[(nprog,)](
        q, out, sink, w, widx, c, cidx,
        T, H, widx.shape[1], Kc, float(scale), nprog,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), w.stride(0), widx.stride(0), c.stride(0),
        cidx.stride(0),
        D=d, DV=dv, BLOCK_H=bh, BLOCK_K=bk, DOT_F32=dot_f32,
        EMULATE_BF16=interp and not dot_f32 and q.dtype == torch.bfloat16,
        ROUND_BF16_OUT=interp and q.dtype == torch.bfloat16,
    )
    return out


# --------------------------------------------------------------------------------------------
# lowering check (backends/ascend/lowering.py): V4-Flash shapes

_SIGNATURE = {
    "q_ptr": "*bf16", "o_ptr": "*bf16", "sink_ptr": "*fp32", "w_ptr": "*bf16", "widx_ptr": "*i32",
    "c_ptr": "*bf16", "cidx_ptr": "*i32",
    "T": "i32", "H": "i32", "Kw": "i32", "Kc": "i32", "scale": "fp32", "nprog": "i32",
    "stride_qt": "i32", "stride_qh": "i32", "stride_ot": "i32", "stride_oh": "i32", "stride_w": "i32",
    "stride_widx": "i32", "stride_c": "i32", "stride_cidx": "i32",
}
_BF16_TILES = _tiles(64, 512, 2, 2)  # (16, 32, 512)
_FP32_TILES = _tiles(64, 512, 4, 4)  # (16, 16, 256): d sub-tiled

LOWERING_CASES = [
    LoweringCase(
        name="attention_v4flash_bf16_d512",
        fn=_sink_attention_kernel,
        signature=dict(_SIGNATURE),
        constexprs={"D": 512, "DV": _BF16_TILES[2], "BLOCK_H": _BF16_TILES[0], "BLOCK_K": _BF16_TILES[1],
                    "DOT_F32": False, "EMULATE_BF16": False, "ROUND_BF16_OUT": False},
        kind="cube",
    ),
    LoweringCase(
        name="attention_v4flash_fp32_d512_dsplit",
        fn=_sink_attention_kernel,
        signature={k: ("*fp32" if v == "*bf16" else v) for k, v in _SIGNATURE.items()},
        constexprs={"D": 512, "DV": _FP32_TILES[2], "BLOCK_H": _FP32_TILES[0], "BLOCK_K": _FP32_TILES[1],
                    "DOT_F32": True, "EMULATE_BF16": False, "ROUND_BF16_OUT": False},
        kind="cube",
    ),
]
