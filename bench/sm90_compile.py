"""Compile every Triton kernel specialization the CUDA tests launch, for a GPU target, without a GPU.

The GPU machine is lent for minutes; a kernel that does not compile there (an op the installed
Triton lacks, a layout the backend rejects, shared memory over the chip's limit) should fail here
first. Triton compiles ahead of time for any target on a CPU-only machine (`triton.compile` with a
`GPUTarget`: front end, MLIR passes, LLVM and ptxas all run locally); only loading the cubin needs
the driver. So:

    python bench/sm90_compile.py record --out /tmp/launches.json [pytest args]   # TRITON_INTERPRET=1
    python bench/sm90_compile.py compile /tmp/launches.json [--arch 90] [--jobs 2]

`record` runs pytest (default: the CUDA kernel tests) with every Triton launch intercepted in the
interpreter, and writes each distinct (kernel, argument types, constexprs, num_warps, num_stages).
`compile` builds each one for the target with the Triton installed in *its* environment (run it in
a venv holding the GPU machine's Triton version, e.g. 3.6) and reports per kernel: OK with
registers / spills / shared memory, or the compiler's error. The interpreter-only switches
(EMULATE, SOFT, UPCAST, ...) are compiled both as recorded and flipped to what a GPU launch passes.

What this cannot see: block sizes the wrappers choose only on a GPU (they size launches from the
SM count), runtime faults, numerics. Those need the GPU run (bench/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# constexprs that only the interpreter sets, and the value a GPU launch passes instead
GPU_VALUES = {"EMULATE": False, "ROUND_BF16_OUT": False, "SOFT": False, "UPCAST": False, "RANK_SORT": False,
              "RNE_BF16": False, "LIBDEVICE": True, "NATIVE_FP8": True}
SMEM_LIMIT = 232448  # sm_90 opt-in shared memory per block (bytes)

_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "i8",
                    "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1",
                    "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5"}


# ------------------------------------------------------------------------------------- record
def _arg_type(v):
    """('sig', type string) for a runtime argument, or ('const', value) for a specialised one."""
    import torch
    import triton.language as tl

    if isinstance(v, torch.Tensor):
        return "sig", "*" + _TORCH_TO_TRITON[str(v.dtype).removeprefix("torch.")]
    if isinstance(v, bool):
        return "sig", "i1"
    if isinstance(v, int):
        if v == 1:
            return "const", 1  # the JIT specialises ints equal to 1
        return "sig", "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "sig", "fp32"
    if v is None:
        return "const", None
    if isinstance(v, tl.dtype):
        return "const", f"tl.{v.name}"
    raise TypeError(f"unrecorded argument type {type(v).__name__}")


def _encode_const(v):
    import triton.language as tl

    if isinstance(v, tl.dtype):
        return f"tl.{v.name}"
    if isinstance(v, tl.constexpr):
        return _encode_const(v.value)
    return v


class Recorder:
    def __init__(self):
        self.seen: dict[str, dict] = {}

    def install(self):
        from triton.runtime import interpreter

        orig = interpreter.InterpretedFunction.run
        rec = self

        def run(self, *args, grid, warmup, **kwargs):
            try:
                rec.add(self.fn, args, kwargs)
            except Exception as e:  # noqa: BLE001 - recording must never change what the test sees
                print(f"sm90_compile: could not record {self.fn.__name__}: {e}", file=sys.stderr)
            return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

        interpreter.InterpretedFunction.run = run

    def add(self, fn, args, kwargs):
        kwargs = dict(kwargs)
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        params = inspect.signature(fn).parameters
        bound = dict(zip(params, args)) | kwargs
        sig, consts = {}, {}
        for name, p in params.items():
            ann = p.annotation
            is_cx = ann is not inspect.Parameter.empty and "constexpr" in str(ann)
            v = bound.get(name, p.default)
            if is_cx:
                sig[name], consts[name] = "constexpr", _encode_const(v)
                continue
            kind, t = _arg_type(v)
            if kind == "const":
                sig[name], consts[name] = "constexpr", t
            else:
                sig[name] = t
        entry = {"module": fn.__module__, "name": fn.__name__, "signature": sig, "constexprs": consts, "options": opts}
        self.seen.setdefault(json.dumps(entry, sort_keys=True), entry)


def cmd_record(a, pytest_args):
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    rec = Recorder()
    rec.install()
    import pytest

    args = pytest_args or [
        "-q",
        "-p",
        "no:cacheprovider",
        *sorted(str(p) for p in (ROOT / "tests").glob("test_cuda_*.py")),
        str(ROOT / "tests" / "test_decode_graphs.py"),
    ]
    rc = pytest.main(args)
    Path(a.out).write_text(
        json.dumps(sorted(rec.seen.values(), key=lambda e: (e["module"], e["name"])), indent=1) + "\n"
    )
    print(f"recorded {len(rec.seen)} distinct launches of "
          f"{len({(e['module'], e['name']) for e in rec.seen.values()})} kernels -> {a.out} (pytest exit {rc})")
    return 0


# ------------------------------------------------------------------------------------ compile
def _variants(entry):
    """The recorded constexprs, and (when any interpreter-only switch is set) the GPU's."""
    cx = entry["constexprs"]
    out = [cx]
    gpu = {k: (GPU_VALUES[k] if k in GPU_VALUES else v) for k, v in cx.items()}
    if "UPCAST" in cx and cx["UPCAST"] and "IEEE" in cx:
        # the wrapper's IEEE follows UPCAST for 16-bit queries: without the upcast the dot is 16-bit
        gpu["IEEE"] = any(entry["signature"].get(n) in ("*fp32", "*fp64") for n in ("q_ptr",))
    if gpu != cx:
        out.append(gpu)
    return out


def _decode_const(v):
    import triton.language as tl

    if isinstance(v, str) and v.startswith("tl."):
        return tl.dtype(v[3:])  # a dtype's name (fp32, bf16, ...)
    return v


def compile_one(job):
    """Worker: compile one (entry, constexprs) for the target; returns a result dict."""
    entry, cx, arch = job
    sys.path.insert(0, str(ROOT))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(entry["module"])
    fn = getattr(mod, entry["name"])
    sig = dict(entry["signature"])
    res = {
        "kernel": f"{entry['module'].rsplit('.', 1)[-1]}.{entry['name']}",
        "constexprs": cx,
        "options": entry["options"],
    }
    t0 = time.perf_counter()
    try:
        consts = {k: _decode_const(v) for k, v in cx.items()}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(entry["options"]))
        md = k.metadata
        res.update(ok=True, shared=md.shared, num_warps=md.num_warps)
        try:
            k._init_handles()
        except Exception:  # noqa: BLE001 - loading needs a driver; registers are then unknown
            pass
        res["n_regs"], res["n_spills"] = getattr(k, "n_regs", None), getattr(k, "n_spills", None)
        if md.shared > SMEM_LIMIT:
            res.update(ok=False, error=f"shared memory {md.shared} B > {SMEM_LIMIT} B (sm_90 limit)")
        ptx = k.asm.get("ptx", "")
        res["wgmma"] = "wgmma" in ptx
        res["mma"] = "mma.sync" in ptx
    except Exception as e:  # noqa: BLE001
        res.update(
            ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        )
    res["seconds"] = time.perf_counter() - t0
    return res


def cmd_compile(a):
    import triton

    entries = json.loads(Path(a.launches).read_text())
    jobs, seen = [], set()
    entries = [e for e in entries if not e["module"].startswith("tests.")]  # kernels a test defines for itself
    for e in entries:
        for cx in _variants(e):
            key = json.dumps([e["module"], e["name"], e["signature"], cx, e["options"]], sort_keys=True)
            if key not in seen:
                seen.add(key)
                jobs.append((e, cx, a.arch))
    print(f"triton {triton.__version__}: compiling {len(jobs)} specializations of "
          f"{len({(e['module'], e['name']) for e in entries})} kernels for sm_{a.arch} with {a.jobs} workers")
    t0 = time.perf_counter()
    results = []
    with cf.ProcessPoolExecutor(a.jobs) as ex:
        for r in ex.map(compile_one, jobs):
            results.append(r)
            if not r["ok"]:
                print(f"FAIL {r['kernel']} {r['constexprs']} {r['options']}: {r['error']}", flush=True)
    by = {}
    for r in results:
        by.setdefault(r["kernel"], []).append(r)
    print(f"\n{'kernel':<44} {'ok':>4} {'fail':>4} {'max smem KB':>11} {'compile s':>9}")
    for k, rs in sorted(by.items()):
        ok = sum(r["ok"] for r in rs)
        smem = max((r.get("shared") or 0) for r in rs) / 1024
        print(f"{k:<44} {ok:>4} {len(rs) - ok:>4} {smem:>11.1f} {sum(r['seconds'] for r in rs):>9.1f}")
    fails = sum(not r["ok"] for r in results)
    print(f"\n{len(results) - fails} compiled, {fails} failed, {time.perf_counter() - t0:.0f}s wall")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 1 if fails else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run pytest in Triton's interpreter and record every launch")
    r.add_argument("--out", required=True)
    c = sub.add_parser("compile", help="compile the recorded launches for a GPU target")
    c.add_argument("launches")
    c.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = Hopper)")
    c.add_argument("--jobs", type=int, default=2)
    c.add_argument("--json", help="write per-specialization results here")
    a, rest = ap.parse_known_args(argv)
    return cmd_record(a, rest) if a.cmd == "record" else cmd_compile(a)


if __name__ == "__main__":
    sys.exit(main())
