"""Lightning-indexer top-k as two Triton kernels: scores, then a per-row radix select (reference:
`ReferenceOps.indexer_topk`).

score[t, s] = sum_h w[t, h] * relu(q[t, h] . K[s]) for the entries s < nvis[t] = (positions[t] + 1) // ratio
of token t's sequence; the top-k ids of each row are returned best first, int32, -1 padded.

Graph safety: `indexer_topk(..., max_visible=N)` takes a host-side bound N >= max_t nvis[t] (the
model knows it from Python ints; under CUDA-graph decode it is the cache capacity). With it, every
allocation and grid depends only on tensor shapes, topk, ratio and N, and nothing is read back to
the host, so the call can be captured once and replayed with other positions. Without it, N is
computed as max(nvis), which is one device->host read. A token with nvis > N is a caller bug; both
kernels clamp its nvis to N rather than read past the score matrix.

Scoring kernel: one program per (token, chunk of TILES * BLOCK_N entries). The program loads its
token's q [H, d] and weights [H] once, then walks the chunk in tiles of BLOCK_N entries; each tile's
keys are read straight from the paged pool through the token's own block-table row (row = slot of
the token; entry s -> block table[slot, s // block_size], row s % block_size), so there is no
gather copy and a batch may mix slots freely. Per tile: one tl.dot [H, d] x [d, BLOCK_N] (fp32 /
fp64 operands with IEEE precision, never TF32; bf16 / fp16 operands on the tensor cores with an
fp32 accumulator), relu, multiply by w and reduce over heads, all in the accumulator dtype.
Tiles past the token's visible count are not loaded. The public `indexer_scores` stores -inf in
every column s >= nvis[t] (FILL); `indexer_topk` leaves those columns unwritten (the top-k kernel
never reads them), and a program whose whole chunk is invisible returns at once, so a static grid
sized for N costs little beyond the visible entries.
(Interpreter only: bf16 operands are upcast to fp32 before tl.dot, whose interpreter version
multiplies bf16's raw storage bits; fp32 products of bf16 values are exact, so nothing changes.)

Top-k kernel (fp32 scores): one program per row, reading only the row's first nvis[t] scores.
- Each score maps to a uint32 key ordered like the float (`_order_key`: sign bit set on
  non-negatives, all bits flipped on negatives; -0.0 is first made +0.0 so that equal floats give
  equal keys).
- nvis <= topk: every visible entry is a pick. Otherwise a radix select finds the k-th largest key
  in 4 passes of 8-bit digits, most significant first: each pass histograms (256 bins) the digit of
  the keys that match the digits found so far, and picks the digit where the count of keys >= it
  first reaches the number still needed. The result is the threshold key and `need`, how many of
  the keys equal to it belong to the top k.
- One compaction pass writes, in index order, the ids of keys > threshold and the first `need` ids
  whose key equals it (ties at the cut go to the lowest index) into the output row, which serves
  as scratch; the program reads its picks back after a barrier.
- The picks are sorted best first by a bitonic tl.sort on int64 (signed key << 32 | 0x7fffffff - id),
  descending, so equal scores come out lowest id first; the row was filled with -1 beforehand.
  (Interpreter only: tl.sort's network is slow there, so the same packed values are ordered by
  counting, for each pick, the picks above it; tests run both.)
Launch shapes: scoring (T, programs per token for max_visible columns), top-k (T,), 4 or 8 warps;
both compile for sm_90a without register spills (checked offline with ptxas, Triton 3.9; not yet
run or timed on a GPU). Each of the 5 scans re-reads the row from global memory (L2 for short
rows); one program per row leaves SMs idle for a small decode batch over a long context.
fp64 scores (the reference-precision check mode, never graph-captured, though sync-free too with
max_visible) keep `torch.topk` over the -inf-filled score matrix: their keys would need 64 bits and
the packed sort value 96.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4.ops import acc as acc_dtype  # the accumulation dtype; `acc` in the kernels is the accumulator

from ...triton_common import interpreting

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _indexer_score_kernel(q_ptr, w_ptr, k_ptr, bt_ptr, slot_ptr, nvis_ptr, out_ptr,
                          H, D, bs, S_max,
                          s_qt, s_qh, s_qd, s_wt, s_wh, s_kb, s_kr, s_kd, s_bt, s_ot,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                          TILES: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                          FILL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * (BLOCK_N * TILES)
    # nvis > S_max is a caller bug (max_visible too small): clamp rather than write past the row
    nvis = tl.minimum(tl.load(nvis_ptr + t), S_max)
    if not FILL and first >= nvis:
        return
    slot = tl.load(slot_ptr + t).to(tl.int64)

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + t * s_qt + h[:, None] * s_qh + d[None, :] * s_qd,
                mask=(h < H)[:, None] & dmask[None, :], other=0.0)
    if UPCAST:  # interpreter only: its tl.dot multiplies bf16 operands' raw bits; fp32 products are exact
        q = q.to(tl.float32)
    # padded heads have q = 0 and w = 0: relu(0) * 0 adds nothing
    w = tl.load(w_ptr + t * s_wt + h * s_wh, mask=h < H, other=0.0).to(ACC)
    bt_row = bt_ptr + slot * s_bt
    o_row = out_ptr + t * s_ot

    for i in range(TILES):
        n0 = first + i * BLOCK_N
        n = n0 + tl.arange(0, BLOCK_N)
        vis = n < nvis
        if n0 < nvis:
            blk = tl.load(bt_row + n // bs, mask=vis, other=0).to(tl.int64)
            rows = (n % bs).to(tl.int64)
            kp = k_ptr + (blk * s_kb + rows * s_kr)[:, None] + d[None, :] * s_kd
            k = tl.load(kp, mask=vis[:, None] & dmask[None, :], other=0.0).to(q.dtype)
            if IEEE:
                logits = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC)
            else:
                logits = tl.dot(q, tl.trans(k), out_dtype=ACC)
            score = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)
            if FILL:
                tl.store(o_row + n, tl.where(vis, score, float("-inf")), mask=n < S_max)
            else:
                tl.store(o_row + n, score, mask=vis)
        elif FILL:
            tl.store(o_row + n, tl.full([BLOCK_N], float("-inf"), ACC), mask=n < S_max)


@triton.jit
def _order_key(x):
    """uint32 key of fp32 x: a < b as floats iff key(a) < key(b) as unsigned ints (NaN aside)."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 == 0.0 as floats, so they must share a key
    b = x.to(tl.uint32, bitcast=True)
    sign = tl.full(b.shape, 0x80000000, tl.uint32)
    # non-negatives rise above every negative; a negative's magnitude bits flip so larger |x| sorts lower
    return tl.where((b & sign) != 0, ~b, b | sign)


@triton.jit
def _topk_kernel(s_ptr, nvis_ptr, out_ptr, S_max, K, s_st, s_ot,
                 BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, RANK_SORT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    nvis = tl.maximum(tl.minimum(tl.load(nvis_ptr + t), S_max), 0)  # S_max clamp: see the module doc
    row = s_ptr + t * s_st
    o_row = out_ptr + t * s_ot
    lane = tl.arange(0, BLOCK_K)
    if nvis > K:
        # radix select of the K-th largest key: `prefix` holds the digits found so far (the bits
        # under `known`), `need` how many keys still to take among those matching it
        bins = tl.arange(0, 256)
        prefix = tl.full([], 0, tl.uint32)
        known = tl.full([], 0, tl.uint32)
        need = K
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            hist = tl.zeros([256], tl.int32)
            for start in range(0, nvis, BLOCK):
                n = start + tl.arange(0, BLOCK)
                key = _order_key(tl.load(row + n, mask=n < nvis, other=0.0))
                digit = ((key >> shift) & 0xFF).to(tl.int32)
                hist += tl.histogram(digit, 256, mask=(n < nvis) & ((key & known) == prefix))
            at_least = tl.cumsum(hist, 0, reverse=True)  # keys whose digit is >= the bin's
            pick = tl.max(tl.where(at_least >= need, bins, 0), 0)
            need -= tl.sum(tl.where(bins > pick, hist, 0), 0)
            prefix |= pick.to(tl.uint32) << shift
            known |= tl.full([], 0xFF, tl.uint32) << shift
        # compaction into the output row: keys > prefix fill [0, K - need) in index order, the
        # first `need` keys == prefix (lowest ids win the tie) fill [K - need, K)
        n_gt = 0
        n_eq = 0
        for start in range(0, nvis, BLOCK):
            n = start + tl.arange(0, BLOCK)
            key = _order_key(tl.load(row + n, mask=n < nvis, other=0.0))
            gt = ((n < nvis) & (key > prefix)).to(tl.int32)
            eq = ((n < nvis) & (key == prefix)).to(tl.int32)
            gt_at = n_gt + tl.cumsum(gt, 0) - 1
            eq_at = n_eq + tl.cumsum(eq, 0) - 1
            tl.store(o_row + gt_at, n, mask=gt != 0)
            tl.store(o_row + (K - need) + eq_at, n, mask=(eq != 0) & (eq_at < need))
            n_gt += tl.sum(gt, 0)
            n_eq += tl.sum(eq, 0)
        tl.debug_barrier()  # the picks were stored by other threads of this program
        ids = tl.load(o_row + lane, mask=lane < K, other=0)
        n_pick = K
    else:
        ids = lane
        n_pick = nvis
    valid = lane < n_pick
    key = _order_key(tl.load(row + ids, mask=valid, other=0.0))
    signed = (key ^ 0x80000000).to(tl.int32, bitcast=True).to(tl.int64)  # the same order, signed
    packed = (signed << 32) | (0x7FFFFFFF - ids).to(tl.int64)
    packed = tl.where(valid, packed, tl.full([BLOCK_K], -(2**63), tl.int64))
    # only the valid picks are stored: the caller filled the row with -1
    if RANK_SORT:
        # each pick's place is the number of picks above it (packed values are distinct): one
        # [BLOCK_K, BLOCK_K] comparison, vectorised in the interpreter, too many registers on a GPU
        rank = tl.sum((packed[None, :] > packed[:, None]).to(tl.int32), axis=1)
        tl.debug_barrier()  # every thread has read its picks before any overwrites them
        tl.store(o_row + rank, ids, mask=valid)
    else:
        packed = tl.sort(packed, descending=True)  # the valid picks end up in lanes [0, n_pick)
        best = 0x7FFFFFFF - (packed & 0xFFFFFFFF).to(tl.int32)
        tl.debug_barrier()  # every thread has read its picks before any overwrites them
        tl.store(o_row + lane, best, mask=valid)


def _score_blocks(dtype: torch.dtype, D: int) -> int:
    if dtype == torch.float64:
        return 16
    return 64 if D <= 128 else 32


def score_config(T: int, s_max: int, H: int, D: int, dtype: torch.dtype, interp: bool) -> tuple[int, int, int]:
    """(BLOCK_N entries per tile, TILES per program, num_warps) of the score kernel (bench/cuda_tune.py
    swaps this function to time other choices)."""
    block_n = _score_blocks(dtype, D)
    n_tiles = triton.cdiv(s_max, block_n)
    # a program covers TILES tiles: few programs per token when the grid is large anyway (decode
    # batches over long contexts), one tile per program when the grid would be too small
    tiles = 1 if (interp or T * n_tiles <= 2048) else (4 if T * n_tiles <= 16384 else 16)
    return block_n, tiles, 4 if H * D <= 64 * 128 else 8


def _launch_scores(out: torch.Tensor, q: torch.Tensor, weights: torch.Tensor, k_pool: torch.Tensor,
                   block_table: torch.Tensor, tok_slot: torch.Tensor, nvis: torch.Tensor, fill: bool) -> None:
    T, H, D = q.shape
    s_max = out.shape[1]
    if q.dtype not in _TL:
        raise TypeError(f"indexer_topk: unsupported q dtype {q.dtype}")
    interp = interpreting(_indexer_score_kernel)
    BLOCK_N, TILES, num_warps = score_config(T, s_max, H, D, q.dtype, interp)
    n_tiles = triton.cdiv(s_max, BLOCK_N)
    grid = (T, triton.cdiv(n_tiles, TILES))
    upcast = interp and q.dtype == torch.bfloat16
    _indexer_score_kernel[grid](
        q, weights, k_pool, block_table, tok_slot, nvis, out,
        H, D, k_pool.shape[1], s_max,
        q.stride(0), q.stride(1), q.stride(2), weights.stride(0), weights.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_table.stride(0), out.stride(0),
        BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_N=BLOCK_N, TILES=TILES, IEEE=q.dtype in (torch.float32, torch.float64) or upcast, UPCAST=upcast,
        ACC=_TL[out.dtype], FILL=fill,
        num_warps=num_warps,
    )


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, k_pool: torch.Tensor, block_table: torch.Tensor,
                   tok_slot: torch.Tensor, nvis: torch.Tensor, s_max: int) -> torch.Tensor:
    """Score matrix [T, s_max] in the accumulator dtype; -inf where s >= nvis[t]."""
    T = q.shape[0]
    out = torch.empty(T, s_max, dtype=acc_dtype(q.dtype), device=q.device)
    if T == 0 or s_max == 0:
        return out
    _launch_scores(out, q, weights, k_pool, block_table, tok_slot, nvis, fill=True)
    return out


def _launch_topk(scores: torch.Tensor, nvis: torch.Tensor, out: torch.Tensor, rank_sort: bool | None = None) -> None:
    """Top-k ids of each fp32 score row's first min(nvis, width) entries into `out` [T, topk], -1 filled.

    rank_sort: order the picks by rank counting instead of tl.sort; None = in the interpreter only
    (tl.sort's bitonic network costs a Python call per compare-and-swap stage there; tests pass False
    to check the GPU path).
    """
    T, s_max = scores.shape
    topk = out.shape[1]
    BLOCK_K = max(16, triton.next_power_of_2(min(topk, s_max)))
    if rank_sort is None:
        rank_sort = interpreting(_topk_kernel) and BLOCK_K <= 1024
    # a scan tile of 1024 fp32 scores is 8 per thread at 4 warps; the sort holds BLOCK_K int64
    _topk_kernel[(T,)](scores, nvis, out, s_max, topk, scores.stride(0), out.stride(0),
                       BLOCK=1024, BLOCK_K=BLOCK_K, RANK_SORT=rank_sort, num_warps=4 if BLOCK_K <= 512 else 8)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, k_pool: torch.Tensor, block_table: torch.Tensor,
                 tok_slot: torch.Tensor, positions: torch.Tensor, ratio: int, topk: int,
                 max_visible: int | None = None) -> torch.Tensor:
    """Top-k compressed entries per query by `sum_h w_h relu(q_h . k_s)` (see ReferenceOps.indexer_topk).

    q: [T, H, d]; weights: [T, H]; k_pool: [blocks, block, d]; block_table: [slots, max_blocks] int32;
    tok_slot: [T]; positions: [T]. Returns int32 [T, topk] logical entry ids, best first (equal
    scores: lowest id first), -1 padded.

    max_visible: host int >= max_t (positions[t] + 1) // ratio, e.g. the cache capacity
    `block_table.shape[1] * k_pool.shape[1]`. Given, the call reads nothing back to the host and its
    launches depend only on shapes, topk and max_visible (CUDA-graph safe); a token seeing more
    entries is clamped to its first max_visible. None: computed from positions (one host read).
    fp64 q selects with torch.topk instead of the top-k kernel (see the module doc).
    """
    T = q.shape[0]
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    if T == 0 or topk == 0:
        return out
    nvis = ((positions + 1) // ratio).to(torch.int32)
    s_max = int(nvis.max()) if max_visible is None else int(max_visible)
    if s_max <= 0:
        return out
    tok_slot = tok_slot.to(torch.int32)
    if q.dtype == torch.float64:
        scores = indexer_scores(q, weights, k_pool, block_table, tok_slot, nvis, s_max)
        k = min(topk, s_max)
        idx = scores.topk(k, dim=-1).indices  # the -inf columns past nvis sort last
        out[:, :k] = torch.where(idx < nvis[:, None], idx, -1).to(torch.int32)
        return out
    scores = torch.empty(T, s_max, dtype=acc_dtype(q.dtype), device=q.device)
    _launch_scores(scores, q, weights, k_pool, block_table, tok_slot, nvis, fill=False)
    _launch_topk(scores, nvis, out)
    return out
