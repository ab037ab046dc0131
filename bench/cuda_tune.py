"""Tiling sweeps of the CUDA kernels that miss their roofline targets, on a GPU, side by side.

For decode attention (bf16 and FP8 KV), the indexer's score kernel (and its top-k kernel, timed
apart) and the bf16 MoE grouped GEMM at V4-Flash shapes, every variant of the sweep is checked
against the default tiling's output and timed with CUDA events (median, L2 flushed before each
run); the table gives time, % of HBM bandwidth / of bf16 peak, and the ratio to the default.
Bytes and FLOPs follow bench/cuda_kernels.py.

    python bench/cuda_tune.py                          # all sweeps (needs a GPU)
    python bench/cuda_tune.py --warm-only --shard 3/8  # compile one eighth of the variants (Triton cache)
    python bench/cuda_tune.py --ncu-case attention     # the default tiling of one case, for ncu

Compiling every variant one after another would take minutes of a lent GPU: bench/gpu_check.sh
starts several `--warm-only` shards side by side first, then runs the timed sweep on a warm cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

HBM = 4.8e12  # H200 datasheet (bench/cuda_kernels.py reports the measured copy bandwidth too)
BF16_PEAK = 989e12
DEV = torch.device("cuda")

# V4-Flash shapes; --smoke swaps in SMOKE (tiny, CPU tensors in Triton's interpreter: checks the script)
FLASH = dict(H=64, d=512, W=128, ctx=65536, topk=512, att_batches=(128, 1), Hi=64, Di=128, bs=64,
             idx=((128, 1 << 20, 1 << 18), (32, 65536, 65536), (1, 1 << 20, 1 << 20)),  # (B, ctx, ctx when light)
             moe=dict(E=256, E_light=16, D=4096, I=2048, k=6, T=4096), max_variants=None)
SMOKE = dict(H=16, d=128, W=8, ctx=512, topk=16, att_batches=(3, 1), Hi=8, Di=32, bs=16,
             idx=((3, 2048, 2048), (1, 1024, 1024)), moe=dict(E=8, E_light=8, D=64, I=64, k=2, T=24), max_variants=3)
SH = FLASH


def randn(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


_FLUSH = None


def timeit(fn, reps: int = 20, warmup: int = 2) -> float:
    """Median seconds per call, timed as bench/cuda_kernels.py times (CUDA events, L2 flushed by a
    256 MB memset before each run; --smoke: one wall-clock run)."""
    global _FLUSH
    from cuda_kernels import bench  # bench/ is this script's directory, first on sys.path

    gpu = DEV.type == "cuda"
    if gpu and _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    return bench(SimpleNamespace(gpu=gpu, flush=_FLUSH), fn, warmup if gpu else 1, reps if gpu else 1)[0]


def _ctx(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else (f"{n >> 10}K" if n >= 1024 else str(n))


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# --------------------------------------------------------------------------------- the sweeps
def attention_cases(light: bool = False):
    """Decode at ctx 64K: CSA (128 window + 512 top-k rows) and HCA (128 + 512 entries), B = 128 and 1."""
    from backends.cuda.kernels import attention

    H, d, W, L, K = SH["H"], SH["d"], SH["W"], SH["ctx"], SH["topk"]
    big, small = SH["att_batches"]
    torch.manual_seed(1)
    sink = randn(H, dtype=torch.float32, scale=0.5)
    for fp8 in (False, True):
        for B, kind in ((big, "csa"), (big, "hca"), (small, "csa")):
            S = L // (4 if kind == "csa" else 128)
            q = randn(B, H, d)
            w_kv = randn(B * W + B, d)
            ar = torch.arange(B, device=DEV)[:, None]
            w_idx = torch.cat([B * W + ar, ar * W + torch.arange(W - 1, device=DEV)[None, :]], 1).to(torch.int32)
            c_kv = randn(B * S, d)
            picks = (torch.rand(B, S, device=DEV).topk(K, dim=1).indices if kind == "csa"
                     else torch.arange(S, device=DEV)[None, :].expand(B, S))
            c_idx = (ar * S + picks).to(torch.int32)
            n = w_idx.numel() + c_idx.numel()
            row = attention.row_bytes(d) if fp8 else 2 * d
            nbytes = 2 * q.numel() * 2 + n * row + 4 * n
            if fp8:
                wp, cp = attention.pack_fp8_kv(w_kv), attention.pack_fp8_kv(c_kv)
                def fn(q=q, wp=wp, w_idx=w_idx, cp=cp, c_idx=c_idx, **kw):
                    return attention.attention_fp8kv(q, wp, w_idx, cp, c_idx, sink, d ** -0.5, d, **kw)
            else:
                def fn(q=q, w_kv=w_kv, w_idx=w_idx, c_kv=c_kv, c_idx=c_idx, **kw):
                    return attention.attention(q, w_kv, w_idx, c_kv, c_idx, sink, d ** -0.5, **kw)
            variants = [{}]
            for bh in (16, 32, 64):
                for bk in (16, 32, 64):
                    for nw in (4, 8):
                        variants.append(dict(block_h=bh, block_k=bk, num_warps=nw, skip_empty=True))
                        for ns in (2, 3):
                            variants.append(dict(block_h=bh, block_k=bk, num_warps=nw, num_stages=ns, skip_empty=False))
            yield (f"attention{'_fp8' if fp8 else ''} {kind} B={B} ctx={_ctx(L)}", fn, variants, nbytes,
                   2 * H * 2 * d * n, "bw")


def indexer_cases(light: bool = False):
    """Score kernel variants (BLOCK_N, TILES, num_warps) at B x ctx, S = ctx / 4 bf16 keys of 128 dims."""
    from backends.cuda.kernels import indexer

    Hi, Di, bs, K = SH["Hi"], SH["Di"], SH["bs"], SH["topk"]
    torch.manual_seed(2)
    # light (--warm-only): 256K instead of 1M context at B = 128 compiles the same specializations
    for B, L_full, L_light in SH["idx"]:
        L = L_light if light else L_full
        S = L // 4
        per = -(-S // bs)
        pool = randn(B * per + 1, bs, Di)
        table = torch.randperm(B * per + 1, device=DEV)[:B * per].view(B, per).to(torch.int32)
        q = randn(B, Hi, Di)
        w = randn(B, Hi, dtype=torch.float32, scale=(Di * Hi) ** -0.5)
        slot = torch.arange(B, device=DEV, dtype=torch.int32)
        nvis = torch.full((B,), S, dtype=torch.int32, device=DEV)
        scores = torch.empty(B, S, dtype=torch.float32, device=DEV)
        out = torch.full((B, K), -1, dtype=torch.int32, device=DEV)
        nbytes = B * S * Di * 2 + q.numel() * 2 + w.numel() * 4 + 4 * B * per

        def score(cfg=None, pool=pool, q=q, w=w, table=table, slot=slot, nvis=nvis, scores=scores):
            orig = indexer.score_config
            if cfg:
                indexer.score_config = lambda *a, **k: cfg
            try:
                indexer._launch_scores(scores, q, w, pool, table, slot, nvis, fill=False)
            finally:
                indexer.score_config = orig
            return scores

        variants = [{}] + [dict(cfg=(bn, t, nw)) for bn in (32, 64, 128) for t in (1, 4, 16) for nw in (4, 8)]
        yield f"indexer scores B={B} ctx={_ctx(L)}", score, variants, nbytes, 2 * Hi * Di * S * B, "bw"
        yield (f"indexer top-k only B={B} ctx={_ctx(L)}", lambda scores=scores, nvis=nvis, out=out:
               (indexer._launch_topk(scores, nvis, out), out)[1], [{}], B * S * 4 + 4 * B * K, 0, "bw")


def moe_cases(light: bool = False):
    """bf16 routed experts (+ shared), T = 4096 tokens, top-6 of 256, D 4096, I 2048: (BN, BK, warps, stages)."""
    from backends.cuda.kernels import gemm

    # light (--warm-only): 16 experts give the same row tile (and so the same kernels) in 1/16 of the memory
    m = SH["moe"]
    E, D, inter, k, T = (m["E_light"] if light else m["E"]), m["D"], m["I"], m["k"], m["T"]
    torch.manual_seed(9)
    w13 = gemm.CudaWeight("dense", randn(E, 2 * inter, D, scale=D ** -0.5), None, torch.bfloat16, inter)
    w2 = gemm.CudaWeight("dense", randn(E, D, inter, scale=inter ** -0.5), None, torch.bfloat16, 0)
    sh = (gemm.CudaWeight("dense", randn(2 * inter, D, scale=D ** -0.5), None, torch.bfloat16, inter),
          gemm.CudaWeight("dense", randn(D, inter, scale=inter ** -0.5), None, torch.bfloat16, 0))
    x = randn(T, D)
    ids = torch.rand(T, E, device=DEV).topk(k, dim=1).indices.to(torch.int32)
    rw = torch.softmax(torch.randn(T, k, device=DEV), -1)

    def run(tiles=None):
        orig = gemm._tiles
        if tiles:
            gemm._tiles = lambda M, N, w, aq, soft: (M, *tiles)
        try:
            return gemm.moe_experts(x, ids, rw, w13, w2, sh, 10.0, False)
        finally:
            gemm._tiles = orig

    variants = [{}] + [dict(tiles=(bn, bk, nw, ns)) for bn in (64, 128, 256) for bk in (32, 64, 128)
                       for nw in (4, 8) for ns in (3, 4)]
    flops = 2 * 3 * D * inter * (T * k + T)
    yield f"moe bf16 T={T} E={E} top{k}", run, variants, E * 3 * D * inter * 2, flops, "tf"


SWEEPS = {"attention": attention_cases, "indexer": indexer_cases, "moe": moe_cases}


# --------------------------------------------------------------------------------- driver
def _label(v: dict) -> str:
    if not v:
        return "default"
    return " ".join(f"{k}={v[k]}" for k in v)


def sweep(names, shard=None, warm_only=False):
    rows = []
    i_variant = 0
    for name in names:
        for case, fn, variants, nbytes, flops, metric in SWEEPS[name](warm_only):
            if SH["max_variants"]:
                variants = variants[:SH["max_variants"]]
            with torch.inference_mode():
                ref = fn()
                sync()
                t_ref = None if warm_only else timeit(fn)
                for v in variants:
                    i_variant += 1
                    if shard and (i_variant % shard[1]) != shard[0]:
                        continue
                    r = {"case": case, "variant": _label(v), "bytes": nbytes, "flops": flops}
                    try:
                        got = fn(**v)
                        sync()
                        if warm_only:
                            continue
                        r["rel_vs_default"] = (
                            rel(got, ref) if got.dtype.is_floating_point else float((got != ref).float().mean())
                        )
                        t = timeit(lambda: fn(**v))
                        r.update(ms=t * 1e3, x_default=t_ref / t, pct_bw=nbytes / t / HBM, pct_tf=flops / t / BF16_PEAK)
                    except Exception as e:  # noqa: BLE001 - out of resources, compile errors: recorded
                        r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                    if not warm_only:
                        rows.append(r)
                        line = (f"{case:<36} {r['variant']:<58} " + (f"ERROR {r['error']}" if "error" in r else
                                f"{r['ms']:8.3f} ms {r['x_default']:5.2f}x  {r['pct_bw'] * 100:5.1f}% BW "
                                f"{r['pct_tf'] * 100:5.1f}% TF  diff {r['rel_vs_default']:.1e}"))
                        print(line, flush=True)
            del ref
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
    if not warm_only:
        print("\nbest per case (x = time of the default / time of the variant):")
        for case in dict.fromkeys(r["case"] for r in rows):
            ok = [r for r in rows if r["case"] == case and "ms" in r and r["rel_vs_default"] < 2e-2]
            if ok:
                b = min(ok, key=lambda r: r["ms"])
                print(f"  {case:<36} {b['variant']:<58} {b['ms']:8.3f} ms {b['x_default']:5.2f}x "
                      f"{b['pct_bw'] * 100:5.1f}% BW {b['pct_tf'] * 100:5.1f}% TF")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", default="attention,indexer,moe")
    ap.add_argument("--warm-only", action="store_true", help="run each variant once (compile), no timing")
    ap.add_argument("--shard", help="i/n: only every n-th variant, starting at i (with --warm-only)")
    ap.add_argument("--ncu-case", choices=list(SWEEPS), help="run the default tiling of the first case 3 times")
    ap.add_argument("--json")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes, 3 variants each; without a GPU in Triton's interpreter"
    )
    a = ap.parse_args(argv)
    global SH, DEV
    if a.smoke:
        SH = SMOKE
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before the kernels (and triton) are imported
            DEV = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("cuda_tune.py needs a CUDA GPU (--smoke checks the script in Triton's interpreter)")
        return 2
    if a.ncu_case:
        case, fn, *_ = next(iter(SWEEPS[a.ncu_case]()))
        with torch.inference_mode():
            for _ in range(3):
                fn()
            sync()
        print(f"ran {case} (default tiling) 3 times")
        return 0
    shard = tuple(int(x) for x in a.shard.split("/")) if a.shard else None
    t0 = time.perf_counter()
    rows = sweep([s for s in a.what.split(",") if s], shard, a.warm_only)
    print(f"{'warm-up' if a.warm_only else 'sweep'} done in {time.perf_counter() - t0:.0f}s")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
