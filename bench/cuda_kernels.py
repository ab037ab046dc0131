"""CUDA-backend kernels against the reference ops at V4-Flash shapes, plus whole-model decode.

For every kernel of `backends/cuda/kernels/` at V4-Flash shapes (spec performance.md §1) one run

  1. builds the inputs on the GPU, runs the CUDA op and the reference op (`backends.reference`,
     on the same GPU, same inputs) and checks that they agree: max abs / relative error, or for
     the indexer and the gate the overlap of the picked sets; OK / MISMATCH per case;
  2. times both with CUDA events (warm-up, then the median of N runs, L2 flushed before each run)
     and prints the time, achieved GB/s and TFLOP/s from the byte / FLOP formulas below, percent
     of the roofline (H100 SXM: 3.35 TB/s, 989 TF bf16, 1979 TF fp8; an H200, detected by
     `torch.cuda.get_device_name`, gets 4.8 TB/s) and the speedup over the reference; targets are
     printed beside the figures with PASS / MISS (decode attention and indexer >= 70% of HBM BW,
     bf16 MoE grouped GEMM at prefill >= 50% of bf16 peak; the others are spec §7's goals);
  3. decodes configs/small.yaml as a whole model through the engine (one v4.engine.LLM per variant):
     on the reference backend, on the cuda backend launching every kernel from Python, and on the
     cuda backend replaying captured CUDA graphs (graphs="on", v4.graphs), on the same GPU (prefill,
     then single-token steps fed the same tokens), and prints tokens/s and the ratios to the
     reference (target: graphs >= 5x).

    python bench/cuda_kernels.py                          # everything (needs a GPU)
    python bench/cuda_kernels.py --only attention,indexer --batches 1,128 --contexts 8192,131072
    python bench/cuda_kernels.py --only model --model-dtype bfloat16 --json out.json
    python bench/cuda_kernels.py --smoke                  # tiny shapes; no GPU: Triton interpreter on CPU

`--smoke` runs the same code path at tiny shapes (CPU tensors under TRITON_INTERPRET=1 when there is
no GPU, set before triton is imported), with wall-clock timing and no roofline claims: it checks the
script itself, not the kernels' speed. Kernel names for `--only`: see KERNELS (and `model`).

Bytes and FLOPs per call (the roofline inputs; es = element size of the tensor's dtype). Bytes are
the unique bytes the op must move (spec §5 "unique bytes required"), not what a kernel happens to
move: scratch round trips of an implementation (the indexer's fp32 score matrix, the MoE's
per-pair rows, mHC's split-K partials, attention's split-KV partials) are left out, so they show
up as lost bandwidth.

  attention   T queries, H heads, head dim d; Kw window + Kc compressed indices per query:
              bytes = 2*T*H*d*es(q) [Q and O] + U*row + 4*T*(Kw+Kc) [int32 indices] + 4*H [sink]
              U = distinct valid rows gathered (window and compressed counted separately),
              row = 2*d (bf16 KV) or 584 B (FP8 layout for d = 512: 448 e4m3 + 64 bf16 + 8 scales)
              FLOPs = 2*H*(d + d)*N, N = valid (query, index) pairs  (QK^T and PV, spec §5)
  indexer     B queries, Hi x Di heads, S = ctx // 4 visible entries each, top-k picks:
              bytes = B*S*Di*es(pool) [keys] + B*Hi*Di*es(q) + 4*B*Hi [weights] + 4*B*ceil(S/bs)
                      [block table] + 4*B*topk [picks]      (keys are bf16 here: 256 B/entry,
                      the spec's FP8 layout would be 132 B)
              FLOPs = 2*Hi*Di*S*B
  compress    T new tokens of one sequence, ratio m, entry width c, k = 2 (overlap) or 1, E = T // m:
              bytes = 2*4*T*k*c [kv + score, fp32] + 4*m*k*c [ape] + 2*E*c*es(pool) [pool row + the
                      returned entry] + 2*4*R*k*c [state rows written] + 4*c [norm weight]
              FLOPs ~ 0 (memory-bound elementwise; not counted)
  hc_pre      T tokens, n streams, hidden D: bytes = T*n*D*es(X) + 4*(2+n)*n*n*D [fn] + T*D*es [u]
              + 4*T*(n + n*n) [post, comb];  FLOPs = 2*T*(2+n)*n*n*D [mix] + 4*T*n*D [sum sq,
              collapse], against the fp32 CUDA-core peak (the mix is an IEEE fp32 dot)
  hc_post     bytes = T*D*es(y) + 2*T*n*D*es(X) [read X, write X'] + 4*T*(n + n*n);
              FLOPs = 2*T*n*D*(n+1)
  moe         T tokens, top-k of E experts (+ shared), hidden D, inter I:
              bytes = n_touched * bytes(W13_e + W2_e) [distinct routed experts hit, data + scales
                      as stored] + bytes(shared) + 2*T*D*es(x) [x, out] + 8*T*k [ids, weights]
              FLOPs = 2*3*D*I*(T*k + T*n_shared)
  linear_fp8  M x K activations, N x K FP8 weight with 128 x 128 fp32 block scales:
              bytes = N*K + 4*ceil(N/128)*ceil(K/128) + M*K*es(x) + M*N*es(y);  FLOPs = 2*M*N*K
  gate        bytes = T*D*es(x) + 4*E*D [fp32 W] + 4*E [bias] + 8*T*k;  FLOPs = 2*T*E*D (fp32 peak)
  rms_norm    bytes = 2*R*N*es + 4*N;   rope: bytes = 2*T*M*D*es + 8*T + 4*R2;  FLOPs ~ 0

Roofline: %BW = bytes / t / BW_peak, %TF = FLOPs / t / peak (bf16, fp8 or fp32 CUDA-core peak as
the op computes), %roof = max(bytes / BW_peak, FLOPs / peak) / t (spec §5).

This is a benchmark, not a test: it prints figures and never fails on a missed target. It exits
non-zero only when a case raised an error (or, in --smoke, when a check mismatched).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (torch is safe to import before TRITON_INTERPRET is decided; triton is not)

# ----------------------------------------------------------------------------------- constants
# Hardware (spec performance.md §0): HBM bandwidth, dense bf16 / fp8 tensor-core peaks. The fp32
# CUDA-core peak (67 TF, vendor figure for H100/H200 SXM, not in the spec) is used only for the ops
# whose inner product runs as IEEE fp32 FMAs (mHC mix, gate logits).
H100 = {"bw": 3.35e12, "bf16": 989e12, "fp8": 1979e12, "fp32": 67e12}
H200 = {"bw": 4.8e12, "bf16": 989e12, "fp8": 1979e12, "fp32": 67e12}
FP8_ROW_BYTES_512 = 584  # V4 main KV row (spec §1): 448 e4m3 + 64 bf16 rope + 7 UE8M0 scales + 1 pad

TARGET_MODEL_RATIO = 5.0  # whole-model decode: cuda tok/s >= 5x reference tok/s on the same GPU


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


# ----------------------------------------------------------------------------------- shapes
@dataclass
class Shapes:
    """Everything a case's size depends on: V4-Flash values, or tiny ones for --smoke."""

    heads: int  # attention query heads
    head_dim: int
    topk: int  # CSA top-k compressed entries per query
    window: int  # sliding window
    csa_ratio: int
    hca_ratio: int
    batches: list  # decode batch sizes (queries, one per sequence)
    contexts: list  # decode context lengths
    prefill_queries: int  # attention prefill: queries of one sequence
    prefill_context: int
    idx_heads: int
    idx_dim: int
    block_size: int  # entries per page of the compressed / indexer pools
    hidden: int
    hc_n: int
    prefill_tokens: int  # hc / norm / rope / gate prefill size
    compress_tokens: int
    compress_idx_dim: int
    experts: int
    moe_topk: int
    moe_inter: int
    moe_prefill: list
    moe_decode: list
    linear: dict  # name -> (N, K)
    linear_tokens: list


FLASH = Shapes(
    heads=64, head_dim=512, topk=512, window=128, csa_ratio=4, hca_ratio=128,
    batches=[1, 32, 128], contexts=[8192, 65536, 1048576], prefill_queries=4096, prefill_context=8192,
    idx_heads=64, idx_dim=128, block_size=64,
    hidden=4096, hc_n=4, prefill_tokens=4096,
    compress_tokens=8192, compress_idx_dim=128,
    experts=256, moe_topk=6, moe_inter=2048, moe_prefill=[4096, 16384], moe_decode=[1, 32, 128],
    # Flash projections (q_lora 1024, 64 x 512 heads, o_groups 8 x rank 1024, indexer 64 x 128)
    linear={"wq_a": (1024, 4096), "wq_b": (32768, 1024), "wkv": (512, 4096), "wo_b": (4096, 8192),
            "idx.wq_b": (8192, 1024)},
    linear_tokens=[1, 128, 4096],
)

SMOKE = Shapes(
    heads=16, head_dim=128, topk=16, window=8, csa_ratio=4, hca_ratio=16,
    batches=[1, 3], contexts=[128, 512], prefill_queries=16, prefill_context=128,
    idx_heads=8, idx_dim=32, block_size=16,
    hidden=64, hc_n=4, prefill_tokens=9,
    compress_tokens=64, compress_idx_dim=128,
    experts=8, moe_topk=2, moe_inter=64, moe_prefill=[24], moe_decode=[1, 3],
    linear={"wq_a": (128, 256), "wkv": (64, 256)},
    linear_tokens=[1, 5],
)


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


def log(msg: str = "") -> None:
    print(msg, flush=True)


def sync(ctx: Ctx) -> None:
    if ctx.gpu:
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------- timing
def bench(ctx: Ctx, fn: Callable[[], Any], warmup: int, reps: int) -> tuple[float, float]:
    """(median, min) seconds per call. GPU: CUDA events around each call, L2 flushed before it;
    otherwise wall clock."""
    for _ in range(warmup):
        fn()
    sync(ctx)
    times = []
    for _ in range(reps):
        if ctx.gpu:
            if ctx.flush is not None:
                ctx.flush.zero_()  # evict the previous run's data from L2 (spec §6: FlashMLA / DeepGEMM do too)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def copy_bandwidth(ctx: Ctx) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time), 1 GiB buffers."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=ctx.dev)
    b = torch.empty_like(a)
    t, _ = bench(ctx, lambda: b.copy_(a), 2, 10)
    del a, b
    return 2 * n / t


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
        m = _cmp(gw.gather(1, gp)[same], rw.float().gather(1, rp)[same]) if bool(same.any()) else {"max_rel": 0.0, "finite": True}
        ok = o["mean"] >= 0.99 and m["finite"] and m["max_rel"] <= tol
        o.update({"weights_max_rel": m["max_rel"], "tol": tol})
        return ok, f"ovl {o['mean']:.4f} w rel {m['max_rel']:.1e}", o
    return check


# ----------------------------------------------------------------------------------- helpers
def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def randn(*shape, dtype=torch.bfloat16, dev, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(*shape, device=dev, dtype=torch.float32 if dtype not in (torch.float32, torch.bfloat16) else dtype)
    if scale != 1.0:
        x.mul_(scale)
    return x.to(dtype)


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


def cases_attention(ctx: Ctx, fp8: bool):
    """Sparse MQA decode (one query per sequence) over window + compressed rows, CSA and HCA layers,
    then one CSA prefill case. KV rows bf16, or the packed FP8 layout (584 B rows at d = 512)."""
    K, sh, dev = ctx.K, ctx.sh, ctx.dev
    H, d, W = sh.heads, sh.head_dim, sh.window
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

    torch.manual_seed(1)
    sink = randn(H, dtype=torch.float32, dev=dev, scale=0.5)
    for L in sh.contexts:
        for B in sh.batches:
            for kind, ratio in (("csa", sh.csa_ratio), ("hca", sh.hca_ratio)):
                S = L // ratio
                if too_big(ctx, name, f"{kind} B={B} ctx={_kfmt(L)}", B * S * d * 2 * (1.6 if fp8 else 1)):
                    continue
                q = randn(B, H, d, dev=dev)
                # window: the ring's W rows of each sequence + this step's new row (model: cat([ring, kv]))
                w_kv = randn(B * W + B, d, dev=dev)
                ar = torch.arange(B, device=dev)[:, None]
                w_idx = torch.cat([B * W + ar, ar * W + torch.arange(W - 1, device=dev)[None, :]], 1).to(torch.int32)
                c_kv = randn(B * S, d, dev=dev)
                if kind == "csa":  # the indexer's top-k picks: distinct entries of the sequence, score order
                    k = min(sh.topk, S)
                    picks = torch.rand(B, S, device=dev).topk(k, dim=1).indices
                else:  # HCA: every complete entry
                    picks = torch.arange(S, device=dev)[None, :].expand(B, S)
                c_idx = (ar * S + picks).to(torch.int32)
                yield make(q, w_kv, w_idx, c_kv, c_idx, sink, "decode", f"{kind} B={B} ctx={_kfmt(L)}", T_ATTN_DECODE)
                if B == sh.batches[0]:  # the same call without split-KV: what the split buys at small batch
                    yield make(q, w_kv, w_idx, c_kv, c_idx, sink, "decode", f"{kind} B={B} ctx={_kfmt(L)} splits=1",
                               T_ATTN_DECODE, splits=1)
                del q, w_kv, w_idx, c_kv, c_idx, picks
    # prefill: T queries of one sequence (each its own W-row window and top-k of the entries)
    T, L = sh.prefill_queries, sh.prefill_context
    S = L // sh.csa_ratio
    q = randn(T, H, d, dev=dev)
    w_kv = randn(T + W, d, dev=dev)
    w_idx = (torch.arange(T, device=dev)[:, None] + W - torch.arange(W, device=dev)[None, :]).to(torch.int32)
    c_kv = randn(S, d, dev=dev)
    c_idx = torch.rand(T, S, device=dev).topk(min(sh.topk, S), dim=1).indices.to(torch.int32)
    yield make(q, w_kv, w_idx, c_kv, c_idx, sink, "prefill", f"csa prefill T={T} ctx={_kfmt(L)}", T_ATTN_PREFILL)


def cases_indexer(ctx: Ctx):
    """Lightning-indexer decode: one query per sequence scores its ctx // 4 entries, top-k."""
    K, sh, dev = ctx.K, ctx.sh, ctx.dev
    Hi, Di, bs, topk = sh.idx_heads, sh.idx_dim, sh.block_size, sh.topk
    torch.manual_seed(2)
    for L in sh.contexts:
        for B in sh.batches:
            S = L // sh.csa_ratio
            per = -(-S // bs)
            nb = B * per + 1
            if too_big(ctx, "indexer", f"B={B} ctx={_kfmt(L)}", nb * bs * Di * 2):
                continue
            pool = randn(nb, bs, Di, dev=dev)
            table = torch.randperm(nb, device=dev)[:B * per].view(B, per).to(torch.int32)
            q = randn(B, Hi, Di, dev=dev)
            w = randn(B, Hi, dtype=torch.float32, dev=dev, scale=(Di * Hi) ** -0.5)
            tok_slot = torch.arange(B, device=dev)
            pos = torch.full((B,), L - 1, dtype=torch.long, device=dev)
            b = B * S * Di * pool.element_size() + nbytes(q) + nbytes(w) + 4 * B * per + 4 * B * topk
            flops = 2 * Hi * Di * S * B
            args = (q, w, pool, table, tok_slot, pos, sh.csa_ratio, topk)
            # max_visible = S: the host-side bound the model passes (a captured step passes the
            # cache's capacity), so neither side reads the positions back
            yield Case("indexer", f"B={B} ctx={_kfmt(L)} S={_kfmt(S)}", "decode",
                       lambda a=args, S=S: K.indexer.indexer_topk(*a, max_visible=S),
                       lambda a=args, S=S: ctx.ref.indexer_topk(*a, max_visible=S),
                       check_topk(), b, flops, "bf16", T_INDEXER)
            del pool, table, q, w, args


def cases_compress(ctx: Ctx):
    """Compressor prefill of one sequence: CSA main (ratio 4, overlapping, fp8), HCA (ratio 128,
    fp8), indexer keys (ratio 4, overlapping, fp4); pool in bf16, state and inputs in fp32. Then
    each in its decode form (`DecodeRows`, the CUDA-graph path) for every decode batch size."""
    K, sh, dev = ctx.K, ctx.sh, ctx.dev
    from v4.ops import CompressSpec, DecodeRows
    from v4.config import ModelConfig, yarn_inv_freq

    rope = 64
    inv = yarn_inv_freq(rope, 160000.0, ModelConfig().rope_scaling).to(dev, torch.float32)
    T, bs = sh.compress_tokens, sh.block_size
    torch.manual_seed(3)
    for label, m, c, overlap, quant in (("csa", sh.csa_ratio, sh.head_dim, True, "fp8"),
                                        ("hca", sh.hca_ratio, sh.head_dim, False, "fp8"),
                                        ("indexer", sh.csa_ratio, sh.compress_idx_dim, True, "fp4")):
        spec = CompressSpec(m, c, overlap, quant, rope, 1e-6)
        k = 2 if overlap else 1
        E = T // m
        per = -(-(E + 1) // bs)
        kv = randn(T, k * c, dtype=torch.float32, dev=dev)
        score = randn(T, k * c, dtype=torch.float32, dev=dev, scale=2.0)
        ape = randn(m, k * c, dtype=torch.float32, dev=dev, scale=0.5)
        norm_w = 1.0 + randn(c, dtype=torch.float32, dev=dev, scale=0.1)
        table = torch.randperm(per + 2, device=dev)[:per].view(1, per).to(torch.int32)
        seqs = [(0, 0, T, 0)]
        st = {side: (torch.zeros(1, k * m, k * c, device=dev), torch.zeros(1, k * m, k * c, device=dev),
                     torch.zeros(per + 2, bs, c, dtype=torch.bfloat16, device=dev)) for side in ("cuda", "ref")}
        rows_written = (m if overlap else 0) + (T % m)
        b = 2 * 4 * T * k * c + nbytes(ape) + 2 * E * c * 2 + 2 * 4 * rows_written * k * c + nbytes(norm_w)

        def run(fn, side, spec=spec, kv=kv, score=score, ape=ape, norm_w=norm_w, table=table, seqs=seqs, st=st):
            skv, sz, pool = st[side]
            return fn(kv, score, ape, spec, norm_w, inv, skv, sz, pool, table, seqs)

        def check(got, ref, st=st, base=check_quantized(2 ** -7, 1e-3, 0.01)):
            ok, text, m_ = base(got, ref)
            ok_p, _, mp = base(st["cuda"][2], st["ref"][2])
            same_state = all(torch.equal(st["cuda"][i], st["ref"][i]) for i in (0, 1))
            m_.update({"pool_frac_off": mp.get("frac_off"), "state_equal": same_state})
            return ok and ok_p and same_state, text + ("" if same_state else " STATE"), m_

        yield Case("compress", f"{label} m={m} c={c} {quant} T={_kfmt(T)}", "prefill",
                   lambda run=run: run(K.compress.compress, "cuda"), lambda run=run: run(ctx.ref.compress, "ref"),
                   check, b, 0.0, "fp32", T_ELEMENTWISE)
        del kv, score, ape, st
        # decode (the captured form, DecodeRows): B sequences, one token each, every other one
        # closing its window at this token; the rest go mid-window
        for B in sh.batches:
            pos = torch.tensor([(1000 + i) * m + (m - 1 if i % 2 == 0 else i % m) for i in range(B)], device=dev)
            rows = DecodeRows(torch.arange(B, device=dev), pos)
            n_close = (B + 1) // 2
            per = int(pos.max()) // m // bs + 1
            table = torch.randperm(B * per, device=dev).view(B, per).to(torch.int32)
            kv = randn(B, k * c, dtype=torch.float32, dev=dev)
            score = randn(B, k * c, dtype=torch.float32, dev=dev, scale=2.0)
            ape = randn(m, k * c, dtype=torch.float32, dev=dev, scale=0.5)
            init = randn(B, k * m, k * c, dtype=torch.float32, dev=dev)
            st = {side: (init.clone(), init.clone() * 0.5, torch.zeros(B * per, bs, c, dtype=torch.bfloat16, device=dev))
                  for side in ("cuda", "ref")}
            # read kv + score rows; closing rows read their k*m state rows (kv + score) and write the
            # pool row and the returned row; every row writes state: one row, or m rows on closing (overlap)
            b = (2 * 4 * B * k * c + n_close * (2 * 4 * k * m * k * c + 2 * c * 2)
                 + 2 * 4 * k * c * ((B - n_close) + n_close * (m if overlap else 0)))

            def run(fn, side, spec=spec, kv=kv, score=score, ape=ape, norm_w=norm_w, table=table, rows=rows, st=st):
                skv, sz, pool = st[side]
                return fn(kv, score, ape, spec, norm_w, inv, skv, sz, pool, table, rows)

            def check(got, ref, st=st, base=check_quantized(2 ** -7, 1e-3, 0.01)):
                ok, text, m_ = base(got, ref)
                same_state = all(torch.equal(st["cuda"][i], st["ref"][i]) for i in (0, 1))
                m_["state_equal"] = same_state
                return ok and same_state, text + ("" if same_state else " STATE"), m_

            yield Case("compress", f"{label} decode m={m} B={B} (1 launch)", "decode",
                       lambda run=run: run(K.compress.compress, "cuda"), lambda run=run: run(ctx.ref.compress, "ref"),
                       check, b, 0.0, "fp32", None)
            del kv, score, ape, st, init


def _hc_tokens(sh: Shapes) -> list:
    return list(sh.batches) + [sh.prefill_tokens]


def cases_hc_pre(ctx: Ctx):
    K, sh, dev = ctx.K, ctx.sh, ctx.dev
    n, D = sh.hc_n, sh.hidden
    torch.manual_seed(4)
    rows = (2 + n) * n
    fn = randn(rows, n * D, dtype=torch.float32, dev=dev, scale=(n * D) ** -0.5)
    base = randn(rows, dtype=torch.float32, dev=dev, scale=0.5)
    scale = torch.tensor([1.0, 1.0, 1.0], device=dev)
    for T in _hc_tokens(sh):
        X = randn(T, n, D, dev=dev)
        b = nbytes(X) + nbytes(fn) + T * D * X.element_size() + 4 * T * (n + n * n)
        flops = 2 * T * rows * n * D + 4 * T * n * D
        args = (X, fn, base, scale, 20, 1e-6, 1e-6)
        yield Case("hc_pre", f"T={T} n={n} D={D}", "decode" if T < sh.prefill_tokens else "prefill",
                   lambda a=args: K.mhc.hc_pre(*a), lambda a=args: ctx.ref.hc_pre(*a),
                   check_close(1e-2), b, flops, "fp32", T_ELEMENTWISE)


def cases_hc_post(ctx: Ctx):
    K, sh, dev = ctx.K, ctx.sh, ctx.dev
    n, D = sh.hc_n, sh.hidden
    torch.manual_seed(5)
    for T in _hc_tokens(sh):
        X = randn(T, n, D, dev=dev)
        y = randn(T, D, dev=dev)
        post = torch.rand(T, n, device=dev) * 2
        comb = torch.softmax(torch.randn(T, n, n, device=dev), -1)
        b = nbytes(y) + 2 * nbytes(X) + nbytes(post) + nbytes(comb)
        args = (y, X, post, comb)
        yield Case("hc_post", f"T={T} n={n} D={D}", "decode" if T < sh.prefill_tokens else "prefill",
                   lambda a=args: K.mhc.hc_post(*a), lambda a=args: ctx.ref.hc_post(*a),
                   check_close(1e-2), b, 2 * T * n * D * (n + 1), "fp32", T_ELEMENTWISE)


def cases_rms_norm(ctx: Ctx):
    K, sh, dev = ctx.K, ctx.sh, ctx.dev
    torch.manual_seed(6)
    for T in (sh.batches[-1], sh.prefill_tokens):
        for what, shape, weighted in (("q heads", (T, sh.heads, sh.head_dim), False), ("hidden", (T, sh.hidden), True)):
            x = randn(*shape, dev=dev)
            w = (1.0 + randn(shape[-1], dtype=torch.float32, dev=dev, scale=0.1)) if weighted else None
            b = 2 * nbytes(x) + nbytes(w)
            args = (x, w, 1e-6)
            yield Case("rms_norm", f"{what} {'x'.join(map(str, shape))}", "decode" if T < sh.prefill_tokens else "prefill",
                       lambda a=args: K.norm_rope.rms_norm(*a), lambda a=args: ctx.ref.rms_norm(*a),
                       check_close(1e-2), b, 0.0, "fp32", T_ELEMENTWISE)


def cases_rope(ctx: Ctx):
    K, sh, dev = ctx.K, ctx.sh, ctx.dev
    from v4.config import yarn_inv_freq

    torch.manual_seed(7)
    inv = yarn_inv_freq(64, 10000.0, None).to(dev, torch.float32)
    for T in (sh.batches[-1], sh.prefill_tokens):
        x = randn(T, sh.heads, sh.head_dim, dev=dev)
        pos = torch.randint(0, 1 << 17, (T,), device=dev)
        b = 2 * nbytes(x) + nbytes(pos) + nbytes(inv)
        args = (x, pos, inv)
        yield Case("rope", f"q {T}x{sh.heads}x{sh.head_dim}", "decode" if T < sh.prefill_tokens else "prefill",
                   lambda a=args: K.norm_rope.rope(*a), lambda a=args: ctx.ref.rope(*a),
                   check_close(1e-2), b, 0.0, "fp32", T_ELEMENTWISE)


def cases_gate(ctx: Ctx):
    K, sh, dev = ctx.K, ctx.sh, ctx.dev
    E, D, k = sh.experts, sh.hidden, sh.moe_topk
    torch.manual_seed(8)
    w = randn(E, D, dtype=torch.float32, dev=dev, scale=D ** -0.5)
    bias = randn(E, dtype=torch.float32, dev=dev, scale=0.1)
    for T in _hc_tokens(sh):
        x = randn(T, D, dev=dev)
        b = nbytes(x) + nbytes(w) + nbytes(bias) + 8 * T * k
        args = (x, w, bias, None, None, k, 1.5)
        yield Case("gate", f"T={T} E={E} D={D} top{k}", "decode" if T < sh.prefill_tokens else "prefill",
                   lambda a=args: K.gate.moe_gate(*a), lambda a=args: ctx.ref.moe_gate(*a),
                   check_gate(1e-4), b, 2 * T * E * D, "fp32", None)


def _moe_weights(ctx: Ctx):
    """Routed experts stored as FP4 (V4's format), their bf16 dequantisation (the bf16 grouped GEMM
    runs on these values too), a bf16 shared expert and an FP8 one (V4's shared expert format)."""
    K, sh, dev = ctx.K, ctx.sh, ctx.dev
    from v4 import quant

    E, D, I = sh.experts, sh.hidden, sh.moe_inter
    torch.manual_seed(9)
    bf = torch.bfloat16
    w13 = torch.empty(E, 2 * I, D, dtype=bf, device=dev)
    w2 = torch.empty(E, D, I, dtype=bf, device=dev)
    q1, q3, q2 = [], [], []
    for e in range(E):
        for lst, shape, dst in ((q1, (I, D), w13[e, :I]), (q3, (I, D), w13[e, I:]), (q2, (D, I), w2[e])):
            qw = quant.QuantizedWeight("fp4", *quant.quant_fp4(randn(*shape, dtype=torch.float32, dev=dev, scale=D ** -0.5)))
            dst.copy_(qw.dequantize(torch.float32))
            lst.append(qw)
    f13, f2 = K.gemm.prepare_experts(q1, q3, q2, bf, dev)
    del q1, q3, q2
    s1, s3, s2 = (randn(*s, dtype=torch.float32, dev=dev, scale=D ** -0.5) for s in ((I, D), (I, D), (D, I)))
    shared_bf = (torch.cat([s1, s3]).to(bf), s2.to(bf))
    qs = [quant.QuantizedWeight("fp8", *quant.quant_fp8_block(t)) for t in (s1, s3, s2)]
    p13, p2 = K.gemm.prepare_experts([qs[0]], [qs[1]], [qs[2]], bf, dev)
    shared_fp8 = (p13[0], p2[0])
    shared_fp8_ref = (torch.cat([qs[0].dequantize(), qs[1].dequantize()]).to(bf), qs[2].dequantize().to(bf))
    dense13 = K.gemm.CudaWeight("dense", w13, None, bf, I)
    dense2 = K.gemm.CudaWeight("dense", w2, None, bf, 0)
    return SimpleNamespace(w13=w13, w2=w2, dense13=dense13, dense2=dense2, f13=f13, f2=f2,
                           shared_bf=shared_bf, shared_bf_cuda=(K.gemm.CudaWeight("dense", shared_bf[0], None, bf, I),
                                                                K.gemm.CudaWeight("dense", shared_bf[1], None, bf, 0)),
                           shared_fp8=shared_fp8, shared_fp8_ref=shared_fp8_ref)


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
    K, sh, dev = ctx.K, ctx.sh, ctx.dev
    E, D, I, k = sh.experts, sh.hidden, sh.moe_inter, sh.moe_topk
    if ctx.moe_weights is None:
        ctx.moe_weights = _moe_weights(ctx)
    wts = ctx.moe_weights
    limit = 10.0
    torch.manual_seed(10)
    plan = ([(T, "decode") for T in sh.moe_decode] if fp4 else
            [(T, "prefill") for T in sh.moe_prefill] + [(T, "decode") for T in sh.moe_decode])
    for T, phase in plan:
        x = randn(T, D, dev=dev)
        ids = torch.rand(T, E, device=dev).topk(k, dim=1).indices.to(torch.int32)
        rw = torch.softmax(torch.randn(T, k, device=dev), -1) * 1.5
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
    from v4 import quant

    torch.manual_seed(11)
    fp8_mma = K.gemm._fp8_mma_default(torch.empty(0, device=dev))
    for name, (N, Kd) in sh.linear.items():
        qw = quant.QuantizedWeight("fp8", *quant.quant_fp8_block(randn(N, Kd, dtype=torch.float32, dev=dev, scale=Kd ** -0.5)))
        cw = K.gemm.prepare_linear(qw, torch.bfloat16, dev)
        rw = ctx.ref.prepare_linear(qw, torch.bfloat16)
        for M in sh.linear_tokens:
            x = randn(M, Kd, dev=dev)
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


# =================================================================================== running
def run_case(ctx: Ctx, case: Case) -> dict:
    a = ctx.args
    r = {"kernel": case.kernel, "case": case.label, "phase": case.phase, "bytes": case.bytes, "flops": case.flops,
         "peak": case.peak, "target": case.target.text() if case.target else None}
    with torch.inference_mode():
        got = case.run_cuda()
        try:
            ref = case.run_ref()
        except torch.cuda.OutOfMemoryError as e:  # the reference's gathers can be large
            ref, r["ref_error"] = None, f"reference out of memory: {str(e).splitlines()[0]}"
            torch.cuda.empty_cache()
        sync(ctx)
        if ref is not None:
            ok, text, metrics = case.check(got, ref)
            r.update(check_ok=bool(ok), check=text, metrics={k: v for k, v in metrics.items() if not k.startswith("_")})
        else:
            r.update(check_ok=None, check="no ref")
        del got, ref
        r["cuda_s"], r["cuda_s_min"] = bench(ctx, case.run_cuda, a.warmup, a.reps)
        if "ref_error" not in r:
            r["ref_s"], r["ref_s_min"] = bench(ctx, case.run_ref, a.ref_warmup, a.ref_reps)
            r["speedup"] = r["ref_s"] / r["cuda_s"]
    if ctx.hw is not None:
        hw, t = ctx.hw, r["cuda_s"]
        peak = hw[case.peak]
        r["gbps"] = case.bytes / t / 1e9
        r["pct_bw"] = case.bytes / t / hw["bw"]
        r["tflops"] = case.flops / t / 1e12
        r["pct_tf"] = case.flops / t / peak
        r["pct_roof"] = max(case.bytes / hw["bw"], case.flops / peak) / t
        r["roof_bound"] = "memory" if case.bytes / hw["bw"] >= case.flops / peak else "compute"
        if hw.get("copy_bw"):
            r["pct_copy_bw"] = case.bytes / t / hw["copy_bw"]
        if case.target:
            val = {"bw": r["pct_bw"], "tf": r["pct_tf"], "roof": r["pct_roof"]}[case.target.metric]
            r["target_pass"] = val >= case.target.frac
            # the most the target metric can reach at this shape under the roofline
            cap = {"bw": case.bytes / hw["bw"], "tf": case.flops / peak}.get(case.target.metric)
            if cap is not None:
                r["target_cap"] = cap / max(case.bytes / hw["bw"], case.flops / peak)
    return r


def compile_case(ctx: Ctx, case: Case) -> dict:
    """--compile-only: one run of the CUDA op (compiling what it launches), wall time incl. compile."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        case.run_cuda()
        sync(ctx)
    return {"kernel": case.kernel, "case": case.label, "phase": case.phase, "bytes": case.bytes, "flops": case.flops,
            "peak": case.peak, "target": None, "check_ok": None, "check": "compile only", "first_run_s": time.perf_counter() - t0}


HDR_GPU = (f"{'kernel':<13} {'case':<40} {'MB':>9} {'GFLOP':>9} {'cuda ms':>9} {'ref ms':>9} {'speedup':>8} "
           f"{'GB/s':>7} {'%BW':>6} {'%copy':>6} {'TF/s':>7} {'%TF':>6} {'%roof':>6}  {'check':<8} {'error':<27} target")
HDR_SMOKE = (f"{'kernel':<13} {'case':<40} {'MB':>9} {'GFLOP':>9} {'cuda ms':>9} {'ref ms':>9} {'speedup':>8}  "
             f"{'check':<8} {'error':<27} target (not judged in smoke mode)")


def _g(v: float) -> str:
    """Compact magnitude for the MB / GFLOP columns (12900, 3.14, 0.0123)."""
    if v == 0:
        return "0"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def fmt_row(r: dict, smoke: bool) -> str:
    def num(k, f, w):
        v = r.get(k)
        return f"{v:{w}{f}}" if isinstance(v, (int, float)) else f"{'-':>{w}}"

    head = f"{r['kernel']:<13} {r['case'][:40]:<40} {_g(r['bytes'] / 1e6):>9} {_g(r['flops'] / 1e9):>9} "
    if "error" in r:
        return head + f"ERROR: {r['error']}"
    ms = lambda k: (f"{r[k] * 1e3:9.3f}" if k in r else f"{'-':>9}")  # noqa: E731
    sp = f"{r['speedup']:7.1f}x" if "speedup" in r else f"{'-':>8}"
    chk = {True: "OK", False: "MISMATCH", None: "-"}[r.get("check_ok")]
    line = head + f"{ms('cuda_s')} {ms('ref_s')} {sp} "
    if not smoke:
        pct = lambda k: (f"{r[k] * 100:5.1f}%" if k in r else f"{'-':>6}")  # noqa: E731
        line += (f"{num('gbps', '.0f', 7)} {pct('pct_bw')} {pct('pct_copy_bw')} {num('tflops', '.1f', 7)} "
                 f"{pct('pct_tf')} {pct('pct_roof')} ")
    line += f" {chk:<8} {r.get('check', '')[:27]:<27} "
    if r.get("target"):
        if smoke:
            line += f"({r['target']})"
        else:
            line += f"{'PASS' if r.get('target_pass') else 'MISS'} {r['target']}"
            cap = r.get("target_cap")
            if cap is not None and cap < 0.999:
                line += f" [roofline caps this metric at {cap * 100:.0f}% here]"
    if r.get("ref_error"):
        line += f"  ({r['ref_error']})"
    return line


# =================================================================================== whole model
def model_bench(ctx: Ctx) -> dict:
    """Whole-model decode, same device, same weights, each run through the engine (one `v4.engine.LLM`
    per variant over the same prompts): the reference backend, the cuda backend launching every
    kernel from Python ("cuda eager", graphs="off"), and the cuda backend replaying one captured CUDA
    graph per decode step ("cuda graphs", graphs="on" with one bucket of the batch size; emulated in
    --smoke without a GPU).

    Per batch size B: B requests of `--model-context` prompt tokens go into each LLM (max_num_seqs=B,
    a token budget of B x context, so the prefill is one packed step), then the variants take
    decode steps in turn (`LLM.step()`, rotating who goes first). Every variant is fed the
    reference's greedy tokens: after each step the token a variant picked is counted against the
    reference's pick and then replaced by it (the request's last output id), so one near-tie does
    not make the rest of the run disagree and the last step's logits stay comparable."""
    a = ctx.args
    from v4 import runtime
    from v4.config import RuntimeConfig
    from v4.engine import LLM, SamplingParams
    from v4.errors import BackendUnavailable

    cfg_name = a.model_config or ("tiny" if ctx.smoke else "small")
    dev = str(ctx.dev)
    res = {"config": cfg_name, "device": dev, "rows": [], "notes": []}
    loaded = {}
    for backend in ("reference", "cuda"):
        ov = {"backend": backend, "device": dev, "dtype": a.model_dtype}
        t0 = time.perf_counter()
        try:
            L = runtime.load(config=cfg_name, overrides=ov, seed=a.seed, progress=False)
        except BackendUnavailable as e:
            if backend == "reference":
                raise
            ov["allow_fallback"] = True
            L = runtime.load(config=cfg_name, overrides=ov, seed=a.seed, progress=False)
            res["notes"].append(f"cuda backend loaded with runtime.allow_fallback: {e}")
        loaded[backend] = L
        fb = tuple(getattr(L.model.ops, "fallback", ()))
        log(f"model '{cfg_name}' on backend {backend} ({dev}"
            + (f"; from reference: {', '.join(fb)}" if fb else "")
            + f"), dtype {L.runtime.dtype}, mode {L.runtime.mode}, loaded in {time.perf_counter() - t0:.1f}s")
    fb = tuple(getattr(loaded["cuda"].model.ops, "fallback", ()))
    res["cuda_fallback_ops"] = list(fb)
    if fb:
        res["notes"].append(f"ops of the cuda run that came from the reference backend: {', '.join(fb)}")
    graphs_ok = getattr(loaded["cuda"].model.ops, "capturable", False)
    if not graphs_ok:
        res["notes"].append("the cuda run has reference ops filled in, which cannot be captured: no 'cuda graphs' column")
    res["graph_mode"] = None
    cfg = loaded["reference"].cfg
    res["layers"] = cfg.num_hidden_layers
    ctx_len, steps, warm = a.model_context, a.model_steps, a.model_warmup
    batches = [int(b) for b in a.model_batches.split(",")] if a.model_batches else ([1, 2] if ctx.smoke else [1, 8])
    res.update(context=ctx_len, steps=steps, warmup=warm, dtype=loaded["cuda"].runtime.dtype)
    variants = [("ref", "reference", "off"), ("cuda", "cuda", "off")] + ([("graphs", "cuda", "on")] if graphs_ok else [])

    def rows_of(s) -> list[int]:
        """Batch row of each of the variant's requests (in s.rids order) in the last step's logits."""
        order = [rid for rid, _, _ in s.llm.last_step.scheduled]
        return [order.index(r) for r in s.rids]

    def step(s):
        """One engine step; returns (logits [B, V] in request order, greedy picks in request order, seconds)."""
        sync(ctx)
        t0 = time.perf_counter()
        outs = s.llm.step()  # the sampler's greedy pick and its .tolist() are in the step (and sync)
        sync(ctx)
        dt = time.perf_counter() - t0
        picked = {o.request_id: o.new_token_ids[0] for o in outs if o.new_token_ids}
        if sorted(picked) != sorted(s.rids):
            raise RuntimeError(f"an engine step gave tokens for requests {sorted(picked)}, expected {sorted(s.rids)}")
        return s.llm.last_step.logits[rows_of(s)], [picked[r] for r in s.rids], dt

    def force(s, toks):
        """Feed the reference's tokens: replace each request's last pick before the next step."""
        for seq, t in zip(s.seqs, toks):
            seq.output_ids[-1] = t

    g = torch.Generator().manual_seed(a.seed)
    with torch.inference_mode():
        for B in batches:
            ids = torch.randint(2, cfg.vocab_size, (B, ctx_len), generator=g).tolist()
            # prefill's token + one per step + one profiled step (kernels per step)
            params = SamplingParams(max_tokens=warm + steps + 2, ignore_eos=True)
            st = {}
            for key, backend, graphs in variants:
                m = loaded[backend].model
                rt = RuntimeConfig(max_num_seqs=B, max_num_batched_tokens=B * ctx_len,
                                   max_model_len=ctx_len + warm + steps + 2)
                llm = LLM(m, rt, graphs=graphs, buckets=[B] if graphs == "on" else None)
                if graphs == "on":
                    res["graph_mode"] = llm.runner.graph_mode
                s = SimpleNamespace(llm=llm, rids=[llm.add_request(p, params) for p in ids], times=[])
                s.seqs = [llm.sequence(r) for r in s.rids]  # (the engine lets go of a request once it finishes)
                first, picks, s.prefill_s = step(s)  # the whole prefill is one packed step
                s.first = (first, picks)
                s.capture_s = 0.0
                if llm.runner.graphs is not None:
                    t0 = time.perf_counter()
                    llm.runner.graphs.capture_all()  # warm-up (Triton JIT) + capture, outside the timed steps
                    sync(ctx)
                    s.capture_s = time.perf_counter() - t0
                st[key] = s
            toks = st["ref"].first[1]
            for key, s in st.items():
                force(s, toks)
            agree = {k: 0 for k in st if k != "ref"}
            last = {}
            for i in range(warm + steps):
                keys = list(st)
                keys = keys[i % len(keys):] + keys[:i % len(keys)]  # rotate who goes first
                outs = {}
                for key in keys:
                    s = st[key]
                    o, nl, dt = step(s)
                    outs[key] = (o.double().cpu() if i == warm + steps - 1 else None, nl)
                    if i >= warm:
                        s.times.append(dt)
                for k in agree:
                    if i >= warm:
                        agree[k] += sum(x == y for x, y in zip(outs[k][1], outs["ref"][1]))
                toks = outs["ref"][1]  # every variant is fed the reference's greedy tokens
                if i < warm + steps - 1:
                    for key, s in st.items():
                        force(s, toks)
                else:
                    orf = outs["ref"][0]
                    last = {k: float((outs[k][0] - orf).abs().max()) for k in agree}
                    last["scale"] = float(orf.abs().max())
            row = {"batch": B, "context": ctx_len}
            if ctx.gpu:
                force_all = toks
                for key, s in st.items():
                    force(s, force_all)
                    try:
                        row[f"{key}_kernels"] = kernels_in_step(lambda s=s: step(s))
                    except Exception as e:  # noqa: BLE001 - the count is a diagnostic, not the benchmark
                        res["notes"].append(f"kernel count of {key} failed: {type(e).__name__}: {e}")
            else:
                for s in st.values():
                    step(s)
            for key, s in st.items():
                if s.llm.has_unfinished():
                    res["notes"].append(f"batch {B}, {key}: requests still unfinished after the timed steps (a bench bug)")
                med = statistics.median(s.times)
                row[f"{key}_ms"] = med * 1e3
                row[f"{key}_tok_s"] = B / med
                row[f"{key}_prefill_s"] = s.prefill_s
                row[f"{key}_preemptions"] = s.llm.stats.num_preemptions
            if "graphs" in st:
                row["graphs_capture_s"] = st["graphs"].capture_s
            for k in agree:
                row[f"{k}_ratio"] = row[f"{k}_tok_s"] / row["ref_tok_s"]
                row[f"{k}_agree"] = agree[k]
                row[f"{k}_last_logits_max_abs_diff"] = last[k]
            row.update(agree_of=steps * B, last_logits_max_abs=last["scale"])
            res["rows"].append(row)
            del st
            gc.collect()
            if ctx.gpu:
                torch.cuda.empty_cache()
    return res


def kernels_in_step(fn) -> int:
    """GPU kernels one call of fn launches (torch.profiler / CUPTI; kernels inside a replayed CUDA
    graph are counted one by one), memcpy / memset excluded."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    n = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not any(w in e.name.lower() for w in ("memcpy", "memset")):
            n += 1
    return n


def report_model(ctx: Ctx, res: dict) -> None:
    log("")
    log(f"whole-model decode: config '{res['config']}', {res['dtype']}, device {res['device']}, prefill "
        f"{res['context']} tokens per sequence, then {res['steps']} timed single-token steps after {res['warmup']} "
        f"warm-up (median ms/step of LLM.step(), wall clock incl. scheduling, the host's step bookkeeping and the greedy pick; 'graphs' = "
        f"the cuda backend replaying captured CUDA graphs"
        + (", emulated here: no GPU, so the same static-buffer path runs eagerly under HostSyncGuard" if res.get("graph_mode") == "emulate" else "")
        + "; ratios are against the reference backend on the same device, agreement = greedy picks equal to the reference's)")
    cols = [k for k in ("cuda", "graphs") if any(f"{k}_ms" in r for r in res["rows"])]
    hdr = f"{'batch':>5} | {'ref ms':>8} | " + " | ".join(
        f"{k + ' ms':>10} {'x ref':>6} {'agree':>9} {'|dlogit|':>9}" for k in cols) + f" | target: graphs >={TARGET_MODEL_RATIO:g}x ref"
    log(hdr)
    log("-" * len(hdr))
    for r in res["rows"]:
        line = f"{r['batch']:>5} | {r['ref_ms']:8.2f} | " + " | ".join(
            f"{r[k + '_ms']:10.2f} {r[k + '_ratio']:5.2f}x {r[k + '_agree']:>4}/{r['agree_of']:<4} "
            f"{r[k + '_last_logits_max_abs_diff']:9.2e}" for k in cols)
        key = "graphs_ratio" if "graphs_ratio" in r else "cuda_ratio"
        verdict = "(smoke)" if ctx.smoke else ("PASS" if r[key] >= TARGET_MODEL_RATIO else "MISS")
        line += f" | {verdict}"
        if "graphs_capture_s" in r:
            line += f" (capture {r['graphs_capture_s']:.2f}s)"
        kern = r.get("cuda_kernels")
        if kern:
            line += (f" | kernels/step {kern} ({kern / res['layers']:.1f}/layer; graphs {r.get('graphs_kernels', '-')}, "
                     f"ref {r.get('ref_kernels', '-')}), eager {r['cuda_ms'] * 1e3 / kern:.1f} us/kernel")
        log(line)
    for n in res["notes"]:
        log(f"note: {n}")


# =================================================================================== reports
NOTES = [
    "bytes = unique bytes the op must move (module docstring); implementation scratch round trips "
    "(indexer fp32 score matrix, attention split-KV partials, MoE per-pair rows, mHC split-K partials) are not counted",
    "indexer keys are bf16 in the pool (256 B/entry); the spec's FP8 key layout would be 132 B/entry",
    "attention_fp8 / moe_fp4 reference = the reference op on the dequantised (bf16-exact) values",
]


def _driver_version() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def write_reports(args, doc: dict) -> None:
    if args.json:
        text = json.dumps(doc, indent=2, default=str)
        if args.json == "-":
            if not doc["partial"]:
                print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(doc))


def _pct(v) -> str:
    return f"{v * 100:.1f}" if isinstance(v, (int, float)) else "-"


def _num(v, f: str) -> str:
    return f"{v:{f}}" if isinstance(v, (int, float)) else "-"


def markdown(doc: dict) -> str:
    """The kernel table and the whole-model table as Markdown (what bench/results/ keeps)."""
    hw = doc.get("hardware") or {}
    out = [f"# CUDA backend on {doc['device']}", "",
           f"`{doc['command']}`", "",
           f"torch {doc['torch']} (CUDA {doc.get('cuda')}), triton {doc['triton']}, driver {doc.get('driver')}; "
           f"timing: {doc['timing']['clock']}, median of {doc['timing']['reps']} after {doc['timing']['warmup']} warm-up"
           + (", L2 flushed before each run" if doc["timing"]["l2_flush"] else "") + "."]
    if hw:
        out += ["", f"Roofline: HBM {hw['bw'] / 1e12:.2f} TB/s peak ({hw['table']} datasheet), measured copy "
                f"{hw.get('copy_bw', 0) / 1e12:.2f} TB/s; bf16 {hw['bf16'] / 1e12:.0f} TF, fp8 {hw['fp8'] / 1e12:.0f} TF, "
                f"fp32 {hw['fp32'] / 1e12:.0f} TF. %BW = bytes / time / peak HBM, %copy = the same against the "
                f"measured copy bandwidth, %TF = FLOPs / time / peak of the unit, %roof = max(bytes / BW, FLOPs / peak) / time."]
    if doc.get("partial"):
        out += ["", "**Partial: the run was cut short after the rows below.**"]
    out += ["", "| kernel | case | phase | MB | GFLOP | cuda ms | ref ms | x ref | GB/s | %BW | %copy | TF/s | %TF | %roof | check | target |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in doc["rows"]:
        if "error" in r:
            out.append(f"| {r['kernel']} | {r['case']} | {r.get('phase', '')} | | | | | | | | | | | | ERROR | {r['error'][:120]} |")
            continue
        chk = {True: "OK", False: "MISMATCH", None: "-"}[r.get("check_ok")] + f" ({r.get('check', '')})"
        tgt = ""
        if r.get("target"):
            tgt = ("PASS " if r.get("target_pass") else "MISS ") + r["target"] if "target_pass" in r else r["target"]
            if r.get("target_cap") is not None and r["target_cap"] < 0.999:
                tgt += f"; roofline caps it at {r['target_cap'] * 100:.0f}%"
        out.append(f"| {r['kernel']} | {r['case']} | {r['phase']} | {_g(r['bytes'] / 1e6)} | {_g(r['flops'] / 1e9)} | "
                   f"{_num(r.get('cuda_s', 0) * 1e3, '.3f')} | {_num(r['ref_s'] * 1e3, '.3f') if 'ref_s' in r else '-'} | "
                   f"{_num(r.get('speedup'), '.1f')} | {_num(r.get('gbps'), '.0f')} | {_pct(r.get('pct_bw'))} | "
                   f"{_pct(r.get('pct_copy_bw'))} | {_num(r.get('tflops'), '.1f')} | {_pct(r.get('pct_tf'))} | "
                   f"{_pct(r.get('pct_roof'))} | {chk} | {tgt} |")
    for k, label, why in doc.get("skipped", []):
        out.append(f"| {k} | {label} | | | | | | | | | | | | | skipped | {why} |")
    m = doc.get("model")
    if m and "rows" in m:
        cols = [k for k in ("cuda", "graphs") if any(f"{k}_ms" in r for r in m["rows"])]
        out += ["", f"## Whole-model decode: `{m['config']}`, {m['dtype']}, prompt {m['context']} tokens, "
                f"median of {m['steps']} steps", "",
                "| batch | ref ms/step | " + " | ".join(f"{k} ms/step | {k} x ref | {k} agree" for k in cols)
                + " | kernels/step (eager cuda) | kernels/layer | us/kernel |",
                "|---:|---:|" + "---:|---:|---:|" * len(cols) + "---:|---:|---:|"]
        for r in m["rows"]:
            cells = " | ".join(f"{r[k + '_ms']:.2f} | {r[k + '_ratio']:.2f} | {r[k + '_agree']}/{r['agree_of']}" for k in cols)
            kern = r.get("cuda_kernels")
            per_layer = f"{kern / m['layers']:.1f}" if kern and m.get("layers") else "-"
            us = f"{r['cuda_ms'] * 1e3 / kern:.1f}" if kern else "-"
            out.append(f"| {r['batch']} | {r['ref_ms']:.2f} | {cells} | {kern or '-'} | {per_layer} | {us} |")
        for n in m.get("notes", []):
            out.append(f"\nNote: {n}")
    elif m:
        out += ["", f"Whole-model decode: ERROR {m.get('error')}"]
    out += [""] + [f"- {n}" for n in doc.get("notes", [])]
    return "\n".join(out) + "\n"


# =================================================================================== main
def load_kernels() -> tuple[SimpleNamespace, dict]:
    """Import the kernel modules (after TRITON_INTERPRET is settled); a module that fails to import
    (e.g. one being edited) disables only its kernels."""
    import importlib

    mods, broken = {}, {}
    for m in sorted(set(MODULE_OF.values())):
        try:
            mods[m] = importlib.import_module(f"backends.cuda.kernels.{m}")
        except Exception as e:  # noqa: BLE001
            broken[m] = f"{type(e).__name__}: {e}"
    return SimpleNamespace(**mods), broken


def detect_hw(ctx_smoke: bool, gpu: bool) -> tuple[dict | None, str]:
    if not gpu:
        return None, f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    name = torch.cuda.get_device_name()
    hw = dict(H200 if "H200" in name else H100)
    hw["table"] = "H200" if "H200" in name else "H100 SXM"
    if not any(s in name for s in ("H100", "H200", "H800")):
        hw["warning"] = f"'{name}' is not an H100/H200: the H100 SXM figures are used as the roofline"
    return (None if ctx_smoke else hw), name


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="kernels: " + ", ".join(KERNELS) + ", model")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; without a GPU: CPU tensors under TRITON_INTERPRET=1, wall-clock timing")
    ap.add_argument("--only", default=None, help="comma-separated kernel names (and/or 'model'); default: all kernels and the model")
    ap.add_argument("--skip-model", action="store_true", help="do not run the whole-model decode")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON to PATH ('-' = stdout)")
    ap.add_argument("--markdown", default=None, metavar="PATH", help="write the tables as Markdown to PATH")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting kernel cases after this many seconds (the rest are listed as skipped), "
                         "keeping --model-reserve-s for the whole-model decode")
    ap.add_argument("--model-reserve-s", type=float, default=90.0, help="seconds of --budget-s kept for the model (default 90)")
    ap.add_argument("--compile-only", action="store_true",
                    help="run each CUDA case once (Triton compiles it into its cache; a fault shows here) without "
                         "checks, reference or timing: several of these side by side warm the cache for a timed run")
    ap.add_argument("--max-input-gb", type=float, default=24.0,
                    help="skip attention / indexer cases whose KV or key pool alone is larger (default 24)")
    ap.add_argument("--batches", default=None, help="decode batch sizes for attention / indexer / hc / gate (default Flash: 1,32,128)")
    ap.add_argument("--contexts", default=None, help="decode contexts for attention / indexer (default Flash: 8192,65536,1048576)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs of the CUDA op (median; default 20, smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3, smoke 0)")
    ap.add_argument("--ref-reps", type=int, default=None, help="timed runs of the reference op (default 5, smoke 1)")
    ap.add_argument("--ref-warmup", type=int, default=None, help="untimed reference runs first (default 1, smoke 0)")
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 (256 MB memset) before each timed run")
    ap.add_argument("--model-config", default=None, help="model config for the whole-model decode (default small; smoke: tiny)")
    ap.add_argument("--model-dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: the config's")
    ap.add_argument("--model-batches", default=None, help="decode batch sizes (default 1,8; smoke 1,2)")
    ap.add_argument("--model-context", type=int, default=None, help="prompt tokens per sequence (default 1024; smoke 40)")
    ap.add_argument("--model-steps", type=int, default=None, help="timed decode steps (default 32; smoke 3)")
    ap.add_argument("--model-warmup", type=int, default=None, help="untimed decode steps first (default 3; smoke 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: as is on a GPU machine; 1 without a GPU, where torch's "
                         "thread pool otherwise contends with the interpreter and inflates the reference's times)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sm = args.smoke
    defaults = dict(reps=(2, 20), warmup=(0, 3), ref_reps=(1, 5), ref_warmup=(0, 1),
                    model_context=(40, 1024), model_steps=(3, 32), model_warmup=(1, 3))
    for k, (s, full) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, s if sm else full)
    return args, ap


def main(argv=None) -> int:
    args, ap = parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        if not args.smoke:
            log("no CUDA GPU here: the benchmark needs one. `--smoke` checks the script at tiny shapes in "
                "Triton's interpreter on CPU.")
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    names = list(KERNELS) + ["model"]
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else names
    bad = [s for s in only if s not in names]
    if bad:
        ap.error(f"unknown name(s) {', '.join(bad)}; choose from {', '.join(names)}")
    run_model = "model" in only and not args.skip_model and not args.compile_only
    only = [s for s in only if s != "model"]

    sh = SMOKE if args.smoke else FLASH
    if args.batches:
        sh.batches = [int(x) for x in args.batches.split(",")]
    if args.contexts:
        sh.contexts = [int(x) for x in args.contexts.split(",")]
    dev = torch.device("cuda" if gpu else "cpu")
    t_start = time.perf_counter()
    K, broken = load_kernels()
    import triton

    from backends.reference.ops import ReferenceOps

    hw, hw_name = detect_hw(args.smoke, gpu)
    ctx = Ctx(args, args.smoke, gpu, dev, sh, hw, hw_name, K, ReferenceOps(dev))
    mode = "smoke (tiny shapes" + (", Triton interpreter on CPU tensors, wall clock)" if not gpu else ", GPU, CUDA events)")
    log(f"dsv4 CUDA kernels vs reference -- {mode if args.smoke else 'V4-Flash shapes'}")
    log(f"device: {hw_name}; torch {torch.__version__}, triton {triton.__version__}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, threads {torch.get_num_threads()}")
    if gpu:
        if not args.no_flush:
            ctx.flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        if hw is not None:
            hw["copy_bw"] = copy_bandwidth(ctx)
            log(f"roofline: {hw['table']} figures, HBM {hw['bw'] / 1e12:.2f} TB/s (measured copy "
                f"{hw['copy_bw'] / 1e12:.2f} TB/s), bf16 {hw['bf16'] / 1e12:.0f} TF, fp8 {hw['fp8'] / 1e12:.0f} TF, "
                f"fp32 CUDA-core {hw['fp32'] / 1e12:.0f} TF")
            if "warning" in hw:
                log(f"warning: {hw['warning']}")
    log(f"timing: {'CUDA events' if gpu else 'wall clock'}, median of {args.reps} (cuda) / {args.ref_reps} (reference) "
        f"after {args.warmup} / {args.ref_warmup} warm-up"
        + (", L2 flushed before each timed run" if gpu and ctx.flush is not None else ""))
    for m, why in broken.items():
        log(f"warning: backends.cuda.kernels.{m} does not import ({why}); its kernels are skipped")

    rows, errors, mismatches = [], 0, 0
    smoke = args.smoke
    log("")
    log(HDR_SMOKE if smoke else HDR_GPU)
    log("-" * len(HDR_SMOKE if smoke else HDR_GPU))
    doc = {"mode": "smoke" if smoke else "full", "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
           "device": hw_name, "hardware": hw, "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "driver": _driver_version() if gpu else None, "interpreter": not gpu,
           "timing": {"reps": args.reps, "warmup": args.warmup, "ref_reps": args.ref_reps,
                      "ref_warmup": args.ref_warmup, "l2_flush": gpu and ctx.flush is not None,
                      "clock": "cuda events" if gpu else "wall"},
           "shapes": {k: v for k, v in vars(sh).items()}, "rows": rows, "skipped": ctx.skipped, "model": None,
           "notes": NOTES, "partial": True}
    kernel_deadline = None if args.budget_s is None else t_start + args.budget_s - (args.model_reserve_s if run_model else 0)
    for name in only:
        if kernel_deadline is not None and time.perf_counter() > kernel_deadline:
            ctx.skipped.append((name, "all cases", "--budget-s reached"))
            continue
        if MODULE_OF[name] in broken:
            r = {"kernel": name, "case": "-", "bytes": 0, "flops": 0, "error": f"module does not import: {broken[MODULE_OF[name]]}"}
            rows.append(r)
            errors += 1
            log(fmt_row(r, smoke))
            continue
        t_k = time.perf_counter()
        gen = KERNELS[name](ctx)
        while True:
            if kernel_deadline is not None and time.perf_counter() > kernel_deadline:
                ctx.skipped.append((name, "remaining cases", "--budget-s reached"))
                break
            try:
                case = next(gen)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - building inputs failed: report, go on with the next kernel
                r = {"kernel": name, "case": "(building inputs)", "bytes": 0, "flops": 0, "error": f"{type(e).__name__}: {e}"}
                rows.append(r)
                errors += 1
                log(fmt_row(r, smoke))
                traceback.print_exc()
                break
            try:
                r = compile_case(ctx, case) if args.compile_only else run_case(ctx, case)
            except Exception as e:  # noqa: BLE001
                r = {"kernel": name, "case": case.label, "bytes": case.bytes, "flops": case.flops,
                     "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
                errors += 1
                traceback.print_exc()
            if r.get("check_ok") is False:
                mismatches += 1
            rows.append(r)
            log(fmt_row(r, smoke))
            write_reports(args, doc)  # after every case: a run cut short still leaves its figures
            del case
        del gen
        ctx.notes.append(f"{name}: {time.perf_counter() - t_k:.1f}s")
        if not any(n in ("moe", "moe_fp4") for n in only[only.index(name) + 1:]):
            ctx.moe_weights = None  # ~17 GB at Flash shapes: keep only while a MoE kernel is still to come
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    ctx.moe_weights = None
    gc.collect()

    if not smoke:
        log("")
        for n in NOTES:
            log(f"note: {n}")
    for k, label, why in ctx.skipped:
        log(f"skipped: {k} {label}: {why}")
    log("")
    log(f"cases: {len(rows)}, checks OK {sum(r.get('check_ok') is True for r in rows)}, MISMATCH {mismatches}, "
        f"errors {errors}; per kernel: {', '.join(ctx.notes)}")

    model_res = None
    if run_model:
        try:
            model_res = model_bench(ctx)
            report_model(ctx, model_res)
        except Exception as e:  # noqa: BLE001
            errors += 1
            traceback.print_exc()
            log(f"whole-model decode: ERROR {type(e).__name__}: {e}")
            model_res = {"error": f"{type(e).__name__}: {e}"}

    total = time.perf_counter() - t_start
    log(f"\ntotal wall time {total:.0f}s")
    doc.update(model=model_res, errors=errors, mismatches=mismatches, total_wall_s=total, partial=False)
    write_reports(args, doc)
    for path in (args.json, args.markdown):
        if path and path != "-":
            log(f"written: {path}")
    return 1 if errors or (smoke and mismatches) else 0


if __name__ == "__main__":
    sys.exit(main())
