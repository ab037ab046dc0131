"""MoE gate as Triton-Ascend kernels (spec §2.9; reference: `ReferenceOps.moe_gate`).

Semantics (vllm-ascend: `moe_gating_top_k_hash`, norm_type 2 = sqrt-softplus):
    s       = sqrt(softplus(x W^T))                            [T, E], fp32
    ids     = tid2eid[token_ids]            (hash layers: table order kept)
            | top-k of s + bias over the E experts   (the bias steers selection only)
    weights = s[ids] / sum(s[ids]) * route_scale               [T, k] fp32; ids [T, k] int32.
Top-k is k rounds of arg-max over the E experts (V4-Flash E = 256, k = 6): each round takes the
largest s + bias still in play, ties going to the LOWEST expert index (torch.topk does not specify
its tie order; the tests use continuous random data, where ties do not occur), so the picks come
out in descending order of s + bias like torch.topk's sorted output. The arg-max is written as
max, then min of the matching indices (fp32 max and int32 min reductions only: no `tl.sort`, which
Ascend lacks for int32, and no reliance on `tl.argmax` tie rules). sqrt-softplus is the one shared
helper `triton_common.sqrt_softplus`, the CUDA gate's too: softplus as the reference (torch) defines
it, z above the threshold 20, else log1p(exp(z)), exp of at most 20 (no overflow), tl.exp / tl.log only.

Two kernels, split by the unit they run on:
1. `_gate_logits_kernel` (cube): logits = x W^T into an fp32 scratch [T, E]. Work item = (token
   block of BLOCK_T, expert block of BLOCK_E), flattened into the 1D persistent loop over
   `programs("cube", items)` AI cores; K (= D) walked in BLOCK_K sub-tiles, fp32 accumulation.
   Splitting the experts across programs is what lets decode (a handful of tokens) spread the
   read of W (V4-Flash: 256 x 4096 fp32 = 4 MiB) over the cores instead of one core reading it
   all; a fused single-pass kernel would need every expert of a token in one program. Operands:
   16-bit x 16-bit when x and W share a 16-bit dtype (exact products), otherwise both widened to
   fp32 (V4-Flash: bf16 x against the fp32 gate weight) with IEEE precision.
2. `_gate_select_kernel` (vector): a block of BLOCK_T tokens per work item, `programs("vector",
   token blocks)` vector cores. Top-k: the whole [BLOCK_T, EP] block of s + bias, k rounds of
   arg-max. Hash: ids from the table; only those k logits are gathered ([BLOCK_T, KP] tiles).
   No [BLOCK_T, 1] -> [BLOCK_T, KP] mask broadcast touches the top-k values: BiShengIR fuses such
   a mask into the whole [BLOCK_T, EP] loop body and pads each element to 32 bytes (a "ub
   overflow" of 600 KB at BLOCK_T 8), so the normalisation relies on unpicked columns staying 0
   and guards its 1D denominator instead.
Hash layers still compute all E logits in kernel 1 though only k are used (one launch shape for
every layer; V4-Flash routes by hash in only its first 3 layers).

Unified Buffer per iteration (V4-Flash: bf16 x, fp32 W, E = 256, D = 4096; counted as if the cube
operands were staged in UB too):
  logits  BLOCK_T 32 x BLOCK_E 64 x BLOCK_K 128: x 8 KiB bf16 + 16 KiB widened, W 32 KiB fp32,
          acc 8 KiB                                                   = 64 KiB (T <= 16: 48 KiB)
  select  BLOCK_T 8 x EP 256 (`_SEL_TILE` = 2048 elements): budgeted as 8 live 8 KiB tiles (z, s,
          s + bias, index / mask / select temporaries) + the [8, 8] pick tiles = 65 KiB
both within `launch.UB_BUDGET` (96 KiB, half the UB for double buffering); the wrappers check
the same sums for the actual shapes. The lowering check is consistent with that count: BiShengIR
accepts BLOCK_T 4..16 for the top-k select at E = 256 and overflows at 32 (~7.6 tiles of 32 KiB).
BLOCK_T of the logits kernel drops to 16 for T <= 16 (decode) so that no cube work is spent on
padding rows.

Interpreter (TRITON_INTERPRET=1, CPU): Triton 3.9's interpreter multiplies bf16 `tl.dot` operands
as raw uint16 bits, so there 16-bit operands are widened to fp32 first (bf16 x bf16 products are
exact in fp32: the same result as the cube's bf16 MMA with fp32 accumulation). Outputs are fp32 /
int32, so its truncating bf16 cast does not arise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...triton_common import gate_buffers, interpreting, pow2, sqrt_softplus
from .launch import LoweringCase, check_ub, programs

_BLOCK_E = 64
_BLOCK_K = 128
_SEL_TILE = 2048  # elements of the [BLOCK_T, EP] selection tile (8 KiB fp32)
_MIN_DOT = 16


@triton.jit
def _gate_logits_kernel(x_ptr, w_ptr, out_ptr, T, E, K,
                        LOWP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_eb = tl.cdiv(E, BLOCK_E)
    n_items = tl.cdiv(T, BLOCK_T) * n_eb
    t = tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    kk = tl.arange(0, BLOCK_K)
    for item in range(pid, n_items, nprog):
        tb = item // n_eb
        e0 = (item - tb * n_eb) * BLOCK_E
        row0 = tb * BLOCK_T
        t_ok = (row0 + t) < T
        e_ok = (e0 + e) < E
        x_blk = x_ptr + row0.to(tl.int64) * K
        w_blk = w_ptr + e0.to(tl.int64) * K
        acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            k_ok = k < K
            xt = tl.load(x_blk + t[:, None] * K + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_blk + e[:, None] * K + k[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0)
            if LOWP:
                acc = tl.dot(xt, tl.trans(wt), acc)
            else:
                acc = tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), acc, input_precision="ieee")
        tl.store(out_ptr + row0.to(tl.int64) * E + t[:, None] * E + (e0 + e)[None, :], acc,
                 mask=t_ok[:, None] & e_ok[None, :])


@triton.jit
def _gate_select_kernel(logit_ptr, bias_ptr, tid2eid_ptr, tok_ptr, w_out_ptr, id_out_ptr,
                        T, E, route_scale,
                        HASH: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr,
                        BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    t = tl.arange(0, BLOCK_T)
    kk = tl.arange(0, KP)
    k_ok = kk < TOPK
    for tb in range(pid, tl.cdiv(T, BLOCK_T), nprog):
        row0 = tb * BLOCK_T
        t_ok = (row0 + t) < T
        tk_ok = t_ok[:, None] & k_ok[None, :]
        lg_blk = logit_ptr + row0.to(tl.int64) * E
        if HASH:  # the table fixes the experts (and their order): gather just their k logits
            tid = tl.load(tok_ptr + row0 + t, mask=t_ok, other=0).to(tl.int32)
            ids = tl.load(tid2eid_ptr + tid[:, None] * TOPK + kk[None, :], mask=tk_ok, other=0).to(tl.int32)
            ok = tk_ok & (ids >= 0) & (ids < E)  # a bad table entry reads nothing out of bounds
            z = tl.load(lg_blk + t[:, None] * E + tl.where(ok, ids, 0), mask=ok, other=0.0)
            g = tl.where(ok, sqrt_softplus(z), 0.0)
        else:
            e = tl.arange(0, EP)
            e_ok = e < E
            z = tl.load(lg_blk + t[:, None] * E + e[None, :], mask=t_ok[:, None] & e_ok[None, :], other=0.0)
            s = sqrt_softplus(z)
            sel = s + tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
            sel = tl.where(e_ok[None, :], sel, float("-inf"))
            ids = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
            g = tl.zeros([BLOCK_T, KP], dtype=tl.float32)  # columns >= TOPK are never written: stay 0
            for i in range(TOPK):
                mx = tl.max(sel, axis=1)
                idx = tl.min(tl.where(sel == mx[:, None], e[None, :], EP), axis=1)
                idx = tl.minimum(idx, E - 1)  # a NaN row matches nothing: keep the id in range
                hit = e[None, :] == idx[:, None]
                gi = tl.sum(tl.where(hit, s, 0.0), axis=1)
                ids = tl.where((kk == i)[None, :], idx[:, None], ids)
                g = tl.where((kk == i)[None, :], gi[:, None], g)
                sel = tl.where(hit, float("-inf"), sel)
        # no [BLOCK_T, KP] token mask on g (UB overflow in BiShengIR, see the module docstring):
        # padding rows go unstored; the 1D guard keeps them, and a hash row whose table entries
        # are all invalid, free of 0/0
        den = tl.sum(g, axis=1)
        g = g / tl.where(den == 0.0, 1.0, den)[:, None] * route_scale
        out = row0.to(tl.int64) * TOPK + t[:, None] * TOPK + kk[None, :]
        tl.store(w_out_ptr + out, g, mask=tk_ok)
        tl.store(id_out_ptr + out, ids, mask=tk_ok)


# --------------------------------------------------------------------------------------------
# launchers


def logits_ub_bytes(block_t: int, block_e: int, block_k: int, x_bytes: int, w_bytes: int) -> int:
    """Live UB bytes of one `_gate_logits_kernel` iteration (operands, widened copies, accumulator)."""
    widen_x = 4 if x_bytes != 4 else 0
    widen_w = 4 if w_bytes != 4 and x_bytes != w_bytes else 0
    return block_t * block_k * (x_bytes + widen_x) + block_e * block_k * (w_bytes + widen_w) + block_t * block_e * 4


def select_ub_bytes(block_t: int, ep: int, kp: int) -> int:
    """Live UB bytes of one `_gate_select_kernel` iteration (top-k path; the hash path is smaller)."""
    return 8 * block_t * ep * 4 + 4 * block_t * kp * 4


def _logits_blocks(T: int, E: int):
    block_t = 16 if T <= 16 else 32
    block_e = max(_MIN_DOT, min(_BLOCK_E, pow2(E)))
    return block_t, block_e


def _check_inputs(x, weight, bias, tid2eid, token_ids, topk) -> int:
    """The dtypes and shapes `moe_gate` supports, in the order it reports them; returns k."""
    hashed = tid2eid is not None
    named = dict(x=x, weight=weight) | ({} if bias is None else dict(bias=bias))
    for name, t in named.items():
        if t.dtype == torch.float64:
            raise ValueError(f"moe_gate: {name} is float64; Ascend kernels have no fp64 (use fp32 or bf16)")
        if not t.is_floating_point():
            raise ValueError(f"moe_gate: {name} must be a floating-point tensor, got {t.dtype}")
    T, K = x.shape
    E = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"moe_gate: weight must be [E, {K}], got {tuple(weight.shape)}")
    if hashed:
        if token_ids is None:
            raise ValueError("moe_gate: a hash gate needs token_ids")
        for name, t in (("tid2eid", tid2eid), ("token_ids", token_ids)):
            if t.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"moe_gate: {name} must be int32 or int64, got {t.dtype}")
        k = tid2eid.shape[1]
    else:
        if bias is None:
            raise ValueError("moe_gate: a non-hash gate needs its bias")
        k = int(topk)
    if not 1 <= k <= E:
        raise ValueError(f"moe_gate: need 1 <= k <= experts, got k={k}, E={E}")
    return k


def moe_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             tid2eid: torch.Tensor | None, token_ids: torch.Tensor | None, topk: int, route_scale: float):
    """sqrt(softplus(x W^T)) scores; experts by hash table or top-k of score + bias.

    Returns (weights fp32 [T, k], expert ids int32 [T, k]). Top-k ids come in descending order of
    score + bias, ties broken towards the lower expert index; hash ids in the table's order.
    """
    hashed = tid2eid is not None
    k = _check_inputs(x, weight, bias, tid2eid, token_ids, topk)
    T, K = x.shape
    E = weight.shape[0]
    w_out, id_out, x, weight = gate_buffers(x, weight, k)
    if T == 0:
        return w_out, id_out

    # ---- 1. logits (cube)
    logits = torch.empty(T, E, dtype=torch.float32, device=x.device)
    kern1 = _gate_logits_kernel
    lowp = x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16) and not interpreting(kern1)
    block_t, block_e = _logits_blocks(T, E)
    block_k = max(_MIN_DOT, min(_BLOCK_K, pow2(K)))
    check_ub("moe_gate logits", logits_ub_bytes(block_t, block_e, block_k, x.element_size(), weight.element_size()))
    items = triton.cdiv(T, block_t) * triton.cdiv(E, block_e)
    kern1[(programs("cube", items, x.device),)](x, weight, logits, T, E, K, LOWP=lowp,
                                                 BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k)

    # ---- 2. selection (vector)
    EP = pow2(E)
    KP = pow2(k)
    bt = max(1, min(32, _SEL_TILE // EP))
    check_ub("moe_gate select", select_ub_bytes(bt, EP, KP))
    if hashed:
        t2e, toks, b = tid2eid.contiguous(), token_ids.contiguous(), logits  # bias unused
    else:
        t2e, toks, b = id_out, id_out, bias.contiguous()  # table / ids unused
    n_tb = triton.cdiv(T, bt)
    _gate_select_kernel[(programs("vector", n_tb, x.device),)](
        logits, b, t2e, toks, w_out, id_out, T, E, float(route_scale),
        HASH=hashed, TOPK=k, KP=KP, EP=EP, BLOCK_T=bt)
    return w_out, id_out


# --------------------------------------------------------------------------------------------
# offline lowering check (V4-Flash: D = 4096, E = 256, k = 6, bf16 activations, fp32 gate weight)

_V4_E, _V4_K = 256, 6
_SELECT_SIG = {
    "logit_ptr": "*fp32", "bias_ptr": "*fp32", "tid2eid_ptr": "*i64", "tok_ptr": "*i64",
    "w_out_ptr": "*fp32", "id_out_ptr": "*i32", "T": "i32", "E": "i32", "route_scale": "fp32",
}
_SELECT_CONST = dict(TOPK=_V4_K, KP=8, EP=_V4_E, BLOCK_T=_SEL_TILE // _V4_E)

LOWERING_CASES = [
    LoweringCase("moe_gate_logits", _gate_logits_kernel,
                 {"x_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32", "E": "i32", "K": "i32"},
                 dict(LOWP=False, BLOCK_T=32, BLOCK_E=_BLOCK_E, BLOCK_K=_BLOCK_K), kind="cube"),
    LoweringCase("moe_gate_logits_bf16", _gate_logits_kernel,
                 {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32", "T": "i32", "E": "i32", "K": "i32"},
                 dict(LOWP=True, BLOCK_T=16, BLOCK_E=_BLOCK_E, BLOCK_K=_BLOCK_K), kind="cube"),
    LoweringCase("moe_gate_select_topk", _gate_select_kernel, dict(_SELECT_SIG),
                 dict(_SELECT_CONST, HASH=False), kind="vector"),
    LoweringCase("moe_gate_select_hash", _gate_select_kernel, dict(_SELECT_SIG),
                 dict(_SELECT_CONST, HASH=True), kind="vector"),
]
