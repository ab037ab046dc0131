"""KV compressor (CSA ratio 4 overlapping, HCA / plain ratio m) as one Triton-Ascend kernel.

Semantics: exactly `ReferenceOps.compress` (read its docstring; spec v4-architecture.md §2.6, §3.2).
Each call folds the packed new tokens of every sequence of `seqs` = [(slot, start_pos, n_new,
token_offset), ...] into that slot's compressor state and emits every entry whose window of m
tokens closed. Entry w of a sequence pools, per channel, softmax(score + ape) * kv over its
candidates: the m tokens of window w (plain), or the first channel half of window w-1 plus the
second channel half of window w (overlapping, 2m candidates; window -1 does not exist and weighs
0). The pooled row is cast to the pool dtype, RMS-normalised (weight `norm_weight`), cast again,
and its last R = 2 * len(inv_freq) dims get the interleaved RoPE at position w * m (the window's
first token); the result goes to pool row `block_table[slot, w // bs] * bs + w % bs` and to the
returned [E, c] tensor (entries in batch order). Candidates come from the state (what earlier
calls left: the open window's head at rows [cur, cur + have), cur = m if overlapping else 0; the
previous complete window at rows [0, m) when overlapping) or from the new tokens, whose score
gets ape[position mod m] added. Afterwards the state holds what the reference leaves:
overlapping -> rows [0, m) = the last complete window (all 2c channels), rows [m, m + left) = the
open window's tokens; plain -> rows [0, left); rows beyond stay as they were. This is what CANN's
`compressor` op does after the projections (ascend.md §1.5(c)), in plain mode only: A2/A3 have
no FP8, so the Ascend backend runs spec.quant == "none" (exact-mode FP8 / FP4 fake quant raises).

Metadata (host, like CANN's `compressor_metadata` op): one int32 row of PW = 9 fields per work
item, built from the Python ints of `seqs` only (no device sync) and cached per (seqs, m, overlap,
device), so the layers of one step that share a ratio reuse one plan tensor:

    [slot, w0, have, off, n_new, j_first, n_ent, e_first, upd]

w0 = start_pos // m is the sequence's first (open) window, have = start_pos - w0 * m the tokens of
it already in the state, off the sequence's first row in kv/score; the item pools the entries
j_first .. j_first + n_ent - 1 (global window w0 + j, output row e_first + j - j_first) and, when
upd = 1, then rewrites that slot's state rows. Two kinds of item:
- one "sequence item" per sequence with n_new > 0 (upd = 1): the entries that read the state
  (j = 0, and j = 1 when overlapping: window w0's head and the previous window live there), then
  the state update. Doing both in one program orders every state read before the state writes
  (program order on one core) without a second launch or a grid barrier: no other program
  touches that slot's state.
- "entry items" (upd = 0) for the remaining entries, which read only new tokens, in chunks of G
  consecutive entries (G sized for about 4 items per core, so a long prefill balances).

Grid: 1D, `launch.programs("vector", items)` programs (one per vector core, never more than the
items; no tl.dot, so vector cores), each walking items it, it + nprog, ... (the grid binds to
physical cores on Ascend: a GPU-style grid of one program per entry would be serialised). nprog is
a runtime argument so that a changing batch size does not recompile.

Tiling and the Unified Buffer. One entry row is held whole as a vector of BC = next_pow2(c)
channels (the RMSNorm needs all c). The candidate axis is walked in chunks of BR rows with an
online softmax (HCA: m = 128 rows x 512 x 4 B = 256 KiB per operand would not fit; CSA: 2m = 8
rows, one window half at a time), each chunk loading the rows held in the state and the rows
from the new tokens under complementary row masks. The state update walks its contiguous row
range in [BRS, BCS] tiles of the k * c state channels. The rope pairs are rotated after the norm
on contiguous [R] lane vectors read back from the just-written output row (each lane with its
pair partner, one lane to the right or left), so no [n, 2] view is ever formed. Live bytes per
iteration, checked against launch.UB_BUDGET (half the 192 KiB UB: double buffering) by the
wrapper:

    pooling  (8 * BR * BC + 10 * BC + 40 * BP) * 4     state update  7 * BRS * BCS * 4
    CSA main    m 4,   c 512, BR 2: 57 KiB              state (BRS 4, BCS 256): 28 KiB
    CSA indexer m 4,   c 128, BR 4: 28 KiB              (k * c = 1024 / 256 / 512 channels)
    HCA         m 128, c 512, BR 2: 57 KiB

Offline, `python -m backends.ascend.lowering --kernels compress` (bishengir-compile with
triton-ascend's A2/A3 flags, multi-buffering on) lowers all three through HIVM to the hivmc step
in 4 to 10 s each, BiShengIR's PlanMemory succeeding on its first attempt. What getting there
took (each measured in that pipeline, each now avoided in the kernel):
- a [c/2, 2] view of the row (reshape + split/join for the rope pairs): BiShengIR pads the
  2-wide axis to 32 bytes and the 4x padding spread through all of the pooling;
- stride-2 (even / odd) accesses of a bf16 row: padded the same way; and with a runtime channel
  mask they crash triton-adapter's interleave lowering;
- a channel offset h * c with a loop-variable h (a loop over the two halves): its 32-byte
  alignment is lost and every tile's channel axis is padded 8x, so the halves are unrolled;
- a two-sided row mask (r >= a) & (r < b) in a loop that appears twice: triton-adapter crashes;
  masks here are one-sided, and an absent window is a zero trip count;
- separate loops per source and half (4 copies for CSA): BiShengIR gives every loop its own
  buffers, and with multi-buffering on its memory planning ran past the tool's 600 s limit.

Every load/store is a contiguous row slice (tail axis = channels) with one-sided masks of the
form `range + scalar </>= scalar` (TritonToStructured's mask analysis); offsets that can exceed
2^31 (pool rows, token rows) are formed in int64 scalars before the int32 column range is added.

RoPE angles: ang = float(w * m) * inv_freq in fp32, as the reference; before tl.cos / tl.sin the
angle is reduced mod 2*pi with a Cody-Waite split whose products are exact in fp32 without FMA
(A2/A3 vector units have none), so the result does not depend on how the hardware's cos/sin
handle arguments up to 2^20 (positions reach 1M).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...triton_common import interpreting, round_to
from . import launch
from .launch import LoweringCase

PW = 9  # int32 fields per plan row (see the module docstring)
_POOL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# 2*pi = P1 + P2 + P3: P1 has 15 significant bits and P2 12, so n_hi * P and n_lo * P are exact
# in fp32 for n_hi, n_lo of 9 bits each (n < 2^18 covers angles up to 1.6e6 rad).
_P1: tl.constexpr = tl.constexpr(6.282958984375)
_P2: tl.constexpr = tl.constexpr(0.0002263188362121582)
_P3: tl.constexpr = tl.constexpr(3.968374073792802e-09)
_INV_2PI: tl.constexpr = tl.constexpr(0.15915493667125702)


# ---------------------------------------------------------------------------------------- kernel
@triton.jit
def _softmax_pool_step(kv_ptr, z_ptr, ape_ptr, skv_ptr, sz_ptr, s_kv, s_z, s_ape, s_srow, st, jw, w0, have, off,
                 col0, cols, cmask, mx, sm, acc, M: tl.constexpr, CUR: tl.constexpr, BR: tl.constexpr):
    """Fold the m rows of window jw (relative to w0; -1 = the previous, complete window), channel
    half starting at col0, into the per-channel online softmax (running max, sum of exp,
    exp-weighted sum of kv).

    The window's rows [0, ns) sit in the state -- the previous window at rows [0, m), or the
    head of window w0 at rows [CUR, CUR + have) -- and rows [ns, m) are new tokens, whose score
    gets ape[row] added. One loop loads both sources under complementary one-sided row masks
    (BiShengIR gives every copy of a loop its own buffers; a two-sided row mask crashed
    triton-adapter once the loop appeared twice). Before the first window there is no previous
    window: zero rows."""
    prev = jw < 0
    ns = tl.where(prev, M, tl.minimum(tl.maximum(have - jw * M, 0), M))
    nrow = tl.where(w0 + jw >= 0, M, 0)
    srow = tl.where(prev, 0, CUR + jw * M)
    s_kv_b = skv_ptr + (st + srow * s_srow + col0)
    s_z_b = sz_ptr + (st + srow * s_srow + col0)
    t_row = (off + jw * M - have).to(tl.int64)
    t_kv_b = kv_ptr + (t_row * s_kv + col0)
    t_z_b = z_ptr + (t_row * s_z + col0)
    a_b = ape_ptr + col0
    for r0 in range(0, nrow, BR):
        r = r0 + tl.arange(0, BR)
        ms = (r < ns)[:, None] & cmask[None, :]
        mt = (r >= ns)[:, None] & cmask[None, :]
        x = tl.where(ms, tl.load(s_kv_b + (r[:, None] * s_srow + cols[None, :]), mask=ms, other=0.0),
                     tl.load(t_kv_b + (r[:, None] * s_kv + cols[None, :]), mask=mt, other=0.0))
        zt = (tl.load(t_z_b + (r[:, None] * s_z + cols[None, :]), mask=mt, other=0.0)
              + tl.load(a_b + (r[:, None] * s_ape + cols[None, :]), mask=mt, other=0.0))
        z = tl.where(ms, tl.load(s_z_b + (r[:, None] * s_srow + cols[None, :]), mask=ms, other=0.0),
                     tl.where(mt, zt, float("-inf")))
        new = tl.maximum(mx, tl.max(z, axis=0))
        # channels that have seen only -inf (padding, or no rows yet) stay at 0 instead of NaN
        safe = tl.where(new == float("-inf"), 0.0, new)
        alpha = tl.exp(mx - safe)
        p = tl.exp(z - safe[None, :])
        acc = acc * alpha + tl.sum(p * x, axis=0)
        sm = sm * alpha + tl.sum(p, axis=0)
        mx = new
    return mx, sm, acc


@triton.jit
def _compress_kernel(kv_ptr, z_ptr, ape_ptr, skv_ptr, sz_ptr, pool_ptr, out_ptr, bt_ptr, nw_ptr, inv_ptr,
                     plan_ptr, n_items, nprog, c, bs, s_kv, s_z, s_ape, s_slot, s_srow, s_pblk, s_prow,
                     s_bt, eps,
                     M: tl.constexpr, OVERLAP: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
                     BR: tl.constexpr, BRS: tl.constexpr, BCS: tl.constexpr, PW: tl.constexpr,
                     RNE_BF16: tl.constexpr):
    OUT_TY: tl.constexpr = pool_ptr.dtype.element_ty
    CUR: tl.constexpr = M if OVERLAP else 0  # first state row of the open window
    NH: tl.constexpr = 2 if OVERLAP else 1  # windows (channel halves) an entry pools
    pid = tl.program_id(0)
    cols = tl.arange(0, BC)
    cmask = cols < c
    wgt = tl.load(nw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    # rope lanes: the last R = 2 * BP channels; inv2 = inv_freq repeated per pair (host side),
    # so that every lane has its own angle and the rope works on contiguous [R] vectors
    rr = tl.arange(0, 2 * BP)
    nope = c - 2 * BP
    inv = tl.load(inv_ptr + rr)
    even = (rr % 2) == 0
    kc = c * NH

    for it in range(pid, n_items, nprog):
        row = plan_ptr + it * PW
        slot = tl.load(row + 0)
        w0 = tl.load(row + 1)
        have = tl.load(row + 2)
        off = tl.load(row + 3)
        n_new = tl.load(row + 4)
        j_first = tl.load(row + 5)
        n_ent = tl.load(row + 6)
        e_first = tl.load(row + 7)
        upd = tl.load(row + 8)
        st = slot * s_slot

        # ---- pool, normalise, rotate, store each entry of the item
        for jj in range(0, n_ent):
            j = j_first + jj
            mx = tl.full([BC], float("-inf"), tl.float32)
            sm = tl.zeros([BC], tl.float32)
            acc = tl.zeros([BC], tl.float32)
            # overlapping: half 0 = first channel half of window j - 1, half 1 = second half of
            # window j; plain: window j. Unrolled: a channel offset h * c with a loop-variable h
            # lost its 32-byte alignment and BiShengIR then padded every tile's channel axis 8x.
            for h in tl.static_range(NH):
                mx, sm, acc = _softmax_pool_step(kv_ptr, z_ptr, ape_ptr, skv_ptr, sz_ptr, s_kv, s_z, s_ape, s_srow, st,
                                           j - (NH - 1) + h, w0, have, off, h * c, cols, cmask, mx, sm, acc,
                                           M, CUR, BR)
            x = round_to(tl.where(cmask, acc / tl.where(cmask, sm, 1.0), 0.0), OUT_TY, RNE_BF16)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / c + eps)
            y = round_to(wgt * (x * rstd), OUT_TY, RNE_BF16).to(OUT_TY)

            # The normalised row goes to the output row, and its rope lanes are read back from
            # there with their pair partners (the lanes one to the right for even lanes, one to
            # the left for odd ones: two shifted contiguous reads), rotated and written over.
            # Pairing them in registers would need a [c/2, 2] view, whose 2-wide axis BiShengIR
            # pads to 32 bytes (4x) through all of the pooling; stride-2 reads of a bf16 row came
            # out padded as well. BiShengIR orders the read-back after the store (an MTE3 -> MTE2
            # flag on the same global buffer, checked in its HIVM output).
            w = w0 + j
            orow = out_ptr + (e_first + jj).to(tl.int64) * c
            tl.store(orow + cols, y, mask=cmask)
            rrow = orow + nope
            yc = tl.load(rrow + rr).to(tl.float32)
            nxt = tl.load((rrow + 1) + rr, mask=rr < 2 * BP - 1, other=0.0).to(tl.float32)
            prv = tl.load((rrow - 1) + rr, mask=rr >= 1, other=0.0).to(tl.float32)
            # even lane: y*cos - next*sin; odd lane: y*cos + prev*sin (the reference's products,
            # summed in the other order, which is exact)
            partner = tl.where(even, -nxt, prv)
            # interleaved RoPE at the window's first position, the angle reduced mod 2*pi first
            ang = (w * M).to(tl.float32) * inv
            n = (ang * _INV_2PI + 0.5).to(tl.int32)  # ang >= 0: truncation is floor
            n_hi = (n >> 9) << 9
            fh = n_hi.to(tl.float32)
            fl = (n - n_hi).to(tl.float32)
            red = ((((ang - fh * _P1) - fl * _P1) - fh * _P2) - fl * _P2) - n.to(tl.float32) * _P3
            rot = round_to(yc * tl.cos(red) + partner * tl.sin(red), OUT_TY, RNE_BF16).to(OUT_TY)
            tl.store(rrow + rr, rot)

            blk = tl.load(bt_ptr + slot * s_bt + w // bs).to(tl.int64)
            prow = pool_ptr + (blk * s_pblk + (w % bs) * s_prow)
            tl.store(prow + cols, y, mask=cols < nope)
            tl.store((prow + nope) + rr, rot)

        # ---- state update (sequence items only), after this program's reads of the same rows.
        # Written rows are one contiguous range; state row r holds the token at stream index
        # i = r + nwin*m - CUR (overlapping: rows [0, m) = the last complete window, when one
        # closed; then the open window's tokens). Its source is state row CUR + i while i < have
        # (only for the last complete window's head when nwin == 1), else new token i - have.
        total = have + n_new
        nwin = total // M
        if OVERLAP:
            first = tl.where(nwin > 0, (nwin - 1) * M, have)
        else:
            first = tl.maximum(nwin * M, have)
        r_lo = first - nwin * M + CUR
        r_hi = tl.where(upd != 0, total - nwin * M + CUR, r_lo)
        s_end = have - nwin * M + CUR  # rows below it come from the state
        t_base = (off - have + nwin * M - CUR).to(tl.int64)
        # BRS divides m and r_lo is 0 or >= m: a chunk never straddles the two windows, so its
        # ape rows are contiguous. The chunk order also orders the state reads (rows >= m,
        # copied to rows < m) before the writes of rows >= m.
        for r0 in range(r_lo, r_hi, BRS):
            r = r0 + tl.arange(0, BRS)
            from_s = (r < s_end) & (r < r_hi)
            from_t = (r >= s_end) & (r < r_hi)
            a_row = r - (r0 // M) * M
            for c0 in range(0, kc, BCS):
                ch = c0 + tl.arange(0, BCS)
                cm = (ch < kc)[None, :]
                ms = from_s[:, None] & cm
                mt = from_t[:, None] & cm
                so = (r[:, None] + nwin * M) * s_srow + ch[None, :]
                x = tl.where(ms, tl.load(skv_ptr + st + so, mask=ms, other=0.0),
                             tl.load(kv_ptr + (t_base * s_kv + (r[:, None] * s_kv + ch[None, :])), mask=mt, other=0.0))
                zt = (tl.load(z_ptr + (t_base * s_z + (r[:, None] * s_z + ch[None, :])), mask=mt, other=0.0)
                      + tl.load(ape_ptr + (a_row[:, None] * s_ape + ch[None, :]), mask=mt, other=0.0))
                z = tl.where(ms, tl.load(sz_ptr + st + so, mask=ms, other=0.0), zt)
                do = r[:, None] * s_srow + ch[None, :]
                tl.store(skv_ptr + st + do, x, mask=ms | mt)
                tl.store(sz_ptr + st + do, z, mask=ms | mt)


# ---------------------------------------------------------------------------------------- host side
_PLANS: dict = {}
_PLAN_CACHE = 16


def _plan(seqs, m: int, overlap: bool, device):
    """(plan int32 [items, PW] on device, items, E) for `seqs`; cached, the layers of a step share it."""
    key = (tuple(tuple(int(v) for v in s) for s in seqs), m, overlap, str(device), launch.cores("vector", device))
    hit = _PLANS.get(key)
    if hit is not None:
        return hit
    rows, rest = [], []
    E = 0
    for slot, start, n, off in key[0]:
        if n == 0:
            continue
        w0, have = divmod(start, m)
        nwin = (have + n) // m
        j_state = min(nwin, 2 if overlap else 1)  # entries that read the state
        rows.append([slot, w0, have, off, n, 0, j_state, E, 1])
        if nwin > j_state:
            rest.append((slot, w0, have, off, n, j_state, nwin, E))
        E += nwin
    n_rest = sum(r[6] - r[5] for r in rest)
    if n_rest:
        g = max(1, -(-n_rest // (4 * launch.cores("vector", device))))
        for slot, w0, have, off, n, j0, nwin, e0 in rest:
            for j in range(j0, nwin, g):
                rows.append([slot, w0, have, off, n, j, min(g, nwin - j), e0 + j, 0])
    plan = torch.tensor(rows, dtype=torch.int32).reshape(-1, PW).to(device)
    hit = (plan, len(rows), E)
    if len(_PLANS) >= _PLAN_CACHE:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = hit
    return hit


_INV2: dict = {}


def _pair_freqs(inv_freq: torch.Tensor) -> torch.Tensor:
    """inv_freq (fp32) repeated for both lanes of each rope pair; cached per tensor and version."""
    key = (inv_freq.data_ptr(), inv_freq._version, inv_freq.numel(), str(inv_freq.device))
    hit = _INV2.get(key)
    if hit is None:
        if len(_INV2) >= 8:
            _INV2.pop(next(iter(_INV2)))
        # keep the source alive with the entry so its address cannot be reused while cached
        hit = _INV2[key] = (inv_freq, inv_freq.to(torch.float32).repeat_interleave(2).contiguous())
    return hit[1]


def _tiles(m: int, c: int, R: int, overlap: bool):
    """(BC, BP, BR, BRS, BCS, live UB bytes) for entry width c with R rope dims (module docstring)."""
    BC = triton.next_power_of_2(c)
    BP = R // 2
    # candidate rows per chunk: they divide m, so a chunk never straddles two windows; 2 for
    # 512-wide rows, 4 for narrower ones
    BR = min(m & -m, 4, max(1, 1024 // BC))
    BRS = min(m & -m, 4)
    kc = c * (2 if overlap else 1)
    BCS = min(triton.next_power_of_2(kc), 256)
    # pooling, per chunk: kv and score from the state and from the tokens, ape, and three
    # temporaries (selected score, exp, product) of [BR, BC]; ten row vectors (running max, sum,
    # accumulator, rescale, pooled / normalised row, weight); ~20 rope-lane vectors (angle
    # reduction, cos, sin). State update, per chunk: five loaded and two selected [BRS, BCS] tiles.
    pool_bytes = (8 * BR * BC + 10 * BC + 20 * 2 * BP) * 4
    state_bytes = 7 * BRS * BCS * 4
    return BC, BP, BR, BRS, BCS, max(pool_bytes, state_bytes)


def _check_inputs(kv, score, ape, spec, norm_weight, inv_freq, state_kv, state_score, pool) -> None:
    """The dtypes, shapes and strides `compress` supports, in the order it reports them."""
    if spec.quant != "none":
        raise NotImplementedError(
            f"compress: quant mode {spec.quant!r} (exact-mode FP8 / Hadamard+FP4 fake quant) is not implemented "
            "on Ascend: A2/A3 have no FP8, and the Ascend backend runs the compressor in plain mode (quant 'none')")
    tensors = dict(kv=kv, score=score, ape=ape, norm_weight=norm_weight, inv_freq=inv_freq, state_kv=state_kv,
                   state_score=state_score, pool=pool)
    for name, t in tensors.items():
        if t.dtype == torch.float64:
            raise ValueError(f"compress: {name} is float64; Ascend kernels have no fp64 (run the Ascend backend in "
                             "float32 / bfloat16, the reference backend for fp64)")
    for name in ("kv", "score", "state_kv", "state_score"):
        if tensors[name].dtype != torch.float32:
            raise ValueError(f"compress: {name} must be float32 (the compressor accumulates in fp32), "
                             f"got {tensors[name].dtype}")
    if pool.dtype not in _POOL_DTYPES:
        raise ValueError(f"compress: pool dtype {pool.dtype} is not one of {_POOL_DTYPES}")
    m, c, overlap = int(spec.ratio), int(spec.dim), bool(spec.overlap)
    k = 2 if overlap else 1
    R = 2 * inv_freq.numel()
    if R > c or R < 2 or R & (R - 1):
        raise ValueError(f"compress: rope dims {R} must be a power of two (the rope lanes are one unmasked "
                         f"vector) and fit in c={c}")
    if kv.shape[-1] != k * c or score.shape != kv.shape or tuple(ape.shape) != (m, k * c):
        raise ValueError(f"compress: kv/score must be [T, {k * c}] and ape [{m}, {k * c}], got "
                         f"{tuple(kv.shape)}, {tuple(score.shape)}, {tuple(ape.shape)}")
    if (state_kv.shape != state_score.shape or state_kv.stride() != state_score.stride()
            or tuple(state_kv.shape[1:]) != (k * m, k * c) or state_kv.stride(-1) != 1):
        raise ValueError(f"compress: state_kv/state_score must be [slots, {k * m}, {k * c}] with equal strides "
                         "and contiguous rows")
    if pool.shape[-1] != c or pool.stride(-1) != 1:
        raise ValueError(f"compress: pool must be [blocks, block_size, {c}] with contiguous rows")


def compress(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, spec, norm_weight: torch.Tensor,
             inv_freq: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
             pool: torch.Tensor, block_table: torch.Tensor, seqs: list) -> torch.Tensor:
    """Same contract as `ReferenceOps.compress`: updates state and pool in place and returns the
    emitted entries [E, c] (pool dtype) in batch order. Plain mode only (spec.quant == "none")."""
    _check_inputs(kv, score, ape, spec, norm_weight, inv_freq, state_kv, state_score, pool)
    m, c, overlap = int(spec.ratio), int(spec.dim), bool(spec.overlap)
    R = 2 * inv_freq.numel()
    plan, n_items, E = _plan(seqs, m, overlap, kv.device)
    if n_items == 0:
        return pool.new_zeros((0, c))
    BC, BP, BR, BRS, BCS, ub = _tiles(m, c, R, overlap)
    launch.check_ub(f"compress (ratio {m}, c={c})", ub)

    kv, score = kv.contiguous(), score.contiguous()
    ape = ape.to(torch.float32).contiguous()
    norm_weight = norm_weight.contiguous()
    inv2 = _pair_freqs(inv_freq)
    if block_table.dtype != torch.int32:
        block_table = block_table.to(torch.int32)
    block_table = block_table.contiguous()
    out = torch.empty(max(E, 1), c, dtype=pool.dtype, device=pool.device)
    nprog = launch.programs("vector", n_items, kv.device)
    _compress_kernel[(nprog,)](
        kv, score, ape, state_kv, state_score, pool, out, block_table, norm_weight, inv2, plan,
        n_items, nprog, c, pool.shape[1], kv.stride(0), score.stride(0), ape.stride(0),
        state_kv.stride(0), state_kv.stride(1), pool.stride(0), pool.stride(1), block_table.stride(0),
        float(spec.eps),
        M=m, OVERLAP=overlap, BC=BC, BP=BP, BR=BR, BRS=BRS, BCS=BCS, PW=PW,
        RNE_BF16=interpreting(_compress_kernel) and pool.dtype == torch.bfloat16,
    )
    return out[:E]


# ---------------------------------------------------------------------------------------- lowering
def _case(name: str, m: int, c: int, overlap: bool, R: int = 64) -> LoweringCase:
    BC, BP, BR, BRS, BCS, _ = _tiles(m, c, R, overlap)
    sig = {n: "*fp32" for n in ("kv_ptr", "z_ptr", "ape_ptr", "skv_ptr", "sz_ptr")}
    sig.update(pool_ptr="*bf16", out_ptr="*bf16", bt_ptr="*i32", nw_ptr="*fp32", inv_ptr="*fp32", plan_ptr="*i32")
    sig.update({n: "i32" for n in ("n_items", "nprog", "c", "bs", "s_kv", "s_z", "s_ape", "s_slot", "s_srow",
                                   "s_pblk", "s_prow", "s_bt")})
    sig["eps"] = "fp32"
    return LoweringCase(name, _compress_kernel, sig,
                        dict(M=m, OVERLAP=overlap, BC=BC, BP=BP, BR=BR, BRS=BRS, BCS=BCS, PW=PW, RNE_BF16=False),
                        kind="vector")


# V4-Flash: CSA main compressor (ratio 4, overlapping, c = 512), the CSA indexer's compressor
# (ratio 4, overlapping, c = 128), HCA (ratio 128, c = 512); bf16 pools.
LOWERING_CASES = [
    _case("compress_csa_main", 4, 512, True),
    _case("compress_csa_indexer", 4, 128, True),
    _case("compress_hca", 128, 512, False),
]
