"""Compressor (CSA ratio 4 overlapping, HCA / plain ratio m) as Triton kernels (reference: `ReferenceOps.compress`).

Each call folds the packed new tokens of every sequence into that sequence's compressor state and
emits every entry whose window closed (spec §2.6, §3.2). Two kernels per call, one program row per
emitted entry; the host only does integer bookkeeping on the Python ints of `seqs`:

1. `_compress_pool_kernel`, one program per (entry, block of BLOCK_C channels): gathers the entry's
   candidate rows -- for the overlapping compressor the first channel half of window w-1 and the
   second half of window w (2m candidates per channel), else the m rows of window w -- each from
   the state buffer (the previous window, rows [0, m); the tokens of window w0 that arrived in
   earlier calls, rows [cur, cur + have)) or from the packed new tokens (whose score gets
   ape[position mod m] added on load). Softmax over the candidates per channel in the
   accumulator dtype, online in chunks of BLOCK_R rows (a single chunk for m = 4), then the
   softmax-weighted sum -> pooled [E, c] scratch.
2. `_compress_finish_kernel`, one program per entry (the whole row in registers): cast to the
   pool dtype, RMSNorm over c, interleaved RoPE of the last 2 * len(inv_freq) dims at position w*m,
   then the exact-mode fake quant in-kernel: "fp8" = e4m3 with one power-of-two scale per 64 nope
   dims (v4.quant.kv_fake_quant_fp8), "fp4" = Sylvester Hadamard over the row (the same butterfly
   order as v4.quant.hadamard, so it is bit-identical) then e2m1 with one power-of-two scale per 32
   (v4.quant.fp4_fake_quant). Scales are built from exponent bits, rounding to the e4m3 / e2m1 grid
   is round-to-nearest-even done with exact integer/float steps (no fast-math dependence). The row
   is written to the pool row given by the block table and to the returned [E, c] tensor.

Torch glue: the state update after the pool kernel has read the state (tokens of the last complete
window -> rows [0, m) for the overlapping compressor; the leftover tokens of the open window ->
rows [cur, ...)), as a few batched index_put ops whose indices come from one host->device copy;
the only per-sequence Python is integer arithmetic on `seqs`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from v4.ops import DecodeRows
from v4.ops import acc as acc_dtype  # the accumulation dtype; `acc` in the kernels is the accumulator

from ...triton_common import cast_rne, ceil_log2, exp2i, interpreting, round_fp

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_QUANT = {"none": 0, "fp8": 1, "fp4": 2}
_FP8_BLOCK, _FP4_BLOCK = 64, 32


@triton.jit
def _softmax_pool_step(run_max, run_sum, acc, x, z):
    """Fold candidate rows x [R, C] with scores z [R, C] (-inf = no candidate) into the per-channel
    online softmax (run_max, run_sum, acc [C]); a channel with no candidate yet stays at zero weight."""
    new_max = tl.maximum(run_max, tl.max(z, axis=0))
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.exp(run_max - safe)
    p = tl.exp(z - safe[None, :])
    return new_max, run_sum * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p * x, axis=0)


@triton.jit
def _compress_pool_kernel(kv_ptr, z_ptr, ape_ptr, skv_ptr, sz_ptr, pooled_ptr, ent_ptr, seq_ptr,
                          c, s_kvt, s_kvc, s_zt, s_zc, s_ar, s_ac,
                          s_skv_s, s_skv_r, s_skv_c, s_sz_s, s_sz_r, s_sz_c,
                          M: tl.constexpr, KM: tl.constexpr, CUR: tl.constexpr, OVERLAP: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    e = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < c
    b = tl.load(ent_ptr + e)
    slot = tl.load(seq_ptr + b * 5 + 0)
    w0 = tl.load(seq_ptr + b * 5 + 1)
    have = tl.load(seq_ptr + b * 5 + 2)
    off = tl.load(seq_ptr + b * 5 + 3)
    j = e - tl.load(seq_ptr + b * 5 + 4)  # window index within this call's stream of windows

    run_max = tl.full([BLOCK_C], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_C], ACC)
    acc = tl.zeros([BLOCK_C], ACC)
    for r0 in range(0, KM, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        if OVERLAP:
            half = r // M  # 0: first channel half of window j-1; 1: second half of window j
            row = r % M
            jj = j - 1 + half
        else:
            half = r * 0
            row = r
            jj = j + half
        i = jj * M + row  # index in [state tokens of window w0 | new tokens]; < 0: previous window
        from_prev = jj < 0
        in_state = from_prev | (i < have)
        # window -1 does not exist: its candidates get zero weight
        ok = (r < KM) & (w0 + jj >= 0)
        srow = tl.where(from_prev, row, CUR + i).to(tl.int64)
        trow = (off + i - have).to(tl.int64)
        cols = (half * c)[:, None] + ch[None, :]
        smask = (ok & in_state)[:, None] & cmask[None, :]
        tmask = (ok & (i >= have) & (jj >= 0))[:, None] & cmask[None, :]
        x_s = tl.load(skv_ptr + slot * s_skv_s + srow[:, None] * s_skv_r + cols * s_skv_c, mask=smask, other=0.0)
        x_t = tl.load(kv_ptr + trow[:, None] * s_kvt + cols * s_kvc, mask=tmask, other=0.0)
        z_s = tl.load(sz_ptr + slot * s_sz_s + srow[:, None] * s_sz_r + cols * s_sz_c, mask=smask, other=0.0)
        z_t = (tl.load(z_ptr + trow[:, None] * s_zt + cols * s_zc, mask=tmask, other=0.0).to(ACC)
               + tl.load(ape_ptr + row[:, None] * s_ar + cols * s_ac, mask=tmask, other=0.0).to(ACC))
        x = tl.where(smask, x_s.to(ACC), x_t.to(ACC))
        z = tl.where(smask, z_s.to(ACC), tl.where(tmask, z_t, float("-inf")))
        run_max, run_sum, acc = _softmax_pool_step(run_max, run_sum, acc, x, z)
    tl.store(pooled_ptr + e.to(tl.int64) * c + ch, acc / run_sum, mask=cmask)


@triton.jit
def _block_fake_quant(x, NB: tl.constexpr, BLK: tl.constexpr, valid, QMAX: tl.constexpr,
                      FLOOR: tl.constexpr, EMIN: tl.constexpr, MBITS: tl.constexpr):
    """Fake quant of float32 x [NB * BLK] in blocks of BLK: s = 2**ceil(log2(max(amax, FLOOR) / QMAX)),
    q = round(clamp(x / s, +-QMAX)) * s; elements where `valid` is False pass through."""
    xb = tl.reshape(x, [NB, BLK])
    vb = tl.reshape(valid, [NB, BLK])
    amax = tl.max(tl.where(vb, tl.abs(xb), 0.0), axis=1)
    k = ceil_log2(tl.div_rn(tl.maximum(amax, FLOOR), QMAX))
    v = tl.minimum(tl.maximum(xb * exp2i(-k)[:, None], -QMAX), QMAX)
    q = round_fp(v, EMIN, MBITS) * exp2i(k)[:, None]
    return tl.reshape(tl.where(vb, q, xb), [NB * BLK])


@triton.jit
def _finish_row(x, cols, cm, w, c, R, NOPE, eps, hscale, nw_ptr, inv_ptr,
                M: tl.constexpr, QUANT: tl.constexpr, BLOCK_C: tl.constexpr, LOG2C: tl.constexpr,
                OUT: tl.constexpr, FACC: tl.constexpr, IS64: tl.constexpr,
                LIBDEVICE: tl.constexpr, RNE_BF16: tl.constexpr):
    """One pooled entry row [BLOCK_C] (accumulator dtype) of window w -> the pool row (dtype OUT):
    cast to the pool dtype, RMSNorm, RoPE at position w * M, exact-mode fake quant."""
    # RMSNorm of the entry cast to the pool dtype (as the reference: rms_norm(pooled.to(out_dtype)))
    x = cast_rne(x, OUT, RNE_BF16).to(FACC)
    if IS64:
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / c + eps)
    else:
        r = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(x * x, axis=0), c.to(tl.float32)) + eps))
    y = cast_rne(tl.load(nw_ptr + cols, mask=cm, other=0.0).to(FACC) * (x * r), OUT, RNE_BF16).to(FACC)

    # interleaved RoPE of the last R dims at the window's first position w * m
    ev, od = tl.split(tl.reshape(y, [BLOCK_C // 2, 2]))
    pr = tl.arange(0, BLOCK_C // 2)
    fi = pr - (c - R) // 2
    rm = (fi >= 0) & (pr < c // 2)
    ang = (w * M).to(FACC) * tl.load(inv_ptr + fi, mask=rm, other=0.0).to(FACC)
    if LIBDEVICE:  # full-range accurate cos/sin on the GPU (positions reach 1e6)
        cs = libdevice.cos(ang)
        sn = libdevice.sin(ang)
    else:
        cs = tl.cos(ang)
        sn = tl.sin(ang)
    ev2 = tl.where(rm, ev * cs - od * sn, ev)
    od2 = tl.where(rm, ev * sn + od * cs, od)
    y = cast_rne(tl.reshape(tl.join(ev2, od2), [BLOCK_C]), OUT, RNE_BF16)

    if QUANT == 1:  # FP8 e4m3 fake quant of the nope dims, one power-of-two scale per 64
        nope = cols < NOPE  # the rope dims keep their value (and, in fp64 runs, their precision)
        q8 = _block_fake_quant(y.to(tl.float32), BLOCK_C // 64, 64, nope, 448.0, 1e-4, -6, 3)
        y = tl.where(nope, q8.to(OUT), y)  # e4m3 values times 2^k are exact in the pool dtype
    elif QUANT == 2:  # Hadamard (Sylvester order, scale c^-1/2) + FP4 e2m1 fake quant per 32
        h = y.to(tl.float32)
        for st in tl.static_range(LOG2C):
            # stage width 1 << st, written inline: Triton 3.6 refuses a constexpr local assigned
            # once per unrolled iteration ("constexpr cannot be reassigned")
            a, bb = tl.split(tl.permute(tl.reshape(h, [BLOCK_C // (2 << st), 2, 1 << st]), (0, 2, 1)))
            h = tl.reshape(tl.permute(tl.join(a + bb, a - bb), (0, 2, 1)), [BLOCK_C])
        h = cast_rne(h * hscale, OUT, RNE_BF16).to(tl.float32)
        y = _block_fake_quant(h, BLOCK_C // 32, 32, cols < c, 6.0, 6.0 * 2.0**-126, 0, 1).to(OUT)
    return y


@triton.jit
def _compress_finish_kernel(pooled_ptr, out_ptr, pool_ptr, bt_ptr, ent_ptr, seq_ptr, nw_ptr, inv_ptr,
                            c, R, NOPE, bs, eps, hscale, s_pb, s_pr, s_pc, s_bt,
                            M: tl.constexpr, QUANT: tl.constexpr, BLOCK_C: tl.constexpr, LOG2C: tl.constexpr,
                            OUT: tl.constexpr, FACC: tl.constexpr, IS64: tl.constexpr,
                            LIBDEVICE: tl.constexpr, RNE_BF16: tl.constexpr):
    e = tl.program_id(0)
    b = tl.load(ent_ptr + e)
    slot = tl.load(seq_ptr + b * 5 + 0)
    w = tl.load(seq_ptr + b * 5 + 1) + e - tl.load(seq_ptr + b * 5 + 4)  # global window index
    cols = tl.arange(0, BLOCK_C)
    cm = cols < c
    x = tl.load(pooled_ptr + e.to(tl.int64) * c + cols, mask=cm, other=0.0)
    y = _finish_row(x, cols, cm, w, c, R, NOPE, eps, hscale, nw_ptr, inv_ptr,
                    M, QUANT, BLOCK_C, LOG2C, OUT, FACC, IS64, LIBDEVICE, RNE_BF16)
    blk = tl.load(bt_ptr + slot * s_bt + w // bs).to(tl.int64)
    dst = pool_ptr + blk * s_pb + (w % bs).to(tl.int64) * s_pr + cols * s_pc
    tl.store(dst, y, mask=cm)
    tl.store(out_ptr + e.to(tl.int64) * c + cols, y, mask=cm)


@triton.jit
def _compress_decode_kernel(kv_ptr, z_ptr, ape_ptr, skv_ptr, sz_ptr, slot_ptr, pos_ptr,
                            out_ptr, pool_ptr, bt_ptr, nw_ptr, inv_ptr,
                            c, R, NOPE, bs, eps, hscale,
                            s_kvt, s_kvc, s_zt, s_zc, s_ar, s_ac,
                            s_skv_s, s_skv_r, s_skv_c, s_sz_s, s_sz_r, s_sz_c, s_pb, s_pr, s_pc, s_bt,
                            M: tl.constexpr, OVERLAP: tl.constexpr, BLOCK_R: tl.constexpr,
                            QUANT: tl.constexpr, BLOCK_C: tl.constexpr, LOG2C: tl.constexpr,
                            OUT: tl.constexpr, ACC: tl.constexpr, FACC: tl.constexpr, IS64: tl.constexpr,
                            LIBDEVICE: tl.constexpr, RNE_BF16: tl.constexpr):
    """One decode token of sequence row b: fold it into the state and, when it closes its window,
    pool + finish the entry into the pool. Everything is decided on the device from (slot, position)."""
    b = tl.program_id(0)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    pos = tl.load(pos_ptr + b)
    have = pos % M  # tokens of this window already in the state (rows CUR + [0, have))
    w = pos // M
    close = have == M - 1
    CUR: tl.constexpr = M if OVERLAP else 0
    KH: tl.constexpr = 2 if OVERLAP else 1
    cols = tl.arange(0, BLOCK_C)
    cm = cols < c
    srow_kv = skv_ptr + slot * s_skv_s
    srow_z = sz_ptr + slot * s_sz_s

    # this token's kv and score (+ ape at its row in the window), per channel half
    tok_kv0 = tl.load(kv_ptr + b * s_kvt + cols * s_kvc, mask=cm, other=0.0).to(ACC)
    tok_z0 = (tl.load(z_ptr + b * s_zt + cols * s_zc, mask=cm, other=0.0).to(ACC)
              + tl.load(ape_ptr + have * s_ar + cols * s_ac, mask=cm, other=0.0).to(ACC))
    if OVERLAP:
        tok_kv1 = tl.load(kv_ptr + b * s_kvt + (c + cols) * s_kvc, mask=cm, other=0.0).to(ACC)
        tok_z1 = (tl.load(z_ptr + b * s_zt + (c + cols) * s_zc, mask=cm, other=0.0).to(ACC)
                  + tl.load(ape_ptr + have * s_ar + (c + cols) * s_ac, mask=cm, other=0.0).to(ACC))
    else:
        tok_kv1 = tok_kv0
        tok_z1 = tok_z0

    if close:
        # Entry w pools, per channel, the candidate rows r of [previous window, first half | this
        # window, second half] (overlap) or of this window: state rows, and this token as the last.
        run_max = tl.full([BLOCK_C], float("-inf"), ACC)
        run_sum = tl.zeros([BLOCK_C], ACC)
        acc = tl.zeros([BLOCK_C], ACC)
        for r0 in range(0, KH * M, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            in_cur = r >= CUR  # rows of this window (the rest: the previous window, overlap only)
            row = tl.where(in_cur, r - CUR, r)
            half = tl.where(in_cur, KH - 1, 0)
            # window -1 does not exist: the previous window's candidates get zero weight at w == 0
            ok = (r < KH * M) & (
                in_cur | ((r * 0 + w) > 0)
            )  # (a vector: the interpreter widens scalar | vector to int)
            from_state = ok & ((r < CUR) | (row != M - 1))
            st_row = tl.where(in_cur, CUR + row, row).to(tl.int64)
            ch = (half * c)[:, None] + cols[None, :]
            smask = from_state[:, None] & cm[None, :]
            x = tl.load(srow_kv + st_row[:, None] * s_skv_r + ch * s_skv_c, mask=smask, other=0.0).to(ACC)
            z = tl.load(srow_z + st_row[:, None] * s_sz_r + ch * s_sz_c, mask=smask, other=0.0).to(ACC)
            is_tok = (ok & in_cur & (row == M - 1))[:, None]
            x = tl.where(is_tok, tok_kv1[None, :], x)
            z = tl.where(is_tok, tok_z1[None, :], tl.where(smask, z, float("-inf")))
            run_max, run_sum, acc = _softmax_pool_step(run_max, run_sum, acc, x, z)
        y = _finish_row(acc / run_sum, cols, cm, w, c, R, NOPE, eps, hscale, nw_ptr, inv_ptr,
                        M, QUANT, BLOCK_C, LOG2C, OUT, FACC, IS64, LIBDEVICE, RNE_BF16)
        blk = tl.load(bt_ptr + slot * s_bt + w // bs).to(tl.int64)
        tl.store(pool_ptr + blk * s_pb + (w % bs).to(tl.int64) * s_pr + cols * s_pc, y, mask=cm)
        tl.store(out_ptr + b.to(tl.int64) * c + cols, y, mask=cm)
        if OVERLAP:
            # this (now complete) window becomes the previous one, rows [0, M): rows of the state
            # that the pooling above also read, so every thread must be done reading first
            tl.debug_barrier()
            for r0 in range(0, M, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                for hh in tl.static_range(2):
                    ch = hh * c + cols
                    m2 = ((r < M - 1)[:, None]) & cm[None, :]
                    src_kv = tl.load(srow_kv + (CUR + r).to(tl.int64)[:, None] * s_skv_r + ch[None, :] * s_skv_c,
                                     mask=m2, other=0.0)
                    src_z = tl.load(srow_z + (CUR + r).to(tl.int64)[:, None] * s_sz_r + ch[None, :] * s_sz_c,
                                    mask=m2, other=0.0)
                    last = (r == M - 1)[:, None]
                    if hh == 0:
                        src_kv = tl.where(last, tok_kv0[None, :].to(src_kv.dtype), src_kv)
                        src_z = tl.where(last, tok_z0[None, :].to(src_z.dtype), src_z)
                    else:
                        src_kv = tl.where(last, tok_kv1[None, :].to(src_kv.dtype), src_kv)
                        src_z = tl.where(last, tok_z1[None, :].to(src_z.dtype), src_z)
                    dmask = (r < M)[:, None] & cm[None, :]
                    tl.store(srow_kv + r.to(tl.int64)[:, None] * s_skv_r + ch[None, :] * s_skv_c, src_kv, mask=dmask)
                    tl.store(srow_z + r.to(tl.int64)[:, None] * s_sz_r + ch[None, :] * s_sz_c, src_z, mask=dmask)
    else:
        # the window stays open: the token joins the state at row CUR + have (both halves)
        dst = (CUR + have).to(tl.int64)
        tl.store(srow_kv + dst * s_skv_r + cols * s_skv_c, tok_kv0, mask=cm)
        tl.store(srow_z + dst * s_sz_r + cols * s_sz_c, tok_z0, mask=cm)
        if OVERLAP:
            tl.store(srow_kv + dst * s_skv_r + (c + cols) * s_skv_c, tok_kv1, mask=cm)
            tl.store(srow_z + dst * s_sz_r + (c + cols) * s_sz_c, tok_z1, mask=cm)
        tl.store(out_ptr + b.to(tl.int64) * c + cols, tl.zeros([BLOCK_C], OUT), mask=cm)


# ---------------------------------------------------------------------------------------- wrapper
def compress(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, spec, norm_weight: torch.Tensor,
             inv_freq: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
             pool: torch.Tensor, block_table: torch.Tensor, seqs) -> torch.Tensor:
    """Same contract as `ReferenceOps.compress` (see its docstring): updates state and pool in place,
    returns the emitted entries [E, c] in batch order ([B, c] for a `DecodeRows` layout)."""
    if isinstance(seqs, DecodeRows):
        return compress_decode(kv, score, ape, spec, norm_weight, inv_freq, state_kv, state_score, pool,
                               block_table, seqs)
    m, c = spec.ratio, spec.dim
    quant = _QUANT.get(spec.quant)
    if quant is None:
        raise ValueError(f"compress: unknown quant mode {spec.quant!r}")
    plan = _plan_host(seqs, m, bool(spec.overlap))
    E = plan["E"]
    if not (E or plan["t_slot"] or plan["s_slot"]):
        return pool.new_zeros((0, c))
    seq_d, (t_slot_d, t_row_d, t_src_d, t_ape_d), (s_slot_d, s_row_d, s_src_d), ent_d = _upload_plan(plan, kv.device)

    if E:
        out = _emit(kv, score, ape, spec, quant, norm_weight, inv_freq, state_kv, state_score, pool,
                    block_table, seq_d, ent_d, E)
    else:
        out = pool.new_zeros((0, c))

    # ---- state update (after the pool kernel has read the state)
    ns, nt = len(plan["s_slot"]), len(plan["t_slot"])
    if ns:
        keep_kv, keep_z = state_kv[s_slot_d, s_src_d], state_score[s_slot_d, s_src_d]
    if nt:
        state_kv[t_slot_d, t_row_d] = kv[t_src_d].to(state_kv.dtype)
        state_score[t_slot_d, t_row_d] = (score[t_src_d] + ape[t_ape_d].to(score.dtype)).to(state_score.dtype)
    if ns:
        state_kv[s_slot_d, s_row_d] = keep_kv
        state_score[s_slot_d, s_row_d] = keep_z
    return out


def _plan_host(seqs, m: int, overlap: bool) -> dict:
    """Host bookkeeping on the Python ints of `seqs`: the emitting sequences' table, their window
    counts, and the state rows written from new tokens (t_*) and from state rows (s_*)."""
    cur = m if overlap else 0
    seq_tab: list[int] = []  # per emitting sequence: slot, w0, have, off, first entry
    counts: list[int] = []
    t_slot: list[int] = []  # state rows written from new tokens: (slot, row) <- token, ape row
    t_row: list[int] = []
    t_src: list[int] = []
    t_ape: list[int] = []
    s_slot: list[int] = []  # state rows written from state rows (same slot)
    s_row: list[int] = []
    s_src: list[int] = []
    E = 0
    for slot, start, n, off in seqs:
        slot, start, n, off = int(slot), int(start), int(n), int(off)
        if n == 0:
            continue
        w0, have = divmod(start, m)
        total = have + n
        nwin = total // m
        if nwin:
            seq_tab += [slot, w0, have, off, E]
            counts.append(nwin)
            E += nwin
            if overlap:  # the last complete window becomes the previous window, rows [0, m)
                base = (nwin - 1) * m
                if have > base:  # its head came from the state (only when nwin == 1)
                    s_slot += [slot] * (have - base)
                    s_row.extend(range(0, have - base))
                    s_src.extend(range(cur + base, cur + have))
                lo = max(base, have)
                t_slot += [slot] * (base + m - lo)
                t_row.extend(range(lo - base, m))
                t_src.extend(range(off + lo - have, off + base + m - have))
                t_ape.extend(range(lo - base, m))
        lo = max(nwin * m, have)  # leftover tokens of the open window (state rows < have stay)
        t_slot += [slot] * (total - lo)
        t_row.extend(range(cur + lo - nwin * m, cur + total - nwin * m))
        t_src.extend(range(off + lo - have, off + n))
        t_ape.extend(range(lo - nwin * m, total - nwin * m))
    return dict(seq_tab=seq_tab, counts=counts, t_slot=t_slot, t_row=t_row, t_src=t_src, t_ape=t_ape,
                s_slot=s_slot, s_row=s_row, s_src=s_src, E=E)


def _upload_plan(plan: dict, dev: torch.device):
    """The plan's index lists in one host->device copy, cut back into (seq table, 4 token-row index
    vectors, 3 state-row index vectors, entry -> sequence map)."""
    seq_tab, t_slot, s_slot = plan["seq_tab"], plan["t_slot"], plan["s_slot"]
    nt, ns = len(t_slot), len(s_slot)
    host = [torch.tensor(seq_tab + t_slot + plan["t_row"] + plan["t_src"] + plan["t_ape"]
                         + s_slot + plan["s_row"] + plan["s_src"], dtype=torch.int64)]
    if plan["E"]:
        counts = plan["counts"]
        host.append(torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)))
    idx = torch.cat(host).to(dev, non_blocking=True) if dev.type != "cpu" else torch.cat(host)
    o = len(seq_tab)
    seq_d = idx[:o]
    t_d = tuple(idx[o + k * nt:o + (k + 1) * nt] for k in range(4))
    o += 4 * nt
    s_d = tuple(idx[o + k * ns:o + (k + 1) * ns] for k in range(3))
    ent_d = idx[o + 3 * ns:]
    return seq_d, t_d, s_d, ent_d


def _finish_consts(spec, quant, kv, pool, inv_freq) -> tuple[dict, int]:
    """Launch constants of `_finish_row` (and its scalar arguments) for this compressor and dtypes."""
    c = spec.dim
    R = 2 * inv_freq.numel()
    if R > c or (c - R) % 2:
        raise ValueError(f"compress: rope dims {R} must fit in c={c} with an even nope part")
    if kv.dtype not in _TL or pool.dtype not in _TL:
        raise TypeError(f"compress: unsupported dtypes kv {kv.dtype}, pool {pool.dtype}")
    BC = triton.next_power_of_2(c)
    if quant == 1:
        BC = max(BC, _FP8_BLOCK)
    elif quant == 2 and (BC != c or c < _FP4_BLOCK):
        raise ValueError(f"compress: fp4 mode needs a power-of-two dim >= {_FP4_BLOCK}, got {c}")
    interp = interpreting(_compress_finish_kernel)
    fa = acc_dtype(pool.dtype)
    scalars = dict(c=c, R=R, NOPE=c - spec.rope_dim, bs=pool.shape[1], eps=float(spec.eps), hscale=float(c) ** -0.5)
    consts = dict(M=spec.ratio, QUANT=quant, BLOCK_C=BC, LOG2C=BC.bit_length() - 1, OUT=_TL[pool.dtype],
                  FACC=_TL[fa], IS64=fa == torch.float64,
                  LIBDEVICE=(not interp) and kv.device.type == "cuda", RNE_BF16=interp and pool.dtype == torch.bfloat16)
    return {**scalars, **consts}, BC


def _emit(kv, score, ape, spec, quant, norm_weight, inv_freq, state_kv, state_score, pool, block_table,
          seq_d, ent_d, E):
    m, c = spec.ratio, spec.dim
    args, BC = _finish_consts(spec, quant, kv, pool, inv_freq)
    interp = interpreting(_compress_finish_kernel)
    a = acc_dtype(kv.dtype)
    KM = 2 * m if spec.overlap else m

    pooled = torch.empty(E, c, dtype=a, device=kv.device)
    BLOCK_C = triton.next_power_of_2(c) if interp else min(triton.next_power_of_2(c), 128)
    BLOCK_R = min(triton.next_power_of_2(KM), 32 if BLOCK_C <= 128 else 16)
    _compress_pool_kernel[(E, triton.cdiv(c, BLOCK_C))](
        kv, score, ape, state_kv, state_score, pooled, ent_d, seq_d,
        c, kv.stride(0), kv.stride(1), score.stride(0), score.stride(1), ape.stride(0), ape.stride(1),
        state_kv.stride(0), state_kv.stride(1), state_kv.stride(2),
        state_score.stride(0), state_score.stride(1), state_score.stride(2),
        M=m, KM=KM, CUR=m if spec.overlap else 0, OVERLAP=bool(spec.overlap), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        ACC=_TL[a], num_warps=4,
    )

    out = torch.empty(E, c, dtype=pool.dtype, device=kv.device)
    _compress_finish_kernel[(E,)](
        pooled, out, pool, block_table, ent_d, seq_d, norm_weight.contiguous(), inv_freq.contiguous(),
        s_pb=pool.stride(0), s_pr=pool.stride(1), s_pc=pool.stride(2), s_bt=block_table.stride(0),
        num_warps=4 if BC <= 512 else 8, **args,
    )
    return out


def compress_decode(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, spec, norm_weight: torch.Tensor,
                    inv_freq: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                    pool: torch.Tensor, block_table: torch.Tensor, rows) -> torch.Tensor:
    """`compress` for a `DecodeRows` layout (one token per row, slots and positions on the device):
    one launch of one program per row, no host bookkeeping, so a CUDA graph can capture it.

    Returns [B, c] in the pool dtype: row b is the entry row b closed, zeros where its window stays open.
    """
    quant = _QUANT.get(spec.quant)
    if quant is None:
        raise ValueError(f"compress: unknown quant mode {spec.quant!r}")
    B, c = kv.shape[0], spec.dim
    if rows.slots.shape[0] != B or rows.positions.shape[0] != B:
        raise ValueError(
            f"compress: {B} token rows but {rows.slots.shape[0]} slots / {rows.positions.shape[0]} positions"
        )
    out = torch.empty(B, c, dtype=pool.dtype, device=kv.device)
    if B == 0:
        return out
    args, BC = _finish_consts(spec, quant, kv, pool, inv_freq)
    a = acc_dtype(kv.dtype)
    KM = 2 * spec.ratio if spec.overlap else spec.ratio
    # the candidate tile is [BLOCK_R, BLOCK_C] twice (kv and score): bounded for register use
    BLOCK_R = max(1, min(triton.next_power_of_2(KM), 8192 // BC))
    _compress_decode_kernel[(B,)](
        kv, score, ape, state_kv, state_score, rows.slots, rows.positions,
        out, pool, block_table, norm_weight.contiguous(), inv_freq.contiguous(),
        s_kvt=kv.stride(0), s_kvc=kv.stride(1), s_zt=score.stride(0), s_zc=score.stride(1),
        s_ar=ape.stride(0), s_ac=ape.stride(1),
        s_skv_s=state_kv.stride(0), s_skv_r=state_kv.stride(1), s_skv_c=state_kv.stride(2),
        s_sz_s=state_score.stride(0), s_sz_r=state_score.stride(1), s_sz_c=state_score.stride(2),
        s_pb=pool.stride(0), s_pr=pool.stride(1), s_pc=pool.stride(2), s_bt=block_table.stride(0),
        OVERLAP=bool(spec.overlap), BLOCK_R=BLOCK_R, ACC=_TL[a], num_warps=4 if BC <= 256 else 8, **args,
    )
    return out
