"""Running one case of bench/cuda_kernels.py: timing (CUDA events, L2 flush), the check against the
reference, and the roofline figures of the result row."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from cuda_kernels_cases import Case, Ctx


def log(msg: str = "") -> None:
    print(msg, flush=True)


def sync(ctx: Ctx) -> None:
    if ctx.gpu:
        torch.cuda.synchronize()


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
    return 2 * n / t

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
    return {
        "kernel": case.kernel,
        "case": case.label,
        "phase": case.phase,
        "bytes": case.bytes,
        "flops": case.flops,
        "peak": case.peak,
        "target": None,
        "check_ok": None,
        "check": "compile only",
        "first_run_s": time.perf_counter() - t0,
    }
