"""The offline Ascend lowering check (backends/ascend/lowering.py).

The classifier, table and exit-code logic are plain Python and run everywhere. The end-to-end part
runs the tool in .venv-ascend (triton-ascend + ascendnpu-ir; created by .ci/ascend-lowering) on the
sample kernels of tests/ascend_lowering_samples.py: the good ones must PASS, the broken ones FAIL.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from backends.ascend import lowering as L

REPO = Path(__file__).resolve().parents[3]
VENV_PY = REPO / ".venv-ascend" / "bin" / "python"

_PASS_ORDER = [("CanonicalizeModule", "canonicalize-module"), ("ConvertHFusionToHIVM", "convert-hfusion-to-hivm"),
               ("PlanMemory", "hivm-plan-memory"), ("ConvertHIVMToStandard", "convert-hivm-to-std")]
_HIVMC_PROBE = ("[ERROR] Cannot find hivmc under $PATH \n[ERROR] Failed to run `hivmc --version`.\n"
                "[WARNING] Failed to detect hivmc version for backward compatibility\n")


def _dumps(passes, failed=None):
    out = []
    for cls, arg in passes:
        out.append(f"// -----// IR Dump After {cls} ({arg}) //----- //\nmodule {{\n  func.func @k() {{...}}\n}}\n")
    if failed:
        out.append(f"// -----// IR Dump After {failed[0]} Failed ({failed[1]}) //----- //\nmodule {{...}}\n")
    return "".join(out)


HIVMC_MISSING_LOG = (_HIVMC_PROBE + _dumps(_PASS_ORDER) + "\n[ERROR] Cannot find hivmc under $PATH \n"
                     'loc("/tmp/x/kernel.ttadapter":1:1): error: External hivmc run fails, returning module '
                     "before running external compiler\n[ERROR] Failed to run BiShengIR pipeline\n")

UB_OVERFLOW_LOG = (_HIVMC_PROBE + _dumps(_PASS_ORDER[:2], failed=_PASS_ORDER[2]) +
                   "[NOTE] Ub overflow detected; automatically set enable-code-motion to false and retrying "
                   "compilation.\n[NOTE] Due to Ub overflow, automatically set enable-code-motion to false, set "
                   "enable-auto-multi-buffer to false; compilation still failed.\n"
                   'loc("/tmp/x/kernel.ttadapter":2:1): error: Failed to run BiShengHIR pipeline\n'
                   'loc("/tmp/x/kernel.ttadapter":2:3): error: ub overflow, requires 6291456 bits while 1572864 bits '
                   "available! (possible reason: tiling basic block is too large)\n"
                   "[ERROR] Failed to run BiShengIR pipeline\n")

VERIFIER_LOG = (_HIVMC_PROBE + _dumps(_PASS_ORDER[:1], failed=_PASS_ORDER[1]) +
                'loc("/tmp/x/kernel.ttadapter":10:10): error: \'hivm.hir.vsort\' op failed to verify that operand at '
                "idx 0 and 1 should have element type 16-bit float or 32-bit float\n"
                'loc("/tmp/x/kernel.ttadapter":1:1): error: Failed to run BiShengHIR pipeline\n'
                "[ERROR] Failed to run BiShengIR pipeline\n")

CRASH_LOG = (_HIVMC_PROBE + _dumps(_PASS_ORDER[:3]) + "LLVM ERROR: PlanMemory Traverse IR Failed! \n"
             "PLEASE submit a bug report to https://github.com/llvm/llvm-project/issues/ and include the crash "
             "backtrace.\n"
             "Stack dump:\n0.\tProgram arguments: bishengir-compile kernel.ttadapter\n")


# ------------------------------------------------------------------ classifier of bishengir output

def test_hivmc_missing_after_full_pipeline_is_pass():
    o = L.classify_bishengir(1, HIVMC_MISSING_LOG)
    assert (o.ok, o.stage, o.passes, o.reasons) == (True, "hivmc", 4, [])


def test_pass_after_ub_retry_carries_a_note_and_strict_ub_fails_it():
    log = ("[NOTE] Ub overflow detected; automatically set enable-auto-multi-buffer to false and retrying "
           "compilation.\n[NOTE] Due to Ub overflow, ...; compilation then succeeded.\n" + HIVMC_MISSING_LOG)
    o = L.classify_bishengir(1, log)
    assert o.ok and o.stage == "hivmc" and o.notes == [L.UB_RETRY_NOTE]
    r = L.Result("k", "Ascend910B3", o.stage, o.passes, o.ok, 1.0, o.reasons, o.notes)
    assert "    ~ UB overflow with double buffering" in L.format_table([r])
    assert "1 PASS (1 with notes)" in L.summary([r], ["Ascend910B3"], 1.0)
    L.apply_strict_ub([r])
    assert not r.ok and r.reasons[0] == L.UB_RETRY_NOTE and L.exit_code([r]) == 1


def test_hivmc_missing_before_hivm_finished_is_fail():
    log = _HIVMC_PROBE + _dumps(_PASS_ORDER[:2]) + 'loc("k":1:1): error: External hivmc run fails, returning module\n'
    o = L.classify_bishengir(1, log)
    assert not o.ok and o.stage == "hivm"
    assert "before the HIVM pipeline finished" in o.reasons[0]


def test_ub_overflow_is_fail_with_readable_reason():
    o = L.classify_bishengir(1, UB_OVERFLOW_LOG)
    assert not o.ok and o.stage == "hivm" and o.passes == 2
    assert o.reasons[0].startswith("2:3: error: ub overflow, requires 6291456 bits")  # temp path dropped
    assert o.reasons[1] == "failed pass: PlanMemory (hivm-plan-memory)"
    assert "compilation still failed" in o.reasons[2]  # the last retry note comes first
    assert not any("hivmc" in r for r in o.reasons)  # the offline hivmc probe is noise, not a reason


def test_verifier_error_names_the_failed_pass():
    o = L.classify_bishengir(1, VERIFIER_LOG)
    assert not o.ok and o.stage == "hivm" and o.passes == 1
    assert "'hivm.hir.vsort' op failed to verify" in o.reasons[0]
    assert o.reasons[1] == "failed pass: ConvertHFusionToHIVM (convert-hfusion-to-hivm)"


def test_crash_is_fail():
    o = L.classify_bishengir(-6, CRASH_LOG)
    assert not o.ok and o.stage == "hivm" and o.passes == 3
    assert o.reasons[:3] == ["LLVM ERROR: PlanMemory Traverse IR Failed!", "bishengir-compile crashed (SIGABRT)",
                             "last pass completed: PlanMemory (hivm-plan-memory)"]


def test_crash_after_last_pass_is_not_pass():
    assert not L.classify_bishengir(-11, HIVMC_MISSING_LOG).ok


def test_parse_error_before_any_pass():
    log = 'kernel.ttadapter:3:5: error: custom op \'foo.bar\' is unknown\n'
    o = L.classify_bishengir(1, log)
    assert (o.ok, o.stage, o.passes) == (False, "bishengir", 0)
    assert o.reasons == ["kernel.ttadapter:3:5: error: custom op 'foo.bar' is unknown"]


def test_real_hivmc_rejecting_is_fail_and_success_is_binary():
    log = _dumps(_PASS_ORDER) + 'loc("k":1:1): error: External hivmc run fails, returning module\nhivmc: bad thing\n'
    o = L.classify_bishengir(1, log)
    assert not o.ok and o.stage == "hivmc"
    assert L.classify_bishengir(0, _dumps(_PASS_ORDER)) == L.Outcome("binary", 4, True, [])


def test_unknown_exit_without_message():
    o = L.classify_bishengir(3, "")
    assert not o.ok and o.reasons == ["bishengir-compile exited 3 without a message"]


# ------------------------------------------------------------------ triton.compile errors

def test_frontend_error():
    msg = ("at 5:29:\ndef broken(x_ptr, out_ptr, n, BLOCK: tl.constexpr):\n    tl.store(out_ptr + offs, "
           "tl.load(x_ptr))\n"
           "                             ^\nValueError('[fp8, fp64] is unsupported on Ascend for now.')")
    stage, reasons = L.classify_triton_error("CompilationError", msg)
    assert stage == "frontend"
    assert reasons == ["CompilationError at 5:29: ValueError('[fp8, fp64] is unsupported on Ascend for now.')"]


def test_adapter_and_binary_stage_errors():
    msg = ("\n///------------------[ERROR][Triton][BEG]------------------\n[ConvertTritonIRToLinalgIR] encounters "
           "error:\n"
           "/tmp/t/kernel.ttir.mlir:7:10: error: failed to legalize operation 'tt.foo'\n\n"
           "[INFO]: The compiled kernel cache is in /tmp/c/x\n\n///------------------[ERROR][Triton][END]---\n")
    assert L.classify_triton_error("MLIRCompilationError", msg) == (
        "ttadapter", ["kernel.ttir.mlir:7:10: error: failed to legalize operation 'tt.foo'"])
    binary = "[ConvertLinalgRToBinary] encounters error:\nASCEND_HOME_PATH is not set, source set_env.sh first\n"
    stage, reasons = L.classify_triton_error("MLIRCompilationError", binary)
    assert stage == "binary" and reasons == ["ASCEND_HOME_PATH is not set, source set_env.sh first"]
    assert L.classify_triton_error("KeyError", "'x'") == ("frontend", ["KeyError: 'x'"])


# ------------------------------------------------------------------ signature building (no triton needed)

def _fake_jit(fn, constexpr_names):
    params = [SimpleNamespace(is_constexpr=n in constexpr_names) for n in inspect.signature(fn).parameters]
    return SimpleNamespace(fn=fn, params=params, __name__=fn.__name__)


def _kern(x_ptr, n, out_ptr, eps, BLOCK, NPROG=40):
    pass


def test_build_source_orders_signature_and_fills_defaults():
    jf = _fake_jit(_kern, {"BLOCK", "NPROG"})
    sig = {"out_ptr": "*bf16", "eps": "fp32", "x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    case = SimpleNamespace(name="k", fn=jf, signature=sig, constexprs={"BLOCK": 256})
    sig, cst, hints = L.build_source(case)
    assert list(sig.items()) == [("x_ptr", "*fp32"), ("n", "i32"), ("out_ptr", "*bf16"), ("eps", "fp32")]
    assert cst == {"BLOCK": 256, "NPROG": 40}
    assert hints == {0: 16, 2: 16}


def test_build_source_rejects_bad_cases():
    jf = _fake_jit(_kern, {"BLOCK", "NPROG"})
    with pytest.raises(ValueError, match="BLOCK has no value"):
        L.build_source(SimpleNamespace(name="k", fn=jf, signature={"x_ptr": "*fp32", "n": "i32", "out_ptr": "*fp32",
                                                                    "eps": "fp32"}, constexprs={}))
    with pytest.raises(ValueError, match="eps has no type"):
        L.build_source(SimpleNamespace(name="k", fn=jf, signature={"x_ptr": "*fp32", "n": "i32", "out_ptr": "*fp32"},
                                       constexprs={"BLOCK": 1}))
    with pytest.raises(ValueError, match="typo not arguments"):
        L.build_source(SimpleNamespace(name="k", fn=jf, signature={"typo": "i32"}, constexprs={}))


# ------------------------------------------------------------------ table, summary, exit code

def _results():
    reasons = ["error: ub overflow", "failed pass: X", "note 1", "note 2"]
    return [L.Result("attn", "Ascend910B3", "hivmc", 386, True, 12.5),
            L.Result("gate_topk", "Ascend910_9391", "hivm", 695, False, 1.25, reasons)]


def test_table_layout():
    lines = L.format_table(_results()).splitlines()
    assert re.split(r"\s+", lines[0]) == ["kernel", "target", "stage", "passes", "result", "seconds"]
    assert set(lines[1]) <= {"-", " "}
    assert re.split(r"\s+", lines[2]) == ["attn", "Ascend910B3", "hivmc", "386", "PASS", "12.50"]
    assert re.split(r"\s+", lines[3]) == ["gate_topk", "Ascend910_9391", "hivm", "695", "FAIL", "1.25"]
    assert lines[4:] == ["    ! error: ub overflow", "    ! failed pass: X", "    ! note 1", "    ! ... 1 more (-v)"]
    assert lines[0].index("result") == lines[2].index("PASS")  # columns line up
    assert len(L.format_table(_results(), max_reasons=None).splitlines()) == 8


def test_exit_code_and_summary():
    ok, bad = _results()
    assert L.exit_code([ok]) == 0
    assert L.exit_code([ok, bad]) == 1
    assert L.exit_code([]) == 1  # nothing checked is a failure, not a pass
    assert "1 PASS, 1 FAIL" in L.summary([ok, bad], ["Ascend910B3", "Ascend910_9391"], 3.0)
    assert "-> OK" in L.summary([ok], ["Ascend910B3"], 1.0)
    assert "no cases" in L.summary([], ["Ascend910B3"], 0.0)


def test_pass_stage():
    assert L.pass_stage("canonicalize-module") == "hfusion"
    assert L.pass_stage("convert-hfusion-to-hivm") == "hivm"
    assert L.pass_stage("hivm-plan-memory") == "hivm"
    assert L.pass_stage("convert-hivm-to-std") == "hivm-to-std"


def test_outside_the_ascend_venv_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(L, "check_environment", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert L.main(["--module", "tests.ascend_lowering_samples"]) == 2
    assert os.environ.get("TRITON_INTERPRET") == "1"  # the main environment's kernel tests keep their interpreter
    err = capsys.readouterr().err
    assert ".ci/ascend-lowering" in err and err.count("\n") == 1


def test_this_python_is_not_the_ascend_venv():
    # the main environment keeps upstream triton: the tool must refuse it rather than half-run
    pytest.importorskip("triton")
    if L.check_environment() is not None:
        pytest.skip("running inside the triton-ascend venv")
    assert L.check_environment() is None


# ------------------------------------------------------------------ end to end in .venv-ascend

def _run_tool(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    return subprocess.run([str(VENV_PY), "-m", "backends.ascend.lowering", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _rows(stdout):
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[4] in ("PASS", "FAIL"):
            rows[(parts[0], parts[1])] = (parts[2], parts[4])
    return rows


needs_venv = pytest.mark.skipif(not VENV_PY.exists(), reason=".venv-ascend missing (create it with .ci/ascend-lowering;"
                                " triton-ascend cannot share the main environment with upstream triton)")


@needs_venv
def test_samples_pass_in_ascend_venv():
    r = _run_tool("--module", "tests.ascend_lowering_samples", "--targets", "Ascend910B3,Ascend910_9391")
    rows = _rows(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(rows) == 6 and all(v == ("hivmc", "PASS") for v in rows.values()), r.stdout


@needs_venv
def test_broken_samples_fail_in_ascend_venv():
    r = _run_tool("--module", "tests.ascend_lowering_samples:BROKEN_CASES", "--targets", "Ascend910B3")
    rows = _rows(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr
    assert rows == {("broken_fp64_scale", "Ascend910B3"): ("frontend", "FAIL"),
                    ("broken_ub_overflow", "Ascend910B3"): ("hivm", "FAIL"),
                    ("broken_sort_i32", "Ascend910B3"): ("hivm", "FAIL")}, r.stdout
    assert "fp64] is unsupported on Ascend" in r.stdout
    assert "error: ub overflow" in r.stdout
    assert "'hivm.hir.vsort' op failed to verify" in r.stdout


@needs_venv
def test_zero_cases_is_failure_in_ascend_venv():
    r = _run_tool("--module", "tests.ascend_lowering_samples", "--kernels", "no-such-kernel")
    assert r.returncode == 1 and "no cases" in r.stdout
