"""Offline Ascend-legality check: lower every Triton-Ascend kernel through triton-ascend and BiShengIR.

    .ci/ascend-lowering                      # creates .venv-ascend if missing, then runs the line below
    python -m backends.ascend.lowering --targets Ascend910B3,Ascend910_9391 [--kernels substr] [--keep DIR] [-v]
    python -m backends.ascend.lowering --module tests.ascend_lowering_samples[:BROKEN_CASES]

Runs only inside .venv-ascend (triton-ascend 3.2.0 + ascendnpu-ir 1.2.0 + CPU torch): triton-ascend
replaces the `triton` module, so it cannot live next to the upstream triton of the main environment.

For every `LoweringCase` (backends/ascend/kernels/launch.py) and every target chip:
  1. `triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("npu", chip, 0))` runs
     triton-ascend's front end (Python AST -> TTIR), its TTIR passes and `triton-adapter-opt` (TTIR ->
     Linalg/HFusion/HIVM-flavoured MLIR, the "ttadapter" stage). The binary stage after it needs CANN
     (ASCEND_HOME_PATH) and is expected to fail offline; the ttadapter text is read from a private
     Triton cache folder.
  2. `bishengir-compile kernel.ttadapter --target=<chip> ...` (the flags triton-ascend itself passes for
     A2/A3, plus --mlir-print-ir-after-all --mlir-print-skip-regions to count the passes cheaply;
     --full-ir dumps whole modules) runs the whole BiShengIR pipeline:
     HFusion, HIVM (tiling, memory planning against the Unified Buffer, cube/vector split, sync
     insertion) down to convert-hivm-to-std. Its last step hands the module to the external code
     generator `hivmc`, which ships only with CANN.

PASS: the pipeline ran through HIVM (convert-hivm-to-std) and the only error is the missing `hivmc`
(or, on a machine with CANN, bishengir-compile succeeded). A PASS gets a note ("~" line) when
bishengir only got there by turning multi-buffering off after a UB overflow (live tiles above half
the UB, launch.UB_BUDGET); --strict-ub makes that a FAIL. FAIL: anything else, with the first
meaningful error lines (front-end errors such as unsupported dtypes, triton-adapter errors, MLIR pass
failures, "ub overflow", crashes).

What a PASS proves (spec ascend.md section 9): triton-ascend's front end accepts the kernel for these
constexprs and argument types, and the Ascend compiler's MLIR pipeline legalises and lowers it for
the named chip (A2 Ascend910B*, A3 Ascend910_93*), including Unified Buffer allocation for the tile
sizes chosen. Caught offline (measured): fp64/fp8 in the front end, Unified Buffer overflow, ops a
chip lacks (tl.sort on int32), compiler crashes. What it does not prove: that hivmc (CANN) accepts
the HIVM output, that the binary loads and runs, numerics (those come from TRITON_INTERPRET=1 against
backends.reference), or speed (only a real NPU). Several documented restrictions are only enforced
by hivmc or at run time and PASS here: unsigned loads, int64 atomics, tl.dot with out_dtype fp16,
inline asm (kept as llvm.inline_asm); kernels must respect them by construction (kernels/__init__.py).

Stages reported (where a case stopped): setup (bad LoweringCase / import), frontend (AST -> TTIR),
ttir, ttadapter, bishengir (before any pass), hfusion, hivm, hivm-to-std, hivmc (the external code
generator: the expected stop offline), binary (CANN present: full compile).

Nothing in this module imports triton at import time; the table, classifier and exit-code logic are
plain Python (tests/backends/ascend/test_lowering.py checks them without triton-ascend).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

DEFAULT_TARGETS = "Ascend910B3,Ascend910_9391"
PIPELINE_STAGES = ("setup", "frontend", "ttir", "ttadapter", "bishengir", "hfusion", "hivm", "hivm-to-std",
                   "hivmc", "binary")
ENV_HINT = ("backends.ascend.lowering needs triton-ascend (Ascend's fork of Triton 3.2) and ascendnpu-ir, "
            "which live in their own venv: run .ci/ascend-lowering, or use .venv-ascend/bin/python -m "
            "backends.ascend.lowering.")

# bishengir-compile flags for A2/A3 as triton-ascend 3.2.0 builds them
# (backends/ascend/compiler.py: linalg_to_bin_enable_npu_compile_A2_A3, NPUOptions defaults
# multibuffer=True, enable_auto_bind_sub_block=True), plus the pass dump we count.
BISHENGIR_FLAGS = (
    "--enable-auto-multi-buffer=true",
    "--enable-auto-bind-sub-block=true",
    "--enable-hfusion-compile=true",
    "--enable-hivm-compile=true",
    "--enable-triton-kernel-compile=true",
    "--mlir-print-ir-after-all",
)
# Dump headers only (op signatures, no bodies): same pass sequence, a fraction of the time and log.
SKIP_REGIONS = "--mlir-print-skip-regions"

# ---------------------------------------------------------------------------------------------
# Pure-Python part: classification of tool output, table, exit code (no triton needed).
# ---------------------------------------------------------------------------------------------

# "// -----// IR Dump After PlanMemory (hivm-plan-memory) //----- //"; "... After PlanMemory Failed (...)"
_DUMP_RE = re.compile(r"IR Dump After (\S+)( Failed)?(?: \(([^)]*)\))?")
# MLIR diagnostics: `loc("file":1:2): error: ...`, `file.mlir:1:2: error: ...`, `error: ...`
_DIAG_RE = re.compile(r"^(?:(loc\(.*?\))|([^\s:]+:\d+:\d+)|)\s*:?\s*(error|warning|note|remark): (.*)$")
_LOC_RE = re.compile(r'loc\("?[^"]*?"?:(\d+):(\d+)\)')
_BRACKET_RE = re.compile(r"^\[(ERROR|WARNING|NOTE|INFO)\]\s*(.*?)\s*$")
_CRASH_MARKERS = ("LLVM ERROR", "Assertion", "Segmentation fault", "terminate called", "core dumped")

# The expected offline stop: bishengir-compile finished its MLIR pipeline and could not run hivmc.
HIVMC_MISSING = "Cannot find hivmc under $PATH"
HIVMC_FAILS = "External hivmc run fails"
_NOISE = (
    # printed by every offline run while probing hivmc's version: not a kernel problem
    HIVMC_MISSING,
    "Failed to run `hivmc --version`",
    "Failed to detect hivmc version for backward compatibility",
)
_GENERIC = ("Failed to run BiShengIR pipeline", "Failed to run BiShengHIR pipeline")
# On a UB overflow bishengir retries without code motion, then without multi-buffering; when that
# works the kernel compiles, but single-buffered: its live tiles exceed launch.UB_BUDGET (half the UB).
UB_RETRY = "Ub overflow detected"
UB_RETRY_NOTE = ("UB overflow with double buffering: bishengir retried with code motion and multi-buffering off "
                 "(live tiles exceed half the Unified Buffer, launch.UB_BUDGET)")


def pass_stage(pass_arg: str) -> str:
    """Pipeline stage a BiShengIR pass belongs to, from its command-line name (or class name)."""
    p = pass_arg.lower()
    if p in ("convert-hivm-to-std", "converthivmtostandard"):
        return "hivm-to-std"
    if "hivm" in p or "hfusion-to-hivm" in p:
        return "hivm"
    return "hfusion"


def _stage_rank(stage: str) -> int:
    return PIPELINE_STAGES.index(stage) if stage in PIPELINE_STAGES else -1


@dataclass
class Outcome:
    """How far one case got: stage where it stopped, passes run, PASS/FAIL and why."""

    stage: str
    passes: int = 0
    ok: bool = False
    reasons: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # for a PASS: what bishengir had to give up to get there


def _clean_diag(line: str) -> str:
    """`loc("/tmp/x/kernel.ttadapter":2:3): error: msg` -> `2:3: error: msg` (paths are temporary)."""
    line = _LOC_RE.sub(lambda m: f"{m.group(1)}:{m.group(2)}", line.strip())
    line = re.sub(r"^\S*?/([^/\s:]+:\d+:\d+:)", r"\1", line)
    return line


def error_lines(text: str, limit: int | None = None) -> list:
    """The meaningful diagnostic lines of a compiler log (IR dumps and known offline noise dropped)."""
    specific, generic, notes = [], [], []
    seen = set()
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line[0].isspace():
            continue  # IR text is indented
        m = _DIAG_RE.match(line)
        b = _BRACKET_RE.match(line)
        if m and m.group(3) in ("error", "note"):
            msg = m.group(4)
        elif b and b.group(1) in ("ERROR", "NOTE"):
            msg = b.group(2)
        elif any(k in line for k in _CRASH_MARKERS):
            msg = line
        else:
            continue
        if any(n in msg for n in _NOISE) or HIVMC_FAILS in msg:
            continue
        cleaned = _clean_diag(line)
        if cleaned in seen:
            continue
        seen.add(cleaned)
        if any(g in msg for g in _GENERIC):
            generic.append(cleaned)
        elif (m and m.group(3) == "note") or (b and b.group(1) == "NOTE"):
            notes.append(cleaned)
        else:
            specific.append(cleaned)
    out = specific + notes[::-1] + generic  # the last note says how retries ended
    return out[:limit] if limit else out


def classify_bishengir(returncode: int, log: str) -> Outcome:
    """PASS/FAIL for one bishengir-compile run from its exit status and combined stdout+stderr."""
    found = _DUMP_RE.findall(log)
    dumps = [(cls, arg) for cls, failed, arg in found if not failed]
    failed_passes = [(cls, arg) for cls, failed, arg in found if failed]
    passes = len(dumps)
    stage = "bishengir"
    for cls, arg in dumps + failed_passes:  # where it stopped: a failing pass counts for its stage
        s = pass_stage(arg or cls)
        if _stage_rank(s) > _stage_rank(stage):
            stage = s
    notes = [UB_RETRY_NOTE] if UB_RETRY in log else []
    if returncode == 0:
        return Outcome("binary", passes, True, [], notes)
    errors = error_lines(log)
    real_errors = [e for e in errors if not any(g in e for g in _GENERIC)
                   and ("error" in e.lower() or any(k in e for k in _CRASH_MARKERS))]
    hivmc_missing = HIVMC_FAILS in log and HIVMC_MISSING in log
    crashed = returncode < 0 or returncode > 128
    if hivmc_missing and stage == "hivm-to-std" and not real_errors and not crashed:
        return Outcome("hivmc", passes, True, [], notes)
    # reasons: the real errors first, then how it ended, where, then notes and generic lines
    reasons = list(errors)
    head = []
    if crashed:
        sig = -returncode if returncode < 0 else returncode - 128
        name = {6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV"}.get(sig, f"signal {sig}")
        head.append(f"bishengir-compile crashed ({name})")
    elif hivmc_missing and not real_errors:
        head.append(f"hivmc was reached before the HIVM pipeline finished (last stage: {stage})")
    if failed_passes or dumps:
        what, (cls, arg) = ("failed pass", failed_passes[-1]) if failed_passes else ("last pass completed", dumps[-1])
        head.append(f"{what}: {cls}" + (f" ({arg})" if arg else ""))
    reasons[len(real_errors):len(real_errors)] = head
    if HIVMC_FAILS in log and HIVMC_MISSING not in log:
        stage = "hivmc"  # CANN's hivmc exists and rejected the module
    if not errors:
        tail = [ln.strip() for ln in log.strip().splitlines() if ln.strip() and not ln[0].isspace()
                and "IR Dump" not in ln][-3:]
        reasons += tail or [f"bishengir-compile exited {returncode} without a message"]
    return Outcome(stage, passes, False, reasons)


_TRITON_STAGE_TAGS = {
    "MLIRCompile": "ttir",
    "ConvertTritonIRToLinalgIR": "ttadapter",
    "ConvertLinalgRToBinary": "binary",
}


def classify_triton_error(type_name: str, message: str) -> tuple:
    """(stage, reasons) for an exception out of triton.compile.

    Front-end errors (CompilationError and friends: unsupported dtype, bad constexpr, Python error in
    the kernel) keep their location and last line; MLIRCompilationError names the failed stage
    ("[ConvertTritonIRToLinalgIR] encounters error:") and carries the tool's stderr.
    """
    m = re.search(r"\[(MLIRCompile|ConvertTritonIRToLinalgIR|ConvertLinalgRToBinary)\] encounters error", message)
    if m:
        stage = _TRITON_STAGE_TAGS[m.group(1)]
        body = message.split("encounters error:", 1)[1]
        body = body.split("[INFO]: The compiled kernel cache is in", 1)[0]
        reasons = error_lines(body) or [ln.strip() for ln in body.splitlines()
                                        if ln.strip() and not ln.startswith("///")][:4]
        return stage, reasons
    lines = [ln.rstrip() for ln in message.strip().splitlines() if ln.strip()]
    if type_name in ("CompilationError", "CompileTimeAssertionFailure", "UnsupportedLanguageConstruct"):
        where = lines[0].rstrip(":") if lines and lines[0].startswith("at ") else ""
        last = lines[-1].strip() if lines else type_name
        return "frontend", [f"{type_name} {where}: {last}".replace(" :", ":")]
    return "frontend", [f"{type_name}: {lines[-1].strip() if lines else ''}".rstrip(": ")]


@dataclass
class Result:
    kernel: str
    target: str
    stage: str
    passes: int
    ok: bool
    seconds: float
    reasons: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def apply_strict_ub(results):
    """--strict-ub: a PASS that only compiled single-buffered (UB retry) becomes a FAIL."""
    for r in results:
        if r.ok and UB_RETRY_NOTE in r.notes:
            r.ok = False
            r.reasons = [n for n in r.notes] + ["--strict-ub: live tiles must fit launch.UB_BUDGET"]
            r.notes = []
    return results


def format_table(results, max_reasons: int | None = 3) -> str:
    """Fixed-width table: kernel, target, stage, passes, result, seconds; FAIL rows followed by reasons."""
    head = ("kernel", "target", "stage", "passes", "result", "seconds")
    rows = [(r.kernel, r.target, r.stage, str(r.passes), "PASS" if r.ok else "FAIL", f"{r.seconds:.2f}")
            for r in results]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
    right = {3, 5}

    def fmt(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [fmt(head), fmt(tuple("-" * w for w in widths))]
    for r, row in zip(results, rows):
        out.append(fmt(row))
        if r.ok:
            out.extend(f"    ~ {note}" for note in r.notes)
        else:
            shown = r.reasons if max_reasons is None else r.reasons[:max_reasons]
            for reason in shown:
                out.append(f"    ! {reason}")
            if max_reasons is not None and len(r.reasons) > max_reasons:
                out.append(f"    ! ... {len(r.reasons) - max_reasons} more (-v)")
    return "\n".join(out)


def summary(results, targets, seconds: float) -> str:
    n_pass = sum(r.ok for r in results)
    n_fail = len(results) - n_pass
    kernels = len({r.kernel for r in results})
    if not results:
        return "ascend lowering: no cases to compile (nothing checked) -> FAIL"
    verdict = "OK" if n_fail == 0 else "FAIL"
    n_note = sum(bool(r.ok and r.notes) for r in results)
    noted = f" ({n_note} with notes)" if n_note else ""
    return (f"ascend lowering: {kernels} kernel case(s) x {len(targets)} target(s) ({', '.join(targets)}): "
            f"{n_pass} PASS{noted}, {n_fail} FAIL in {seconds:.1f} s -> {verdict} "
            f"(checked through BiShengIR HIVM; hivmc/CANN binary, numerics and speed not checked)")


def exit_code(results) -> int:
    """0 when there was at least one case and every case passed, 1 otherwise."""
    return 0 if results and all(r.ok for r in results) else 1


# ---------------------------------------------------------------------------------------------
# Case collection
# ---------------------------------------------------------------------------------------------


def _case_of(item):
    return item[-1] if isinstance(item, tuple) else item


def load_cases(module_spec: str | None):
    """(cases, import_failures) from `module[:ATTR]` (ATTR defaults to LOWERING_CASES) or the kernels.

    import_failures: (name, reason) for kernel modules that do not import, so one broken module is
    reported as a FAIL row instead of hiding the others.
    """
    if module_spec:
        mod_name, _, attr = module_spec.partition(":")
        attr = attr or "LOWERING_CASES"
        try:
            mod = importlib.import_module(mod_name)
        except Exception as e:  # noqa: BLE001 - reported as a FAIL row
            return [], [(mod_name, f"import failed: {type(e).__name__}: {e}")]
        if not hasattr(mod, attr):
            return [], [(module_spec, f"{mod_name} has no attribute {attr}")]
        return [_case_of(c) for c in getattr(mod, attr)], []
    kernels = importlib.import_module("backends.ascend.kernels")
    try:
        return [_case_of(c) for c in kernels.lowering_cases()], []
    except Exception:  # noqa: BLE001 - find which module(s) fail, keep the rest
        pass
    cases, failures = [], []
    for name in kernels.KERNEL_MODULES:
        full = f"{kernels.__name__}.{name}"
        try:
            mod = importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name == full:
                continue
            failures.append((name, f"import failed: {type(e).__name__}: {e}"))
            continue
        except Exception as e:  # noqa: BLE001
            failures.append((name, f"import failed: {type(e).__name__}: {e}"))
            continue
        cases += [_case_of(c) for c in getattr(mod, "LOWERING_CASES", ())]
    return cases, failures


def _select(cases, patterns):
    if not patterns:
        return cases
    pats = [p for p in patterns.split(",") if p]
    return [c for c in cases
            if any(p in c.name or p in getattr(getattr(c, "fn", None), "__name__", "") for p in pats)]


# ---------------------------------------------------------------------------------------------
# triton-ascend / bishengir driving (imports triton lazily)
# ---------------------------------------------------------------------------------------------


def check_environment():
    """Make sure we run on triton-ascend with ascendnpu-ir; put bishengir-compile on PATH. Returns the bin dir."""
    try:
        importlib.import_module("triton.backends.ascend.compiler")
        spec = importlib.util.find_spec("ascendnpuir")
    except Exception:  # noqa: BLE001 - upstream triton, no triton, broken install
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = os.path.join(list(spec.submodule_search_locations)[0], "bin")
    if not os.access(os.path.join(bindir, "bishengir-compile"), os.X_OK):
        return None
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + path
    return bindir


def _jit_params(fn):
    """[(name, is_constexpr, default)] of a @triton.jit function's parameters."""
    params = getattr(fn, "params", None)
    sig = inspect.signature(getattr(fn, "fn", fn))
    out = []
    for i, (name, p) in enumerate(sig.parameters.items()):
        is_cx = bool(params[i].is_constexpr) if params is not None else False
        out.append((name, is_cx, p.default))
    return out


def build_source(case):
    """(signature, constants, attrs hints) for ASTSource as triton-ascend 3.2 expects them.

    triton-ascend 3.2: ASTSource(fn, signature, constants=..., attrs=...). `signature` maps the
    non-constexpr argument names to type strings and MUST be in the function's argument order (the
    prototype is built from its values in order, skipping names found in `constants`); `constants` maps
    every tl.constexpr argument name to its value (also None for an absent optional pointer). A
    constexpr name may also appear in the signature as "constexpr" (it is dropped). The case's dict
    order is not trusted: the signature is rebuilt here in argument order.
    """
    sig_in = dict(case.signature)
    cst = dict(case.constexprs or {})
    names = [n for n, _, _ in _jit_params(case.fn)]
    unknown = [k for k in list(sig_in) + list(cst) if k not in names]
    if unknown:
        raise ValueError(f"{case.name}: {', '.join(unknown)} not arguments of {case.fn.__name__}({', '.join(names)})")
    signature, hints = {}, {}
    for i, (name, is_cx, default) in enumerate(_jit_params(case.fn)):
        if name in cst:
            continue
        if is_cx:
            if default is inspect.Parameter.empty:
                raise ValueError(f"{case.name}: constexpr argument {name} has no value in constexprs")
            cst[name] = default
            continue
        ty = sig_in.get(name)
        if ty is None or ty == "constexpr":
            raise ValueError(f"{case.name}: argument {name} has no type in signature (or a value in constexprs)")
        signature[name] = ty
        if ty.startswith("*"):
            hints[i] = 16  # torch allocations are 16-byte aligned: the runtime marks them tt.divisibility=16
    return signature, cst, hints


def _compile_ttadapter(case, target, workdir, verbose_log):
    """Run triton.compile; return (ttadapter text or None, failure (stage, reasons) or None)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        signature, constants, hints = build_source(case)
    except Exception as e:  # noqa: BLE001
        return None, ("setup", [f"{type(e).__name__}: {e}"])
    attrs = None
    try:
        from triton.backends.ascend.compiler import AscendAttrsDescriptor

        attrs = AscendAttrsDescriptor.from_hints(hints)
    except Exception:  # noqa: BLE001 - hints are an optimisation hint only
        attrs = None
    cache = os.path.join(workdir, "triton-cache")
    os.makedirs(cache, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = cache
    captured = io.StringIO()
    kernel, failure = None, None
    try:
        with contextlib.redirect_stdout(captured):
            src = ASTSource(case.fn, signature, constants=constants, attrs=attrs)
            kernel = triton.compile(src, target=GPUTarget("npu", target, 0))
    except Exception as e:  # noqa: BLE001 - classified below
        stage, reasons = classify_triton_error(type(e).__name__, str(e))
        if stage != "binary":  # the binary stage is expected to fail without CANN
            failure = (stage, reasons)
        verbose_log.append(str(e))
    if captured.getvalue().strip():
        verbose_log.append(captured.getvalue())
    text = None
    if kernel is not None:
        text = kernel.asm.get("ttadapter")
    if text is None and failure is None:
        name = case.fn.__name__[:150]
        for root, _, files in os.walk(cache):
            if f"{name}.ttadapter" in files:
                with open(os.path.join(root, f"{name}.ttadapter")) as f:
                    text = f.read()
            if f"{name}.ttir" in files:
                shutil.copy(os.path.join(root, f"{name}.ttir"), os.path.join(workdir, "kernel.ttir"))
        if text is None:
            failure = ("ttadapter", ["triton.compile produced no .ttadapter (see -v)"])
    if isinstance(text, bytes):
        text = text.decode()
    return text, failure


def bishengir_command(path, target, out, full_ir=False):
    return ["bishengir-compile", path, f"--target={target}", *BISHENGIR_FLAGS, *(() if full_ir else (SKIP_REGIONS,)),
            "-o", out]


def run_bishengir(ttadapter: str, target: str, workdir: str, timeout: float, full_ir: bool = False):
    """Write kernel.ttadapter into workdir, run bishengir-compile on it; (Outcome, command)."""
    # triton-ascend strips the mix_mode attribute before handing the module to bishengir-compile
    text = re.sub(r', mix_mode\s*=\s*"[^"]*"', "", ttadapter)
    path = os.path.join(workdir, "kernel.ttadapter")
    with open(path, "w") as f:
        f.write(text)
    log_path = os.path.join(workdir, "bishengir.log")
    cmd = bishengir_command(path, target, os.path.join(workdir, "kernel"), full_ir)
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    with open(log_path, errors="replace") as f:
        out = f.read()
    if rc is None:
        o = classify_bishengir(1, out)
        return Outcome(o.stage, o.passes, False, [f"bishengir-compile timed out after {timeout:.0f} s"]), cmd
    return classify_bishengir(rc, out), cmd


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def _report(res, verbose, extra=()):
    if not verbose:
        return
    print(f"[{res.kernel} {res.target}] {res.stage} passes={res.passes} {'PASS' if res.ok else 'FAIL'} "
          f"{res.seconds:.2f}s", file=sys.stderr)
    for line in extra:
        print("    " + line.strip().replace("\n", "\n    "), file=sys.stderr)


def run_cases(cases, targets, root, timeout=600.0, jobs=1, verbose=False, full_ir=False):
    """Results for every (case, target), in that order: triton.compile in this process, one after
    another (it is quick and not thread-safe), then bishengir-compile runs, `jobs` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    results, pending = [], []
    for case in cases:
        for target in targets:
            t0 = time.perf_counter()
            workdir = os.path.join(root, _slug(case.name), target)
            os.makedirs(workdir, exist_ok=True)
            vlog = []
            text, failure = _compile_ttadapter(case, target, workdir, vlog)
            dt = time.perf_counter() - t0
            if failure is not None:
                res = Result(case.name, target, failure[0], 0, False, dt, failure[1])
                _report(res, verbose, vlog)
                results.append(res)
            else:
                results.append(None)
                pending.append((len(results) - 1, case, target, text, workdir, dt))

    def finish(item):
        idx, case, target, text, workdir, dt = item
        t0 = time.perf_counter()
        outcome, cmd = run_bishengir(text, target, workdir, timeout, full_ir)
        res = Result(case.name, target, outcome.stage, outcome.passes, outcome.ok, dt + time.perf_counter() - t0,
                     outcome.reasons, outcome.notes)
        _report(res, verbose, [" ".join(cmd)])
        return idx, res

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for idx, res in pool.map(finish, pending):
            results[idx] = res
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backends.ascend.lowering", description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default=DEFAULT_TARGETS,
                    help=f"comma-separated BiShengIR chip names (default {DEFAULT_TARGETS})")
    ap.add_argument("--kernels", default="", help="only cases whose name (or kernel function) contains one of "
                    "these comma-separated substrings")
    ap.add_argument("--module", default=None, help="take cases from MODULE[:ATTR] (default attribute "
                    "LOWERING_CASES) instead of backends.ascend.kernels.lowering_cases()")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep per-case artefacts (kernel.ttir, "
                    "kernel.ttadapter, bishengir.log) under DIR/<case>/<target>/")
    ap.add_argument("--full-ir", action="store_true", help="dump the whole IR after every pass into bishengir.log "
                    "(with --keep, for debugging; about 3x slower) instead of op headers only")
    ap.add_argument("-j", "--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="bishengir-compile runs at a time (default: CPU count, at most 4)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per bishengir-compile run (default 600)")
    ap.add_argument("--strict-ub", action="store_true", help="FAIL kernels that compile only after bishengir "
                    "turned multi-buffering off (live tiles over half the Unified Buffer); default: PASS with a note")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress, commands and full error text")
    args = ap.parse_args(argv)

    if check_environment() is None:
        print(ENV_HINT, file=sys.stderr)
        return 2
    # the check compiles @triton.jit functions; under TRITON_INTERPRET=1 (the CPU numerics tests) the
    # decorator would hand back interpreter objects, and launch sizing would follow the interpreter.
    # Popped only here, in the ascend venv: a caller in the main environment keeps its interpreter.
    os.environ.pop("TRITON_INTERPRET", None)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets:
        print("no --targets given", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    cases, import_failures = load_cases(args.module)
    cases = _select(cases, args.kernels)
    results = [Result(name, "-", "setup", 0, False, 0.0, [reason]) for name, reason in import_failures]
    root = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="dsv4-ascend-lowering-")
    os.makedirs(root, exist_ok=True)
    saved_cache = os.environ.get("TRITON_CACHE_DIR")
    try:
        results += run_cases(cases, targets, root, args.timeout, args.jobs, args.verbose, args.full_ir)
        if args.strict_ub:
            apply_strict_ub(results)
    finally:
        if saved_cache is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved_cache
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(format_table(results, None if args.verbose else 3))
    print(summary(results, targets, time.perf_counter() - t_start))
    if args.keep:
        print(f"artefacts kept under {root}")
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
