"""Lightning-indexer top-k as a Triton scoring kernel plus torch top-k (reference: `ReferenceOps.indexer_topk`).

score[t, s] = sum_h w[t, h] * relu(q[t, h] . K[s]) for the entries s < (positions[t] + 1) // ratio of
token t's sequence; every other column of the score matrix is -inf.

Scoring kernel: one program per (token, chunk of TILES * BLOCK_N entries). The program loads its
token's q [H, d] and weights [H] once, then walks the chunk in tiles of BLOCK_N entries; each tile's
keys are read straight from the paged pool through the token's own block-table row (row = slot of
the token; entry s -> block table[slot, s // block_size], row s % block_size), so there is no
gather copy and a batch may mix slots freely. Per tile: one tl.dot [H, d] x [d, BLOCK_N] (fp32 /
fp64 operands with IEEE precision, never TF32; bf16 / fp16 operands on the tensor cores with an
fp32 accumulator), relu, multiply by w and reduce over heads, all in the accumulator dtype.
Tiles past the token's visible count are not loaded; their columns are stored as -inf.
(Interpreter only: bf16 operands are upcast to fp32 before tl.dot, whose interpreter version
multiplies bf16's raw storage bits; fp32 products of bf16 values are exact, so nothing changes.)

Top-k: `torch.topk` over the [T, S_max] score matrix is glue (an in-kernel top-k, e.g. a radix
select fused after the scores, is a follow-up); S_max = max visible count of the batch, so the
matrix is as narrow as the reference's. Picks past a token's visible count (the -inf columns) map
to -1, and the result is padded with -1 to width topk. S_max needs one device->host read.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _indexer_score_kernel(q_ptr, w_ptr, k_ptr, bt_ptr, slot_ptr, nvis_ptr, out_ptr,
                          H, D, bs, S_max,
                          s_qt, s_qh, s_qd, s_wt, s_wh, s_kb, s_kr, s_kd, s_bt, s_ot,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                          TILES: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * (BLOCK_N * TILES)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    nvis = tl.load(nvis_ptr + t)

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
            score = tl.where(vis, score, float("-inf"))
        else:
            score = tl.full([BLOCK_N], float("-inf"), ACC)
        tl.store(o_row + n, score, mask=n < S_max)


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, k_pool: torch.Tensor, block_table: torch.Tensor,
                   tok_slot: torch.Tensor, nvis: torch.Tensor, s_max: int) -> torch.Tensor:
    """Score matrix [T, s_max] in the accumulator dtype; -inf where s >= nvis[t]."""
    T, H, D = q.shape
    a = _acc(q.dtype)
    out = torch.empty(T, s_max, dtype=a, device=q.device)
    if T == 0 or s_max == 0:
        return out
    if q.dtype not in _TL:
        raise TypeError(f"indexer_topk: unsupported q dtype {q.dtype}")
    interp = _interpreting()
    BLOCK_N = 64 if D <= 128 else 32
    if q.dtype == torch.float64:
        BLOCK_N = 16
    n_tiles = triton.cdiv(s_max, BLOCK_N)
    # a program covers TILES tiles: few programs per token when the grid is large anyway (decode
    # batches over long contexts), one tile per program when the grid would be too small
    TILES = 1 if (interp or T * n_tiles <= 2048) else (4 if T * n_tiles <= 16384 else 16)
    grid = (T, triton.cdiv(n_tiles, TILES))
    upcast = interp and q.dtype == torch.bfloat16
    _indexer_score_kernel[grid](
        q, weights, k_pool, block_table, tok_slot, nvis, out,
        H, D, k_pool.shape[1], s_max,
        q.stride(0), q.stride(1), q.stride(2), weights.stride(0), weights.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_table.stride(0), out.stride(0),
        BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_N=BLOCK_N, TILES=TILES, IEEE=q.dtype in (torch.float32, torch.float64) or upcast, UPCAST=upcast,
        ACC=_TL[a],
        num_warps=4 if H * D <= 64 * 128 else 8,
    )
    return out


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, k_pool: torch.Tensor, block_table: torch.Tensor,
                 tok_slot: torch.Tensor, positions: torch.Tensor, ratio: int, topk: int) -> torch.Tensor:
    """Top-k compressed entries per query by `sum_h w_h relu(q_h . k_s)` (see ReferenceOps.indexer_topk).

    q: [T, H, d]; weights: [T, H]; k_pool: [blocks, block, d]; block_table: [slots, max_blocks] int32;
    tok_slot: [T]; positions: [T]. Returns int32 [T, topk] logical entry ids, best first, -1 padded.
    """
    T = q.shape[0]
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    if T == 0 or topk == 0:
        return out
    nvis = ((positions + 1) // ratio).to(torch.int32)
    s_max = int(nvis.max())
    if s_max == 0:
        return out
    scores = indexer_scores(q, weights, k_pool, block_table, tok_slot.to(torch.int32), nvis, s_max)
    k = min(topk, s_max)
    idx = scores.topk(k, dim=-1).indices  # glue: torch top-k over the score matrix
    out[:, :k] = torch.where(idx < nvis[:, None], idx, -1).to(torch.int32)
    return out
