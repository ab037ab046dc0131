"""The kernel cases of bench/cuda_kernels.py: shapes, targets, checks and one case generator per kernel.

Each `cases_<kernel>(ctx)` yields `Case`s (inputs built on ctx.dev lazily, one case at a time); a
case holds the CUDA call, the reference call, the check that compares them and the byte / FLOP
counts of the roofline (formulas in bench/cuda_kernels.py's docstring). Every kernel's inputs come
from the conformance cases' sized builders (backends/conformance/: attention's `layer_inputs` and `qs`,
the indexer's, compressor's, mHC, norm / rope and gate builders, the projection and expert weights)
at the bench's sizes, drawn on the device (`device_draw`, `on_device`). `KERNELS` maps the names
of `--only` to the generators, `MODULE_OF` to the `backends.cuda.kernels` module each needs.

Only torch is imported here at module level: triton (through the kernels and `v4.ops`) is imported
after bench/cuda_kernels.py has decided TRITON_INTERPRET.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch

# the bench's sizes and input builders live with the conformance cases (backends/conformance/: the
# tests and `dsv4 parity ops` draw the same inputs at their sizes); cuda_kernels.py reads FLASH / SMOKE
from backends.conformance import (  # noqa: F401  (FLASH, SMOKE, Shapes: cuda_kernels.py reads them here)
    FLASH, SMOKE, Shapes, kernel_args, layer_inputs, paged_table, qs,
)
from backends.conformance.compress import compress_inputs
from backends.conformance.gate import topk_inputs
from backends.conformance.indexer import sequences_inputs
from backends.conformance.linear import expert_weights, projection_weight, routing_inputs
from backends.conformance.mhc import hc_post_inputs, hc_pre_inputs
from backends.conformance.norm_rope import rms_norm_inputs, rope_inputs
from v4.batch import StepBatch

FP8_ROW_BYTES_512 = 584  # V4 main KV row (spec §1): 448 e4m3 + 64 bf16 rope + 7 UE8M0 scales + 1 pad


# ----------------------------------------------------------------------------------- targets

@dataclass
class Target:
    metric: str  # "bw" (%BW), "tf" (%TF) or "roof" (%roof)
    frac: float
    source: str  # where the goal comes from

    def text(self) -> str:
        what = {"bw": "HBM BW", "tf": "peak", "roof": "roofline"}[self.metric]
        return f">={self.frac * 100:.0f}% {what} ({self.source})"


T_ATTN_DECODE = Target("bw", 0.70, "brief")
T_INDEXER = Target("bw", 0.70, "brief")
T_MOE_PREFILL = Target("tf", 0.50, "brief")
T_ATTN_PREFILL = Target("tf", 0.35, "spec 7.3")
T_MOE_DECODE = Target("bw", 0.60, "spec 7.4")
T_ELEMENTWISE = Target("bw", 0.75, "spec 7.5")


# ----------------------------------------------------------------------------------- context
@dataclass
class Ctx:
    args: Any
    smoke: bool
    gpu: bool
    dev: torch.device
    sh: Shapes
    hw: dict | None  # None in smoke mode: no roofline claims
    hw_name: str
    K: SimpleNamespace  # kernel modules
    ref: Any  # ReferenceOps on dev
    flush: torch.Tensor | None = None
    notes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (kernel, case, why): cases not run
    moe_weights: Any = None  # built once for moe and moe_fp4


@dataclass
class Case:
    kernel: str
    label: str
    phase: str  # "decode" | "prefill"
    run_cuda: Callable[[], Any]
    run_ref: Callable[[], Any]
    check: Callable[[Any, Any], tuple]  # (ok, short text, metrics dict)
    bytes: float
    flops: float
    peak: str  # "bf16" | "fp8" | "fp32"
    target: Target | None = None

# ----------------------------------------------------------------------------------- checks
def _cmp(got: torch.Tensor, ref: torch.Tensor) -> dict:
    g, r = got.detach().float(), ref.detach().float()
    if g.shape != r.shape:
        return {"shape": f"{tuple(g.shape)} vs {tuple(r.shape)}", "max_abs": math.inf, "max_rel": math.inf}
    if g.numel() == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "finite": True}
    d = (g - r).abs()
    mx = float(d.max())
    scale = float(r.abs().max())
    return {"max_abs": mx, "max_rel": mx / max(scale, 1e-30), "finite": bool(torch.isfinite(g).all()),
            "_d": d, "_r": r}


def check_close(tol: float):
    """OK when max |got - ref| / max |ref| <= tol (all parts of a tuple output) and got is finite."""
    def check(got, ref):
        gs = got if isinstance(got, (tuple, list)) else (got,)
        rs = ref if isinstance(ref, (tuple, list)) else (ref,)
        worst = {"max_abs": 0.0, "max_rel": 0.0}
        ok = True
        for g, r in zip(gs, rs):
            m = _cmp(g, r)
            if "shape" in m:
                return False, f"shape {m['shape']}", {"shape": m["shape"]}
            ok &= m["finite"] and m["max_rel"] <= tol
            worst["max_abs"] = max(worst["max_abs"], m["max_abs"])
            worst["max_rel"] = max(worst["max_rel"], m["max_rel"])
        worst["tol"] = tol
        return ok, f"abs {worst['max_abs']:.1e} rel {worst['max_rel']:.1e}", worst
    return check


def check_quantized(rtol: float, atol: float, max_frac: float):
    """Fake-quantised outputs: an element sitting on an e4m3 / e2m1 rounding boundary may round the
    other way after a last-bit difference upstream, so OK = at most max_frac of the elements outside
    atol + rtol * |ref| (plus the max errors for the record)."""
    def check(got, ref):
        m = _cmp(got, ref)
        if "shape" in m:
            return False, f"shape {m['shape']}", {"shape": m["shape"]}
        frac = float((m["_d"] > atol + rtol * m["_r"].abs()).float().mean()) if got.numel() else 0.0
        ok = m["finite"] and frac <= max_frac
        return ok, f"rel {m['max_rel']:.1e} off {frac * 100:.2f}%", \
            {"max_abs": m["max_abs"], "max_rel": m["max_rel"], "frac_off": frac, "max_frac": max_frac}
    return check


def set_overlap(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Per row |got ∩ ref| / |ref| over the valid (>= 0) picks; min and mean over rows."""
    g, r = got.long(), ref.long()
    if g.shape != r.shape:
        return {"shape": f"{tuple(g.shape)} vs {tuple(r.shape)}"}
    if r.numel() == 0:
        return {"min": 1.0, "mean": 1.0, "same_count": True}
    k = r.shape[1]
    rs = r.sort(dim=1).values.contiguous()
    pos = torch.searchsorted(rs, g.contiguous()).clamp(max=k - 1)
    hit = (rs.gather(1, pos) == g) & (g >= 0)
    n_ref, n_got = (r >= 0).sum(1), (g >= 0).sum(1)
    ov = hit.sum(1).double() / n_ref.clamp(min=1).double()
    ov = torch.where(n_ref == 0, (n_got == 0).double(), ov)
    return {"min": float(ov.min()), "mean": float(ov.mean()), "same_count": bool((n_ref == n_got).all())}


def check_topk(min_ovl: float = 0.95, mean_ovl: float = 0.99):
    """Indexer picks: the same number of valid picks per query and (near-)equal sets. Scores that
    tie within fp32 summation-order noise at the top-k cut may swap, hence not 100% required."""
    def check(got, ref):
        o = set_overlap(got, ref)
        if "shape" in o:
            return False, f"shape {o['shape']}", o
        ok = o["same_count"] and o["min"] >= min_ovl and o["mean"] >= mean_ovl
        return ok, f"ovl min {o['min']:.3f} mean {o['mean']:.4f}", o
    return check


def check_gate(tol: float):
    """Gate: expert sets per token (overlap) and, on tokens whose sets agree, the weights by expert."""
    def check(got, ref):
        (gw, gi), (rw, ri) = got, ref
        o = set_overlap(gi, ri)
        if "shape" in o:
            return False, f"shape {o['shape']}", o
        gi_s, gp = gi.long().sort(dim=1)
        ri_s, rp = ri.long().sort(dim=1)
        same = (gi_s == ri_s).all(1)
        if bool(same.any()):
            m = _cmp(gw.gather(1, gp)[same], rw.float().gather(1, rp)[same])
        else:
            m = {"max_rel": 0.0, "finite": True}
        ok = o["mean"] >= 0.99 and m["finite"] and m["max_rel"] <= tol
        o.update({"weights_max_rel": m["max_rel"], "tol": tol})
        return ok, f"ovl {o['mean']:.4f} w rel {m['max_rel']:.1e}", o
    return check


# ----------------------------------------------------------------------------------- helpers
def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def device_draw(ctx: Ctx, seed: int) -> tuple[torch.Generator, Callable]:
    """(g, r) for the conformance builders at the bench's sizes: g a CPU generator (block tables),
    r(*shape, s=1.0) s * N(0, 1) drawn on ctx.dev in bf16 (a long context's key pool is drawn where it
    lives, in its storage dtype, with no float32 copy of it anywhere)."""
    g = torch.Generator().manual_seed(seed)
    on_dev = torch.Generator(device=ctx.dev).manual_seed(seed)

    def r(*shape, s=1.0):
        x = torch.randn(*shape, generator=on_dev, device=ctx.dev, dtype=torch.bfloat16)
        return x.mul_(s) if s != 1.0 else x
    return g, r


def on_device(ctx: Ctx, tagged: list) -> tuple:
    """A builder's tagged inputs as the ops take them: role D in bf16, acc in float32, on ctx.dev."""
    return tuple(v.to(ctx.dev) if isinstance(v, torch.Tensor) else v for v in kernel_args(tagged, torch.bfloat16))


def _chunks(n: int, step: int):
    for s in range(0, n, step):
        yield s, min(n, s + step)


def pack_fp8_chunked(K, kv: torch.Tensor, step: int = 1 << 18) -> torch.Tensor:
    """pack_fp8_kv in row chunks (its fp32 temporaries of a 128K-context pool would be many GB)."""
    out = torch.empty(kv.shape[0], K.attention.row_bytes(kv.shape[1]), dtype=torch.uint8, device=kv.device)
    for s, e in _chunks(kv.shape[0], step):
        out[s:e] = K.attention.pack_fp8_kv(kv[s:e])
    return out


def unpack_fp8_into(K, packed: torch.Tensor, dst: torch.Tensor, step: int = 1 << 18) -> torch.Tensor:
    """dst[:] = unpack_fp8_kv(packed) in dst's dtype (bf16: exact), chunked; returns dst."""
    d = dst.shape[1]
    for s, e in _chunks(packed.shape[0], step):
        dst[s:e] = K.attention.unpack_fp8_kv(packed[s:e], d).to(dst.dtype)
    return dst


def too_big(ctx: Ctx, kernel: str, label: str, nbytes_: float) -> bool:
    """Skip (and record) a case whose KV / key pool alone would pass --max-input-gb."""
    cap = ctx.args.max_input_gb * 1e9
    if nbytes_ <= cap:
        return False
    ctx.skipped.append((kernel, label, f"pool {nbytes_ / 1e9:.0f} GB > --max-input-gb {ctx.args.max_input_gb:g}"))
    return True


def _kfmt(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


# =================================================================================== cases
# Each builder is a generator of Cases for one kernel name; it builds inputs on ctx.dev lazily
# (one case's inputs at a time, freed when the next case is built).


def _queries(ctx: Ctx, T: int, seed: int) -> tuple:
    """q [T, H, d] in bf16 and float32 sinks [H] on ctx.dev (the conformance cases' query builder)."""
    q, sink = qs(T, ctx.sh.heads, ctx.sh.head_dim, torch.bfloat16, seed)
    return q.to(ctx.dev), sink.to(ctx.dev)


def _layer_kv(ctx: Ctx, batch, ring_slots: int, kind: str, ratio: int, seed: int) -> tuple:
    """One layer's window_kv, window_idx, comp_kv, comp_idx for `batch` (the conformance cases'
    `layer_inputs`, the model's own index lists) at the bench's sizes: bf16 kv rows drawn on ctx.dev,
    the index lists moved there."""
    sh = ctx.sh
    _, r = device_draw(ctx, seed)
    w_kv, w_idx, c_kv, c_idx = layer_inputs(batch, ring_slots, kind, sh.head_dim, torch.bfloat16, seed, ratio=ratio,
                                            topk=sh.topk, bs=sh.block_size, window=sh.window, draw=r)
    return w_kv, w_idx.to(ctx.dev), c_kv, c_idx.to(ctx.dev)


def cases_attention(ctx: Ctx, fp8: bool):
    """Sparse MQA decode (one query per sequence) over window + compressed rows, CSA and HCA layers,
    then one CSA prefill case. KV rows bf16, or the packed FP8 layout (584 B rows at d = 512). Inputs:
    the conformance cases' `layer_inputs` over a step batch and `qs`."""
    K, sh = ctx.K, ctx.sh
    H, d = sh.heads, sh.head_dim
    name = "attention_fp8" if fp8 else "attention"
    row = K.attention.row_bytes(d) if fp8 else 2 * d
    scale = d ** -0.5

    def make(q, w_kv, w_idx, c_kv, c_idx, sink, phase, label, target, splits=None):
        T = q.shape[0]
        valid_w, valid_c = w_idx[w_idx >= 0], c_idx[c_idx >= 0]
        U = torch.unique(valid_w).numel() + torch.unique(valid_c).numel()
        N = valid_w.numel() + valid_c.numel()
        b = 2 * nbytes(q) + U * row + 4 * T * (w_idx.shape[1] + c_idx.shape[1]) + 4 * H
        flops = 2 * H * (d + d) * N
        if fp8:
            w_p, c_p = pack_fp8_chunked(K, w_kv), pack_fp8_chunked(K, c_kv)
            # the reference attends over the dequantised rows (exact in bf16), as the model's bf16 cache holds them
            w_kv, c_kv = unpack_fp8_into(K, w_p, w_kv), unpack_fp8_into(K, c_p, c_kv)
            run_cuda = lambda: K.attention.attention_fp8kv(q, w_p, w_idx, c_p, c_idx, sink, scale, d, splits=splits)  # noqa: E731
        else:
            run_cuda = lambda: K.attention.attention(q, w_kv, w_idx, c_kv, c_idx, sink, scale, splits=splits)  # noqa: E731
        run_ref = lambda: ctx.ref.attention(q, w_kv, w_idx, c_kv, c_idx, sink, scale)  # noqa: E731
        return Case(name, label, phase, run_cuda, run_ref, check_close(1e-2), b, flops, "bf16", target)

    for L in sh.contexts:
        for B in sh.batches:
            for kind, ratio in (("csa", sh.csa_ratio), ("hca", sh.hca_ratio)):
                S = L // ratio
                if too_big(ctx, name, f"{kind} B={B} ctx={_kfmt(L)}", B * S * d * 2 * (1.6 if fp8 else 1)):
                    continue
                q, sink = _queries(ctx, B, seed=L + B)
                # B sequences decoding their token at position L - 1: a full window (each sequence's
                # ring, then the new row) and S = L // ratio entries (CSA: the indexer's top-k of them)
                batch = StepBatch(list(range(B)), [L - 1] * B, [1] * B, "cpu")
                w_kv, w_idx, c_kv, c_idx = _layer_kv(ctx, batch, B, kind, ratio, seed=L + B + ratio)
                yield make(q, w_kv, w_idx, c_kv, c_idx, sink, "decode", f"{kind} B={B} ctx={_kfmt(L)}", T_ATTN_DECODE)
                if B == sh.batches[0]:  # the same call without split-KV: what the split buys at small batch
                    yield make(q, w_kv, w_idx, c_kv, c_idx, sink, "decode", f"{kind} B={B} ctx={_kfmt(L)} splits=1",
                               T_ATTN_DECODE, splits=1)
                del q, sink, w_kv, w_idx, c_kv, c_idx
    # prefill: a chunk of T tokens of one sequence continuing at position L (its ring, then the chunk's
    # rows in the window; the top-k of its >= L // 4 visible entries)
    T, L = sh.prefill_queries, sh.prefill_context
    q, sink = _queries(ctx, T, seed=T)
    w_kv, w_idx, c_kv, c_idx = _layer_kv(ctx, StepBatch([0], [L], [T], "cpu"), 1, "csa", sh.csa_ratio, seed=T + 1)
    yield make(q, w_kv, w_idx, c_kv, c_idx, sink, "prefill", f"csa prefill T={T} ctx={_kfmt(L)}", T_ATTN_PREFILL)


def cases_indexer(ctx: Ctx):
    """Lightning-indexer decode: one query per sequence at its context's last position scores its
    ctx // 4 entries, top-k (the conformance cases' packed-sequences builder at the bench's sizes)."""
    K, sh = ctx.K, ctx.sh
    Hi, Di, bs, topk = sh.idx_heads, sh.idx_dim, sh.block_size, sh.topk
    g, r = device_draw(ctx, 2)
    for L in sh.contexts:
        for B in sh.batches:
            S = L // sh.csa_ratio
            per = -(-S // bs)
            if too_big(ctx, "indexer", f"B={B} ctx={_kfmt(L)}", B * per * bs * Di * 2):
                continue
            args = on_device(ctx, sequences_inputs(g, r, [1] * B, sh.csa_ratio, topk, start=L - 1, H=Hi, d=Di,
                                                   bs=bs))
            q, w, pool = args[:3]
            b = B * S * Di * pool.element_size() + nbytes(q) + nbytes(w) + 4 * B * per + 4 * B * topk
            flops = 2 * Hi * Di * S * B
            # max_visible = S: the host-side bound the model passes (a captured step passes the
            # cache's capacity), so neither side reads the positions back
            yield Case("indexer", f"B={B} ctx={_kfmt(L)} S={_kfmt(S)}", "decode",
                       lambda a=args, S=S: K.indexer.indexer_topk(*a, max_visible=S),
                       lambda a=args, S=S: ctx.ref.indexer_topk(*a, max_visible=S),
                       check_topk(), b, flops, "bf16", T_INDEXER)
            del q, w, pool, args


def cases_compress(ctx: Ctx):
    """Compressor prefill of one sequence: CSA main (ratio 4, overlapping, fp8), HCA (ratio 128,
    fp8), indexer keys (ratio 4, overlapping, fp4); pool in bf16, state and inputs in fp32. Then
    each in its decode form (`DecodeRows`, the CUDA-graph path) for every decode batch size. Inputs:
    the conformance cases' sized builder (`compress_inputs`) drawn on the device."""
    sh = ctx.sh
    from v4.ops import CompressSpec

    g, r = device_draw(ctx, 3)
    for label, m, c, overlap, quant in (("csa", sh.csa_ratio, sh.head_dim, True, "fp8"),
                                        ("hca", sh.hca_ratio, sh.head_dim, False, "fp8"),
                                        ("indexer", sh.csa_ratio, sh.compress_idx_dim, True, "fp4")):
        spec = CompressSpec(m, c, overlap, quant, 64, 1e-6)
        yield _compress_prefill_case(ctx, label, spec, g, r)
        # decode (the captured form, DecodeRows): B sequences, one token each, every other one
        # closing its window at this token; the rest go mid-window
        for B in sh.batches:
            yield _compress_decode_case(ctx, label, spec, g, r, B)


def _compress_inputs(ctx: Ctx, r, spec, T: int, table: torch.Tensor, layout) -> tuple[tuple, dict]:
    """compress's arguments on ctx.dev (bf16 pool of ctx.sh.block_size rows a block) and per-side copies
    of what the call writes (state_kv, state_score, pool: args[6:9]), so both sides start alike."""
    tagged = compress_inputs(r, spec, T, table.shape[0], table, layout, pool_dtype=torch.bfloat16,
                             block_size=ctx.sh.block_size)
    args = on_device(ctx, tagged)
    return args, {side: tuple(t.clone() for t in args[6:9]) for side in ("cuda", "ref")}


def _compress_run(args: tuple, st: dict, fn, side: str):
    """fn (the kernel or the reference) over args with `side`'s copy of the state and pool."""
    return fn(*args[:6], *st[side], *args[9:])


def _compress_prefill_case(ctx: Ctx, label: str, spec, g: torch.Generator, r) -> Case:
    """The prefill case of one compressor: T tokens of one sequence from position 0."""
    K, sh = ctx.K, ctx.sh
    m, c, overlap, quant = spec.ratio, spec.dim, spec.overlap, spec.quant
    T, bs = sh.compress_tokens, sh.block_size
    k = 2 if overlap else 1
    E = T // m
    table = paged_table(1, E + 1, bs, g).table
    args, st = _compress_inputs(ctx, r, spec, T, table, [(0, 0, T, 0)])
    ape, norm_w = args[2], args[4]
    rows_written = (m if overlap else 0) + (T % m)
    b = 2 * 4 * T * k * c + nbytes(ape) + 2 * E * c * 2 + 2 * 4 * rows_written * k * c + nbytes(norm_w)

    def check(got, ref, base=check_quantized(2 ** -7, 1e-3, 0.01)):
        ok, text, m_ = base(got, ref)
        ok_p, _, mp = base(st["cuda"][2], st["ref"][2])
        same_state = all(torch.equal(st["cuda"][i], st["ref"][i]) for i in (0, 1))
        m_.update({"pool_frac_off": mp.get("frac_off"), "state_equal": same_state})
        return ok and ok_p and same_state, text + ("" if same_state else " STATE"), m_

    return Case("compress", f"{label} m={m} c={c} {quant} T={_kfmt(T)}", "prefill",
                lambda: _compress_run(args, st, K.compress.compress, "cuda"),
                lambda: _compress_run(args, st, ctx.ref.compress, "ref"),
                check, b, 0.0, "fp32", T_ELEMENTWISE)


def _compress_decode_case(ctx: Ctx, label: str, spec, g: torch.Generator, r, B: int) -> Case:
    """One decode step of B sequences through the compressor (`DecodeRows`, one launch)."""
    K, sh, dev = ctx.K, ctx.sh, ctx.dev
    from v4.ops import DecodeRows

    m, c, overlap = spec.ratio, spec.dim, spec.overlap
    k = 2 if overlap else 1
    pos = [(1000 + i) * m + (m - 1 if i % 2 == 0 else i % m) for i in range(B)]
    rows = DecodeRows(torch.arange(B, device=dev), torch.tensor(pos, device=dev))
    n_close = (B + 1) // 2
    table = paged_table(B, max(pos) // m + 1, sh.block_size, g).table
    args, st = _compress_inputs(ctx, r, spec, B, table, rows)
    # read kv + score rows; closing rows read their k*m state rows (kv + score) and write the
    # pool row and the returned row; every row writes state: one row, or m rows on closing (overlap)
    b = (2 * 4 * B * k * c + n_close * (2 * 4 * k * m * k * c + 2 * c * 2)
         + 2 * 4 * k * c * ((B - n_close) + n_close * (m if overlap else 0)))

    def check(got, ref, base=check_quantized(2 ** -7, 1e-3, 0.01)):
        ok, text, m_ = base(got, ref)
        same_state = all(torch.equal(st["cuda"][i], st["ref"][i]) for i in (0, 1))
        m_["state_equal"] = same_state
        return ok and same_state, text + ("" if same_state else " STATE"), m_

    return Case("compress", f"{label} decode m={m} B={B} (1 launch)", "decode",
                lambda: _compress_run(args, st, K.compress.compress, "cuda"),
                lambda: _compress_run(args, st, ctx.ref.compress, "ref"),
                check, b, 0.0, "fp32", None)


def _hc_tokens(sh: Shapes) -> list:
    return list(sh.batches) + [sh.prefill_tokens]


def cases_hc_pre(ctx: Ctx):
    K, sh = ctx.K, ctx.sh
    n, D = sh.hc_n, sh.hidden
    _, r = device_draw(ctx, 4)
    rows = (2 + n) * n
    for T in _hc_tokens(sh):
        args = on_device(ctx, hc_pre_inputs(r, T, n, D))  # X, fn, base, scale, 20 iterations, eps, eps
        X, fn = args[:2]
        b = nbytes(X) + nbytes(fn) + T * D * X.element_size() + 4 * T * (n + n * n)
        flops = 2 * T * rows * n * D + 4 * T * n * D
        yield Case("hc_pre", f"T={T} n={n} D={D}", "decode" if T < sh.prefill_tokens else "prefill",
                   lambda a=args: K.mhc.hc_pre(*a), lambda a=args: ctx.ref.hc_pre(*a),
                   check_close(1e-2), b, flops, "fp32", T_ELEMENTWISE)


def cases_hc_post(ctx: Ctx):
    K, sh = ctx.K, ctx.sh
    n, D = sh.hc_n, sh.hidden
    _, r = device_draw(ctx, 5)
    for T in _hc_tokens(sh):
        args = on_device(ctx, hc_post_inputs(r, T, n, D))  # y, X, post, comb
        y, X, post, comb = args
        b = nbytes(y) + 2 * nbytes(X) + nbytes(post) + nbytes(comb)
        yield Case("hc_post", f"T={T} n={n} D={D}", "decode" if T < sh.prefill_tokens else "prefill",
                   lambda a=args: K.mhc.hc_post(*a), lambda a=args: ctx.ref.hc_post(*a),
                   check_close(1e-2), b, 2 * T * n * D * (n + 1), "fp32", T_ELEMENTWISE)


def cases_rms_norm(ctx: Ctx):
    K, sh = ctx.K, ctx.sh
    _, r = device_draw(ctx, 6)
    for T in (sh.batches[-1], sh.prefill_tokens):
        for what, shape, weight in (("q heads", (T, sh.heads, sh.head_dim), None), ("hidden", (T, sh.hidden), "acc")):
            args = on_device(ctx, rms_norm_inputs(r, shape, weight, 1.0, 0.0))  # x, float32 weight or None, eps
            x, w = args[:2]
            b = 2 * nbytes(x) + nbytes(w)
            phase = "decode" if T < sh.prefill_tokens else "prefill"
            yield Case("rms_norm", f"{what} {'x'.join(map(str, shape))}", phase,
                       lambda a=args: K.norm_rope.rms_norm(*a), lambda a=args: ctx.ref.rms_norm(*a),
                       check_close(1e-2), b, 0.0, "fp32", T_ELEMENTWISE)


def cases_rope(ctx: Ctx):
    K, sh = ctx.K, ctx.sh
    from v4.config import yarn_inv_freq

    g, r = device_draw(ctx, 7)
    inv = yarn_inv_freq(64, 10000.0, None)
    for T in (sh.batches[-1], sh.prefill_tokens):
        pos = torch.randint(0, 1 << 17, (T,), generator=g)
        args = on_device(ctx, rope_inputs(r, pos, sh.heads, sh.head_dim, inv))  # x, positions, inv_freq
        x, pos, inv_dev = args
        b = 2 * nbytes(x) + nbytes(pos) + nbytes(inv_dev)
        yield Case("rope", f"q {T}x{sh.heads}x{sh.head_dim}", "decode" if T < sh.prefill_tokens else "prefill",
                   lambda a=args: K.norm_rope.rope(*a), lambda a=args: ctx.ref.rope(*a),
                   check_close(1e-2), b, 0.0, "fp32", T_ELEMENTWISE)


def cases_gate(ctx: Ctx):
    K, sh = ctx.K, ctx.sh
    E, D, k = sh.experts, sh.hidden, sh.moe_topk
    _, r = device_draw(ctx, 8)
    for T in _hc_tokens(sh):
        args = on_device(ctx, topk_inputs(r, T, E, D, k, 0.1))  # x, fp32 W, bias, no hash table, k, 1.5
        x, w, bias = args[:3]
        b = nbytes(x) + nbytes(w) + nbytes(bias) + 8 * T * k
        yield Case("gate", f"T={T} E={E} D={D} top{k}", "decode" if T < sh.prefill_tokens else "prefill",
                   lambda a=args: K.gate.moe_gate(*a), lambda a=args: ctx.ref.moe_gate(*a),
                   check_gate(1e-4), b, 2 * T * E * D, "fp32", None)


def _moe_weights(ctx: Ctx):
    """Routed experts stored as FP4 and the shared expert as FP8 (V4's formats; the conformance cases'
    `expert_weights` drawn on the device), and the bf16 dequantisation of both: the bf16 grouped GEMM
    and the reference run on these values."""
    K, sh, dev = ctx.K, ctx.sh, ctx.dev
    E, D, I = sh.experts, sh.hidden, sh.moe_inter  # noqa: E741
    _, r = device_draw(ctx, 9)
    bf = torch.bfloat16
    routed = expert_weights(r, E, D, I, "fp4")
    w13, w2 = _dequantized_experts(*routed, dev)
    f13, f2 = K.gemm.prepare_experts(*routed, bf, dev)
    del routed
    shared = expert_weights(r, 1, D, I, "fp8")
    p13, p2 = K.gemm.prepare_experts(*shared, bf, dev)
    sh13, sh2 = _dequantized_experts(*shared, dev)
    shared_bf = (sh13[0], sh2[0])
    dense13 = K.gemm.CudaWeight("dense", w13, None, bf, I)
    dense2 = K.gemm.CudaWeight("dense", w2, None, bf, 0)
    return SimpleNamespace(w13=w13, w2=w2, dense13=dense13, dense2=dense2, f13=f13, f2=f2,
                           shared_bf=shared_bf, shared_bf_cuda=(K.gemm.CudaWeight("dense", shared_bf[0], None, bf, I),
                                                                K.gemm.CudaWeight("dense", shared_bf[1], None, bf, 0)),
                           shared_fp8=(p13[0], p2[0]), shared_fp8_ref=shared_bf)


def _dequantized_experts(w1s: list, w3s: list, w2s: list, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored expert weights -> bf16 w13 [E, 2I, D] ([W1; W3] by rows) and w2 [E, D, I], one expert at a
    time (no float32 copy of all of them)."""
    I, D = w1s[0].shape  # noqa: E741
    w13 = torch.empty(len(w1s), 2 * I, D, dtype=torch.bfloat16, device=dev)
    w2 = torch.empty(len(w1s), D, I, dtype=torch.bfloat16, device=dev)
    for e, (a, b, c) in enumerate(zip(w1s, w3s, w2s)):
        w13[e, :I].copy_(a.dequantize(torch.float32))
        w13[e, I:].copy_(b.dequantize(torch.float32))
        w2[e].copy_(c.dequantize(torch.float32))
    return w13, w2


def _cw_bytes_per_expert(w) -> int:
    """Bytes of one expert of a stacked CudaWeight (data + scales, as stored)."""
    e = w.data.shape[0]
    return (nbytes(w.data) + nbytes(w.scale)) // e


def _cw_bytes(w) -> int:
    return nbytes(w.data) + nbytes(w.scale)


def cases_moe(ctx: Ctx, fp4: bool):
    """Routed top-k experts + shared expert. bf16: dense weights, no activation quant (prefill and
    decode). fp4: routed FP4 + shared FP8 weights dequantised in-kernel, FP8 activation quant (V4's
    exact mode), decode shapes; the reference runs on the dequantised bf16 weights."""
    K, sh = ctx.K, ctx.sh
    E, D, I, k = sh.experts, sh.hidden, sh.moe_inter, sh.moe_topk  # noqa: E741
    if ctx.moe_weights is None:
        ctx.moe_weights = _moe_weights(ctx)
    wts = ctx.moe_weights
    limit = 10.0
    g, r = device_draw(ctx, 10)
    plan = ([(T, "decode") for T in sh.moe_decode] if fp4 else
            [(T, "prefill") for T in sh.moe_prefill] + [(T, "decode") for T in sh.moe_decode])
    for T, phase in plan:
        ids, rw = on_device(ctx, routing_inputs(g, r, T, E, k))  # k distinct experts per token, their weights
        x = r(T, D)
        touched = torch.unique(ids).numel()
        if fp4:
            w13c, w2c, shc, shr, aq = wts.f13, wts.f2, wts.shared_fp8, wts.shared_fp8_ref, True
        else:
            w13c, w2c, shc, shr, aq = wts.dense13, wts.dense2, wts.shared_bf_cuda, wts.shared_bf, False
        b = (touched * (_cw_bytes_per_expert(w13c) + _cw_bytes_per_expert(w2c)) + _cw_bytes(shc[0]) + _cw_bytes(shc[1])
             + 2 * nbytes(x) + 8 * T * k)
        flops = 2 * 3 * D * I * (T * k + T)
        target = (T_MOE_PREFILL if phase == "prefill" else T_MOE_DECODE)
        yield Case("moe_fp4" if fp4 else "moe", f"T={T} E={E} top{k} D={D} I={I} ({touched} hit)", phase,
                   lambda a=(x, ids, rw, w13c, w2c, shc, limit, aq): K.gemm.moe_experts(*a),
                   lambda a=(x, ids, rw, wts.w13, wts.w2, shr, limit, aq): ctx.ref.moe_experts(*a),
                   check_close(2.5e-2 if aq else 1e-2), b, flops, "bf16", target)


def cases_linear_fp8(ctx: Ctx):
    """FP8 block-scaled weights, FP8 activation quant in the prologue (exact mode): the native
    fp8 x fp8 MMA on sm89+; the reference is F.linear over act_quant(x) and the dequantised weight."""
    K, sh, dev = ctx.K, ctx.sh, ctx.dev
    _, r = device_draw(ctx, 11)
    fp8_mma = K.gemm._fp8_mma_default(torch.empty(0, device=dev))
    for name, (N, Kd) in sh.linear.items():
        qw = projection_weight(r, N, Kd, "fp8")  # the conformance cases' projection weight, stored FP8
        cw = K.gemm.prepare_linear(qw, torch.bfloat16, dev)
        rw = ctx.ref.prepare_linear(qw, torch.bfloat16)
        for M in sh.linear_tokens:
            x = r(M, Kd)
            b = N * Kd + nbytes(cw.scale) + nbytes(x) + M * N * 2
            yield Case("linear_fp8", f"{name} M={M} N={N} K={Kd}", "prefill" if M >= 1024 else "decode",
                       lambda x=x, cw=cw: K.gemm.linear(x, cw, True), lambda x=x, rw=rw: ctx.ref.linear(x, rw, True),
                       check_close(2.5e-2), b, 2 * M * N * Kd, "fp8" if fp8_mma else "bf16", None)


KERNELS: dict[str, Callable] = {
    "attention": lambda ctx: cases_attention(ctx, False),
    "attention_fp8": lambda ctx: cases_attention(ctx, True),
    "indexer": cases_indexer,
    "compress": cases_compress,
    "hc_pre": cases_hc_pre,
    "hc_post": cases_hc_post,
    "moe": lambda ctx: cases_moe(ctx, False),
    "moe_fp4": lambda ctx: cases_moe(ctx, True),
    "linear_fp8": cases_linear_fp8,
    "gate": cases_gate,
    "rms_norm": cases_rms_norm,
    "rope": cases_rope,
}
MODULE_OF = {"attention": "attention", "attention_fp8": "attention", "indexer": "indexer", "compress": "compress",
             "hc_pre": "mhc", "hc_post": "mhc", "moe": "gemm", "moe_fp4": "gemm", "linear_fp8": "gemm",
             "gate": "gate", "rms_norm": "norm_rope", "rope": "norm_rope"}
