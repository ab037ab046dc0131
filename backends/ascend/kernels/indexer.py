"""Lightning-indexer top-k for Ascend: a Triton-Ascend scoring kernel, then top-k in torch.

Semantics: those of `ReferenceOps.indexer_topk` (backends/reference/ops.py). Token t (cache slot
tok_slot[t], position positions[t]) sees the compressed entries s < (positions[t] + 1) // ratio
of its slot, read from the paged pool k_pool [blocks, block_size, d] through block_table[slot]
(entry s lives in block block_table[slot, s // block_size], row s % block_size). Its score for
entry s is

    score[t, s] = sum_h w[t, h] * relu(q[t, h] . k_s)

and the result is the int32 [T, topk] list of the best visible entries, best first, -1 padded
where fewer than topk are visible.

Scoring kernel
--------------
Writes the fp32 score matrix [T, S_max] (S_max = the batch's largest visible count, so the matrix
is as narrow as the reference's), -inf in every column a token cannot see.

Grid (why): on Ascend the grid binds to physical cores, so the kernel is launched with
`launch.programs("cube", n_items)` programs (it uses `tl.dot`: AI-core count) on a 1D grid, and
each program walks `for item in range(pid, n_items, nprog)`. A work item is (token, group of
TILES consecutive entry tiles of BLOCK_N entries), numbered token-major: a decode batch of a few
tokens over a long context still spreads over every core (many groups per token), and a group
loads its token's q [H, d] and w [H] once for all of its TILES tiles. The wrapper sizes TILES so
that there are still about 8 items per core (load balance) and at most 16 tiles per item.

Per tile: one `tl.dot` [H, d] x [d, BLOCK_N] on the cube unit (fp32 accumulation), then relu,
times w, and the sum over heads on the vector unit. A tile past the token's visible count is not
loaded, only stored as -inf; a group entirely past it skips the q load as well.

Paged reads: when BLOCK_N divides the pool's block size (V4: block 64, BLOCK_N 64) a tile never
straddles two blocks, so its rows are one contiguous run of the pool: the block id is a single
scalar read of the block table and the tile load is a plain strided block (the form
triton-ascend's TritonToStructured pass turns into one DMA; per-row `//` and `%` in a pointer
expression would not split exactly and fall back to the slow unstructured path). Other block
sizes (tests use 3, 5, 12) take the general path: a block-table gather per row, correct but
unstructured.

Unified Buffer arithmetic (budget `launch.UB_BUDGET` = 96 KiB, half the 192 KiB UB)
-----------------------------------------------------------------------------------
Live per tile, es = element size of the product dtype (BH = heads padded to a power of two >= 16,
BD = d padded likewise): q [BH, BD] es + w [BH] 4 + k [BN, BD] es + logits [BH, BN] 4 +
relu(logits) * w [BH, BN] 4 + score, offsets [BN] 4 each + int64 row offsets [BN] 8 (+ widening
copies). V4-Flash (64 index heads, d = 128, bf16): BN = 64 gives 16 KiB q + 16 KiB k + 32 KiB
logits and product + ... = 66,816 B; BN = 128 would count 115 KiB. `_ub_bytes` / `_block_n`
compute it, and `launch.check_ub` guards overrides. BN = 64 is also the V4 pool block, so the
tiles take the contiguous path above.

The count is an estimate; BiShengIR's memory planning (python -m backends.ascend.lowering) is
the authority. Checked offline for Ascend910B3 (196,608 B of UB incl. multibuffering): at the
V4 shapes (contiguous path) bf16 BN = 32, 64, 128 and 256 all compile (presumably the
relu-weight-sum is fused and the cube operands stay out of UB); fp32 (gather path) BN = 32 and
64 compile and BN = 128 needs 200,768 B. So the count is conservative for bf16 and about right
for fp32.

Top-k: `torch.topk` over the score matrix is glue (an in-kernel select is a follow-up; the CANN
path `npu_lightning_indexer` in backends/ascend/ops.py covers bf16 V4 shapes on A2/A3). Picks in
-inf columns map to -1. S_max costs one device -> host read.

Precision: 16-bit q and pool of one dtype -> 16-bit products with fp32 accumulation; fp32 or
mixed dtypes -> fp32 products; weights and every reduction in fp32; fp64 is rejected (the chip
has no fp64). Interpreter (TRITON_INTERPRET=1, upstream Triton 3.9 on CPU): its `tl.dot`
multiplies bf16's raw uint16 storage, so EMULATE_BF16 widens bf16 operands to fp32 first (bf16 x
bf16 products are exact in fp32: the same numbers the cube unit produces, up to summation order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...triton_common import interpreting
from . import launch
from .launch import LoweringCase

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _indexer_score_kernel(
    q_ptr, w_ptr, k_ptr, bt_ptr, slot_ptr, nvis_ptr, out_ptr,
    T, H, bs, S_max, n_groups, tiles, nprog,
    stride_qt, stride_qh, stride_wt, stride_wh, stride_kb, stride_kr, stride_bt, stride_ot,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    CONTIG: tl.constexpr, DOT_F32: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    n_items = T * n_groups
    for item in range(pid, n_items, nprog):
        t = item // n_groups
        first = (item - t * n_groups) * (tiles * BLOCK_N)
        t64 = t.to(tl.int64)
        nvis = tl.load(nvis_ptr + t)
        o_row = out_ptr + t64 * stride_ot
        if first < nvis:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            bt_row = bt_ptr + slot * stride_bt
            # padded heads read q = 0 and w = 0: relu(0) * 0 adds nothing to the head sum
            q = tl.load(q_ptr + t64 * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                        mask=hmask[:, None] & dmask[None, :], other=0.0)
            if DOT_F32 or EMULATE_BF16:
                q = q.to(tl.float32)
            w = tl.load(w_ptr + t64 * stride_wt + offs_h * stride_wh, mask=hmask, other=0.0).to(tl.float32)
            for i in range(tiles):
                n0 = first + i * BLOCK_N
                offs_n = n0 + tl.arange(0, BLOCK_N)
                vis = offs_n < nvis
                if n0 < nvis:
                    if CONTIG:  # the tile sits inside one pool block: one scalar table read, contiguous rows
                        blk = tl.load(bt_row + n0 // bs).to(tl.int64)
                        rows = blk * stride_kb + ((n0 % bs) + tl.arange(0, BLOCK_N)).to(tl.int64) * stride_kr
                    else:
                        blk = tl.load(bt_row + offs_n // bs, mask=vis, other=0).to(tl.int64)
                        rows = blk * stride_kb + (offs_n % bs).to(tl.int64) * stride_kr
                    k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=vis[:, None] & dmask[None, :], other=0.0)
                    if DOT_F32 or EMULATE_BF16:
                        k = k.to(tl.float32)
                    else:
                        k = k.to(q.dtype)
                    logits = tl.dot(q, tl.trans(k))  # [BLOCK_H, BLOCK_N], fp32
                    score = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)
                    score = tl.where(vis, score, float("-inf"))
                else:
                    score = tl.full((BLOCK_N,), float("-inf"), tl.float32)
                tl.store(o_row + offs_n, score, mask=offs_n < S_max)
        else:
            for i in range(tiles):
                offs_n = first + i * BLOCK_N + tl.arange(0, BLOCK_N)
                tl.store(o_row + offs_n, tl.full((BLOCK_N,), float("-inf"), tl.float32), mask=offs_n < S_max)


# --------------------------------------------------------------------------------------------
# wrapper


def _ub_bytes(block_h: int, block_d: int, block_n: int, load_es: int, dot_es: int) -> int:
    """Bytes of the tiles one tile iteration keeps live (see the module docstring)."""
    tile_es = load_es + (dot_es if dot_es != load_es else 0)  # a widened tile exists twice
    return ((block_h + block_n) * block_d * tile_es  # q, k
            + block_h * 4  # w
            + 2 * block_h * block_n * 4  # logits, relu(logits) * w
            + block_n * (4 + 4 + 8))  # score, entry offsets, int64 row offsets


def _block_n(block_h: int, block_d: int, bs: int, load_es: int, dot_es: int) -> tuple[int, bool]:
    """(BLOCK_N, CONTIG): the largest tile that fits the budget, shrunk to divide the pool block if it can."""
    bn = 128
    while bn > 16 and _ub_bytes(block_h, block_d, bn, load_es, dot_es) > launch.UB_BUDGET:
        bn //= 2
    fit = bn
    while bn >= 16 and bs % bn:
        bn //= 2
    if bn >= 16:  # a tile inside one block: contiguous rows (module docstring, "Paged reads")
        return bn, True
    return fit, False


def _check_dtypes(q, weights, k_pool):
    for name, x in (("q", q), ("weights", weights), ("k_pool", k_pool)):
        if x.dtype == torch.float64:
            raise ValueError(f"indexer_topk (Ascend kernel): {name} is float64; Ascend kernels have no fp64 "
                             "(run fp64 on the reference backend)")
        if x.dtype not in _FLOATS:
            raise ValueError(f"indexer_topk (Ascend kernel): {name} must be float32/bfloat16/float16, got {x.dtype}")


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, k_pool: torch.Tensor, block_table: torch.Tensor,
                   tok_slot: torch.Tensor, nvis: torch.Tensor, s_max: int, *, block_n: int | None = None,
                   tiles: int | None = None) -> torch.Tensor:
    """fp32 score matrix [T, s_max]: sum_h w relu(q_h . k_s) for s < nvis[t], -inf elsewhere."""
    _check_dtypes(q, weights, k_pool)
    T, H, d = q.shape
    out = torch.empty(T, s_max, dtype=torch.float32, device=q.device)
    if T == 0 or s_max == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_pool = k_pool if k_pool.stride(-1) == 1 else k_pool.contiguous()
    bt = block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32)
    bt = bt if bt.stride(-1) == 1 else bt.contiguous()
    slot = tok_slot.to(torch.int32).contiguous()
    nvis = nvis.to(torch.int32).contiguous()
    bs = k_pool.shape[1]

    dot_f32 = q.dtype == torch.float32 or q.dtype != k_pool.dtype
    load_es = max(q.element_size(), k_pool.element_size())
    dot_es = 4 if dot_f32 else 2
    bh = max(16, triton.next_power_of_2(H))  # cube fractals are 16 rows: BLOCK_H >= 16
    bd = max(16, triton.next_power_of_2(d))
    bn, contig = _block_n(bh, bd, bs, load_es, dot_es)
    if block_n is not None:
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError(f"indexer: block_n must be a power of two >= 16, got {block_n}")
        bn, contig = block_n, bs % block_n == 0
    launch.check_ub(f"indexer BLOCK_H={bh} BLOCK_D={bd} BLOCK_N={bn}", _ub_bytes(bh, bd, bn, load_es, dot_es))

    n_tiles = triton.cdiv(s_max, bn)
    full_grid = launch.programs("cube", 1 << 30, q.device)  # the grid when work is plentiful
    if tiles is None:  # ~8 items per program for balance, up to 16 tiles sharing one q load
        tiles = max(1, min(16, (T * n_tiles) // (8 * full_grid)))
    tiles = min(tiles, n_tiles)
    n_groups = triton.cdiv(n_tiles, tiles)
    nprog = launch.programs("cube", T * n_groups, q.device)
    interp = interpreting(_indexer_score_kernel)
    _indexer_score_kernel[(nprog,)](
        q, weights, k_pool, bt, slot, nvis, out,
        T, H, bs, s_max, n_groups, tiles, nprog,
        q.stride(0), q.stride(1), weights.stride(0), weights.stride(1), k_pool.stride(0), k_pool.stride(1),
        bt.stride(0), out.stride(0),
        D=d, BLOCK_D=bd, BLOCK_H=bh, BLOCK_N=bn, CONTIG=contig, DOT_F32=dot_f32,
        EMULATE_BF16=interp and not dot_f32 and q.dtype == torch.bfloat16,
    )
    return out


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, k_pool: torch.Tensor, block_table: torch.Tensor,
                 tok_slot: torch.Tensor, positions: torch.Tensor, ratio: int, topk: int,
                 max_visible: int | None = None) -> torch.Tensor:
    """`ReferenceOps.indexer_topk` on Ascend: scoring kernel + torch top-k (module docstring).

    q: [T, H, d]; weights: [T, H] (already scaled); k_pool: [blocks, block, d]; block_table:
    [slots, max_blocks] int; tok_slot: [T]; positions: [T]. Returns int32 [T, topk] logical entry
    ids, best first, -1 where fewer than topk entries are visible.
    """
    if q.dim() != 3 or weights.dim() != 2 or tuple(weights.shape) != tuple(q.shape[:2]):
        raise ValueError(f"indexer_topk expects q [T, H, d] and weights [T, H], got {tuple(q.shape)} / "
                         f"{tuple(weights.shape)}")
    if k_pool.dim() != 3 or k_pool.shape[2] != q.shape[2]:
        raise ValueError(f"k_pool must be [blocks, block, {q.shape[2]}], got {tuple(k_pool.shape)}")
    _check_dtypes(q, weights, k_pool)
    T = q.shape[0]
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    if T == 0 or topk == 0:
        return out
    nvis = torch.div(positions + 1, ratio, rounding_mode="floor").to(torch.int32)
    # the caller's host-side bound spares a device -> host read of the visible counts
    s_max = int(nvis.max()) if max_visible is None else max_visible
    if s_max == 0:
        return out
    scores = indexer_scores(q, weights, k_pool, block_table, tok_slot, nvis, s_max)
    k = min(topk, s_max)
    idx = scores.topk(k, dim=-1).indices
    out[:, :k] = torch.where(idx < nvis[:, None].long(), idx, -1).to(torch.int32)
    return out


# --------------------------------------------------------------------------------------------
# lowering check (backends/ascend/lowering.py): V4-Flash indexer shapes (64 heads, d = 128, bf16,
# pool block 64)

_V4_BN, _V4_CONTIG = _block_n(64, 128, 64, 2, 2)  # (64, True)
_SIGNATURE = {
    "q_ptr": "*bf16", "w_ptr": "*fp32", "k_ptr": "*bf16", "bt_ptr": "*i32", "slot_ptr": "*i32",
    "nvis_ptr": "*i32", "out_ptr": "*fp32",
    "T": "i32", "H": "i32", "bs": "i32", "S_max": "i32", "n_groups": "i32", "tiles": "i32", "nprog": "i32",
    "stride_qt": "i32", "stride_qh": "i32", "stride_wt": "i32", "stride_wh": "i32", "stride_kb": "i32",
    "stride_kr": "i32", "stride_bt": "i32", "stride_ot": "i32",
}

LOWERING_CASES = [
    LoweringCase(
        name="indexer_scores_v4flash_bf16_paged64",
        fn=_indexer_score_kernel,
        signature=dict(_SIGNATURE),
        constexprs={"D": 128, "BLOCK_D": 128, "BLOCK_H": 64, "BLOCK_N": _V4_BN, "CONTIG": _V4_CONTIG,
                    "DOT_F32": False, "EMULATE_BF16": False},
        kind="cube",
    ),
    LoweringCase(
        name="indexer_scores_fp32_gather",
        fn=_indexer_score_kernel,
        signature={**_SIGNATURE, "q_ptr": "*fp32", "k_ptr": "*fp32"},
        constexprs={"D": 128, "BLOCK_D": 128, "BLOCK_H": 64, "BLOCK_N": _block_n(64, 128, 12, 4, 4)[0],
                    "CONTIG": False, "DOT_F32": True, "EMULATE_BF16": False},
        kind="cube",
    ),
]
