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

Modules: bench/cuda_kernels_cases.py (shapes, targets, checks, one case generator per kernel),
bench/cuda_kernels_run.py (timing, one case's check and figures), bench/cuda_kernels_model.py (the
whole-model decode), bench/cuda_kernels_report.py (console rows, JSON / Markdown); this file is the
command line.

This is a benchmark, not a test: it prints figures and never fails on a missed target. It exits
non-zero only when a case raised an error (or, in --smoke, when a check mismatched).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (torch is safe to import before TRITON_INTERPRET is decided; triton is not)

# the parts (they import torch only; triton comes in with the kernels, after TRITON_INTERPRET is set)
from cuda_kernels_cases import FLASH, KERNELS, MODULE_OF, SMOKE, Ctx  # noqa: E402
from cuda_kernels_model import model_bench, report_model  # noqa: E402
from cuda_kernels_report import HDR_GPU, HDR_SMOKE, NOTES, _driver_version, fmt_row, write_reports  # noqa: E402
from cuda_kernels_run import bench, compile_case, copy_bandwidth, log, run_case  # noqa: E402, F401  (bench: cuda_tune.py)

# ----------------------------------------------------------------------------------- constants
# Hardware (spec performance.md §0): HBM bandwidth, dense bf16 / fp8 tensor-core peaks. The fp32
# CUDA-core peak (67 TF, vendor figure for H100/H200 SXM, not in the spec) is used only for the ops
# whose inner product runs as IEEE fp32 FMAs (mHC mix, gate logits).
H100 = {"bw": 3.35e12, "bf16": 989e12, "fp8": 1979e12, "fp32": 67e12}
H200 = {"bw": 4.8e12, "bf16": 989e12, "fp8": 1979e12, "fp32": 67e12}


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
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="kernels: " + ", ".join(KERNELS) + ", model",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; without a GPU: "
                                                         "CPU tensors under TRITON_INTERPRET=1, wall-clock timing")
    ap.add_argument("--only", default=None, help="comma-separated kernel names (and/or 'model'); default: "
                                                 "all kernels and the model")
    ap.add_argument("--skip-model", action="store_true", help="do not run the whole-model decode")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the figures as JSON to PATH ('-' = stdout)")
    ap.add_argument("--markdown", default=None, metavar="PATH", help="write the tables as Markdown to PATH")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting kernel cases after this many seconds (the rest are listed as skipped), "
                         "keeping --model-reserve-s for the whole-model decode")
    ap.add_argument("--model-reserve-s", type=float, default=90.0, help="seconds of --budget-s kept for the model "
                                                                        "(default 90)")
    ap.add_argument("--compile-only", action="store_true",
                    help="run each CUDA case once (Triton compiles it into its cache; a fault shows here) without "
                         "checks, reference or timing: several of these side by side warm the cache for a timed run")
    ap.add_argument("--max-input-gb", type=float, default=24.0,
                    help="skip attention / indexer cases whose KV or key pool alone is larger (default 24)")
    ap.add_argument("--batches", default=None, help="decode batch sizes for attention / indexer / hc / gate (default "
                                                    "Flash: 1,32,128)")
    ap.add_argument("--contexts", default=None, help="decode contexts for attention / indexer (default Flash: "
                                                     "8192,65536,1048576)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs of the CUDA op (median; default 20, smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3, smoke 0)")
    ap.add_argument("--ref-reps", type=int, default=None, help="timed runs of the reference op (default 5, smoke 1)")
    ap.add_argument("--ref-warmup", type=int, default=None, help="untimed reference runs first (default 1, smoke 0)")
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 (256 MB memset) before each timed run")
    ap.add_argument("--model-config", default=None, help="model config for the whole-model decode (default small; "
                                                         "smoke: tiny)")
    ap.add_argument(
        "--model-dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: the config's"
    )
    ap.add_argument("--model-batches", default=None, help="decode batch sizes (default 1,8; smoke 1,2)")
    ap.add_argument("--model-context", type=int, default=None, help="prompt tokens per sequence (default 1024; "
                                                                    "smoke 40)")
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

    t_start = time.perf_counter()
    ctx, broken, doc = _start(args, gpu, argv)
    kernel_deadline = (
        None if args.budget_s is None else t_start + args.budget_s - (args.model_reserve_s if run_model else 0)
    )
    errors = mismatches = 0
    for name in only:
        e, m = _run_kernel(ctx, name, only, broken, doc, kernel_deadline)
        errors, mismatches = errors + e, mismatches + m
    ctx.moe_weights = None
    gc.collect()
    _summary(ctx, doc["rows"], mismatches, errors)

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
    return 1 if errors or (args.smoke and mismatches) else 0


def _start(args, gpu: bool, argv) -> tuple[Ctx, dict, dict]:
    """Shapes, kernels, reference ops and hardware figures; logs the run's header. Returns (ctx,
    {kernel module: why it does not import}, the report document with no rows yet)."""
    sh = SMOKE if args.smoke else FLASH
    if args.batches:
        sh.batches = [int(x) for x in args.batches.split(",")]
    if args.contexts:
        sh.contexts = [int(x) for x in args.contexts.split(",")]
    dev = torch.device("cuda" if gpu else "cpu")
    K, broken = load_kernels()
    import triton

    from backends.reference.ops import ReferenceOps

    hw, hw_name = detect_hw(args.smoke, gpu)
    ctx = Ctx(args, args.smoke, gpu, dev, sh, hw, hw_name, K, ReferenceOps(dev))
    mode = "smoke (tiny shapes" + (
        ", Triton interpreter on CPU tensors, wall clock)" if not gpu else ", GPU, CUDA events)"
    )
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
    log("")
    log(HDR_SMOKE if args.smoke else HDR_GPU)
    log("-" * len(HDR_SMOKE if args.smoke else HDR_GPU))
    doc = {"mode": "smoke" if args.smoke else "full",
           "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
           "device": hw_name, "hardware": hw, "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "driver": _driver_version() if gpu else None, "interpreter": not gpu,
           "timing": {"reps": args.reps, "warmup": args.warmup, "ref_reps": args.ref_reps,
                      "ref_warmup": args.ref_warmup, "l2_flush": gpu and ctx.flush is not None,
                      "clock": "cuda events" if gpu else "wall"},
           "shapes": {k: v for k, v in vars(sh).items()}, "rows": [], "skipped": ctx.skipped, "model": None,
           "notes": NOTES, "partial": True}
    return ctx, broken, doc


def _run_kernel(ctx: Ctx, name: str, only: list, broken: dict, doc: dict, deadline: float | None) -> tuple[int, int]:
    """Every case of one kernel (until the deadline): rows appended to doc["rows"] and logged, the
    reports rewritten after each. Returns (errors, mismatches)."""
    args, rows, smoke = ctx.args, doc["rows"], ctx.smoke
    if deadline is not None and time.perf_counter() > deadline:
        ctx.skipped.append((name, "all cases", "--budget-s reached"))
        return 0, 0
    if MODULE_OF[name] in broken:
        r = {"kernel": name, "case": "-", "bytes": 0, "flops": 0, "error": "module does not import: "
                                                                           f"{broken[MODULE_OF[name]]}"}
        rows.append(r)
        log(fmt_row(r, smoke))
        return 1, 0
    errors = mismatches = 0
    t_k = time.perf_counter()
    gen = KERNELS[name](ctx)
    while True:
        if deadline is not None and time.perf_counter() > deadline:
            ctx.skipped.append((name, "remaining cases", "--budget-s reached"))
            break
        try:
            case = next(gen)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - building inputs failed: report, go on with the next kernel
            r = {"kernel": name, "case": "(building inputs)", "bytes": 0, "flops": 0, "error": f"{type(e).__name__}: "
                                                                                               f"{e}"}
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
    if ctx.gpu:
        torch.cuda.empty_cache()
    return errors, mismatches


def _summary(ctx: Ctx, rows: list, mismatches: int, errors: int) -> None:
    if not ctx.smoke:
        log("")
        for n in NOTES:
            log(f"note: {n}")
    for k, label, why in ctx.skipped:
        log(f"skipped: {k} {label}: {why}")
    log("")
    log(f"cases: {len(rows)}, checks OK {sum(r.get('check_ok') is True for r in rows)}, MISMATCH {mismatches}, "
        f"errors {errors}; per kernel: {', '.join(ctx.notes)}")


if __name__ == "__main__":
    sys.exit(main())
