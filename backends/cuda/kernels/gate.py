"""MoE gate as Triton kernels (spec §2.9; reference: `ReferenceOps.moe_gate`).

Two kernels:
1. `_gate_logits_kernel`, a split-K GEMM: grid (token blocks, expert blocks, K splits); each
   program accumulates x . W^T for BLOCK_T tokens x BLOCK_E experts over its slice of D in fp32
   (bf16 x bf16 on tensor cores on a GPU, anything else as IEEE fp32 `tl.dot`) and stores the partial to an
   fp32 scratch [splits, T, E]. Splitting D keeps decode (a few tokens, W of E x D) bandwidth-bound
   on many SMs instead of a handful.
2. `_gate_select_kernel`, a block of tokens per program ([BLOCK_T, E] tile): adds the splits in a
   fixed order (deterministic), s = sqrt(softplus(logits)) (`triton_common.sqrt_softplus`), then selection: hash (ids =
   tid2eid[token_id], only those k logits are gathered) or top-k of s + bias by k rounds of arg-max
   over the E experts (ties: lowest expert index first; picks come out in
   descending order of s + bias, like torch.topk's sorted output); weights = s[ids] / sum * route_scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...triton_common import gate_buffers, sqrt_softplus
from .launch import MAX_SPLITS, target_programs

_BLOCK_T = 16
_BLOCK_E = 64
_BLOCK_K = 128


@triton.jit
def _gate_logits_kernel(x_ptr, w_ptr, part_ptr, T, E, K, K_PER,
                        LOWP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    exps = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(2)
    tmask = toks < T
    emask = exps < E
    kk = tl.arange(0, BLOCK_K)
    k_lo = split * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    x_rows = x_ptr + toks.to(tl.int64)[:, None] * K
    w_cols = w_ptr + exps.to(tl.int64)[None, :] * K
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + kk
        kmask = k < k_hi
        x = tl.load(x_rows + k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None], mask=kmask[:, None] & emask[None, :], other=0.0)  # [BLOCK_K, BLOCK_E]
        if LOWP:  # same 16-bit type: exact products, fp32 accumulation
            acc = tl.dot(x, w, acc)
        else:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    off = (split * T + toks).to(tl.int64)[:, None] * E + exps[None, :]
    tl.store(part_ptr + off, acc, mask=tmask[:, None] & emask[None, :])


@triton.jit
def _gate_select_kernel(part_ptr, bias_ptr, tid2eid_ptr, tok_ptr, w_out_ptr, id_out_ptr,
                        T, E, SPLITS, route_scale,
                        HASH: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    toks64 = toks.to(tl.int64)
    kk = tl.arange(0, KP)
    tk_mask = tmask[:, None] & (kk < TOPK)[None, :]
    if HASH:  # only the table's experts are needed: gather their logits
        tid = tl.load(tok_ptr + toks64, mask=tmask, other=0).to(tl.int64)
        ids = tl.load(tid2eid_ptr + tid[:, None] * TOPK + kk[None, :], mask=tk_mask, other=0).to(tl.int32)
        z = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
        for sp in range(0, SPLITS):
            z += tl.load(part_ptr + (sp * T + toks64)[:, None] * E + ids, mask=tk_mask, other=0.0)
        g = sqrt_softplus(z)
    else:
        e = tl.arange(0, BLOCK_E)
        emask = e < E
        te_mask = tmask[:, None] & emask[None, :]
        z = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for sp in range(0, SPLITS):
            z += tl.load(part_ptr + (sp * T + toks64)[:, None] * E + e[None, :], mask=te_mask, other=0.0)
        s = sqrt_softplus(z)
        sel = s + tl.load(bias_ptr + e, mask=emask, other=0.0).to(tl.float32)[None, :]
        sel = tl.where(emask[None, :], sel, float("-inf"))
        ids = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
        g = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
        for i in tl.static_range(TOPK):  # k rounds of arg-max; ties -> lowest expert index
            idx = tl.argmax(sel, axis=1, tie_break_left=True).to(tl.int32)  # [BLOCK_T]
            hit = e[None, :] == idx[:, None]
            gi = tl.sum(tl.where(hit, s, 0.0), axis=1)
            ids = tl.where(kk[None, :] == i, idx[:, None], ids)
            g = tl.where(kk[None, :] == i, gi[:, None], g)
            sel = tl.where(hit, float("-inf"), sel)
    g = tl.where(tk_mask, g, 0.0)
    g = g / tl.where(tmask, tl.sum(g, axis=1), 1.0)[:, None] * route_scale
    out = toks64[:, None] * TOPK + kk[None, :]
    tl.store(w_out_ptr + out, g, mask=tk_mask)
    tl.store(id_out_ptr + out, ids, mask=tk_mask)


def moe_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             tid2eid: torch.Tensor | None, token_ids: torch.Tensor | None, topk: int, route_scale: float):
    """sqrt(softplus(x W^T)) scores; experts by hash table or top-k of score + bias.

    Returns (weights fp32 [T, k], expert ids int32 [T, k]); top-k ids come in descending order of
    score + bias, ties broken towards the lower expert index.
    """
    T, K = x.shape
    E = weight.shape[0]
    hashed = tid2eid is not None
    k = tid2eid.shape[1] if hashed else int(topk)
    assert hashed or bias is not None, "moe_gate: a non-hash gate needs its bias"
    assert 1 <= k <= E, "moe_gate: 1 <= k <= experts"
    w_out, id_out, x, weight = gate_buffers(x, weight, k)
    if T == 0:
        return w_out, id_out
    # 16-bit x 16-bit on tensor cores (exact products, fp32 accumulation). Triton's interpreter
    # multiplies bf16 operands of tl.dot as their raw uint16 bits, so there they go through fp32.
    lowp = x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cuda"
    n_tb, n_eb = triton.cdiv(T, _BLOCK_T), triton.cdiv(E, _BLOCK_E)
    k_blocks = triton.cdiv(K, _BLOCK_K)
    splits = max(1, min(k_blocks, MAX_SPLITS, target_programs(x.device) // (n_tb * n_eb)))
    k_per = triton.cdiv(k_blocks, splits) * _BLOCK_K
    splits = triton.cdiv(K, k_per)
    part = torch.empty(splits, T, E, dtype=torch.float32, device=x.device)
    _gate_logits_kernel[(n_tb, n_eb, splits)](x, weight, part, T, E, K, k_per, LOWP=lowp,
                                              BLOCK_T=_BLOCK_T, BLOCK_E=_BLOCK_E, BLOCK_K=_BLOCK_K,
                                              num_warps=4)
    if hashed:
        t2e = tid2eid.contiguous()
        toks = token_ids.contiguous()
        b = part  # unused
    else:
        t2e = toks = id_out  # unused
        b = bias.contiguous()
    block_e = triton.next_power_of_2(E)
    block_t = min(triton.next_power_of_2(T), max(1, 4096 // block_e))
    _gate_select_kernel[(triton.cdiv(T, block_t),)](
        part, b, t2e, toks, w_out, id_out, T, E, splits, float(route_scale),
        HASH=hashed, TOPK=k, KP=triton.next_power_of_2(k), BLOCK_T=block_t, BLOCK_E=block_e,
        num_warps=4 if block_t * block_e <= 2048 else 8)
    return w_out, id_out
