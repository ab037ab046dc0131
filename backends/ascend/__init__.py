"""Ascend backend: CANN fused ops through torch_npu + Triton-Ascend kernels (see ops.py for the map).

Three ways this backend can be here:
- on an Ascend machine (CANN + torch_npu + triton-ascend + an NPU): the real thing;
- emulated on CPU, only when asked for (`DSV4_ASCEND_EMULATE=1`): torch_npu's ops replaced by
  the CPU emulations of `emulation.py`, the Triton-Ascend kernels run in upstream Triton's
  interpreter (TRITON_INTERPRET=1, set for the process). For checking the adapter and the
  kernels' numerics; `auto` never picks it and every report says "emulated on CPU";
- not at all: `probe()` says what is missing, and `readiness()` lists every requirement with how
  to get it (`dsv4 backends` prints it).

torch_npu is never imported at module level: installed without CANN it breaks even `import torch`.
"""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass

from .. import BackendOption
from .. import installed as _installed

EMULATE_ENV = "DSV4_ASCEND_EMULATE"
DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_FORMATS = ("dequant", "w8a8")

# This backend's settings: runtime.backend_options.ascend.<name>, --ascend-<name>; make_ops takes them.
OPTIONS = (
    BackendOption("weights", "dequant", WEIGHT_FORMATS,
                  "weight form: dequant (FP8/FP4 -> working dtype at load) or w8a8 (int8 weights, per-token int8 "
                  "activations)"),
)


def emulate_requested() -> bool:
    return os.environ.get(EMULATE_ENV, "0") not in ("", "0")


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cann_home() -> str | None:
    return os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME")


@dataclass
class Check:
    item: str
    ok: bool | None  # None: not applicable / informational
    detail: str
    fix: str = ""


def _cann_checks(cann: str | None) -> list[Check]:
    """The CANN toolkit, and (once it is set up) the collective library torch_npu links against."""
    hccl = bool(cann) and any(
        os.path.exists(os.path.join(cann, d, "libhccl.so"))
        for d in ("lib64", "runtime/lib64", "aarch64-linux/lib64", "x86_64-linux/lib64")
    )
    checks = [
        Check(
            "CANN toolkit",
            bool(cann),
            f"ASCEND_HOME_PATH={cann}" if cann else "not set up",
            "install CANN 8.5+ (toolkit + kernels for your chip) and `source "
            "/usr/local/Ascend/ascend-toolkit/set_env.sh`",
        )
    ]
    if cann:
        checks.append(
            Check(
                "libhccl.so",
                hccl,
                "found under the CANN home" if hccl else "not found under the CANN home",
                "re-source set_env.sh; check the toolkit install is complete (torch_npu links libhccl)",
            )
        )
    return checks


def _torch_checks() -> list[Check]:
    """torch must be a CPU wheel for torch_npu to load; torch_npu itself, and the autoload switch it obeys."""
    import torch

    cuda_build = torch.version.cuda is not None
    checks = [
        Check(
            "CPU torch wheel",
            not cuda_build,
            f"torch {torch.__version__}" + (" is a CUDA build" if cuda_build else ""),
            "torch_npu refuses a second accelerator: in the NPU environment install the CPU wheel "
            "(pip install torch==<torch_npu's torch version> --index-url https://download.pytorch.org/whl/cpu)",
        )
    ]
    tnpu = _dist_version("torch-npu")
    checks.append(
        Check(
            "torch_npu",
            tnpu is not None,
            f"torch-npu {tnpu}" if tnpu else "not installed",
            "pip install 'dsv4[ascend]' (torch-npu must match torch's version: torch-npu 2.14.0 needs torch 2.14.0)",
        )
    )
    if tnpu:
        auto = os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD", "1")
        checks.append(
            Check(
                "TORCH_DEVICE_BACKEND_AUTOLOAD",
                None,
                f"={auto}",
                "torch_npu registers itself for autoload: without CANN, `import torch` fails unless this is 0; "
                "with CANN leave it unset (1)",
            )
        )
    return checks


def _triton_ascend_checks(cann: str | None) -> list[Check]:
    """triton-ascend owning the `triton` module, and the CANN compiler its kernels are lowered with."""
    tasc = _dist_version("triton-ascend")
    up = _dist_version("triton")
    checks = [Check("triton-ascend", tasc is not None, f"triton-ascend {tasc}" if tasc else "not installed",
                    "pip uninstall -y triton && pip install --no-deps --force-reinstall triton-ascend "
                    "(it replaces the `triton` module; upstream triton must not be installed after it)")]
    if tasc and up:
        checks.append(
            Check(
                "upstream triton",
                False,
                f"triton {up} is installed too: whichever was installed last owns `triton/`",
                "pip uninstall -y triton && pip install --no-deps --force-reinstall triton-ascend",
            )
        )
    bisheng = shutil.which("bishengir-compile") is not None
    # without CANN its absence is expected, so it only informs
    checks.append(Check("bishengir-compile", bisheng if cann else None, "on PATH" if bisheng else "not on PATH",
                        "comes with CANN (and ascendnpu-ir for the offline lowering check)"))
    return checks


def _environment_checks() -> list[Check]:
    """The environment variables that choose devices, determinism and emulation."""
    devs = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    det = os.environ.get("HCCL_DETERMINISTIC")
    return [
        Check("ASCEND_RT_VISIBLE_DEVICES", None, devs if devs is not None else "unset (all NPUs visible)",
              "set it before the first NPU call to choose devices (like CUDA_VISIBLE_DEVICES)"),
        Check("HCCL_DETERMINISTIC", None if det == "strict" else False, det or "unset",
              "for parity runs across NPUs: export HCCL_DETERMINISTIC=strict (and the backend sets "
              "torch_npu.npu.set_deterministic_level(1) when it loads)"),
        Check("emulation", None, "requested (DSV4_ASCEND_EMULATE=1)" if emulate_requested() else "off",
              "DSV4_ASCEND_EMULATE=1 runs this backend on CPU with emulated CANN ops (checking only)"),
    ]


def readiness() -> list[Check]:
    """Every requirement of a real Ascend run, on this machine, with what to do about each."""
    # torch first, as before the split: if `import torch` fails (torch_npu autoload without CANN), nothing is listed
    import torch  # noqa: F401

    cann = _cann_home()
    return _cann_checks(cann) + _torch_checks() + _triton_ascend_checks(cann) + _environment_checks()


def format_readiness(checks: list[Check] | None = None) -> str:
    checks = readiness() if checks is None else checks
    mark = {True: "ok  ", False: "MISS", None: "info"}
    lines = ["Ascend readiness (what a real NPU run needs on this machine):"]
    for c in checks:
        lines.append(f"  [{mark[c.ok]}] {c.item}: {c.detail}")
        if c.ok is False and c.fix:
            lines.append(f"         -> {c.fix}")
    return "\n".join(lines)


def readiness_report() -> str:
    """This backend's entry in `backends.readiness_reports()` (printed by `dsv4 backends`)."""
    return format_readiness()


def _real_reason() -> str | None:
    """None when a real Ascend run can start here, else the first blocking sentence."""
    if not _installed("torch_npu"):
        return (
            "torch_npu is not installed (pip install 'dsv4[ascend]' on a machine with CANN 8.5+; "
            "`dsv4 backends` lists what else is needed)"
        )
    if not _cann_home():
        return "CANN is not set up (source /usr/local/Ascend/ascend-toolkit/set_env.sh)"
    if _dist_version("triton-ascend") is None:
        return "triton-ascend is not installed (pip install --no-deps --force-reinstall triton-ascend)"
    try:
        import torch

        importlib.import_module("torch_npu")  # CANN is set up: the import is safe now, and registers torch.npu

        if not torch.npu.is_available():
            return "torch_npu sees no NPU (check npu-smi info and ASCEND_RT_VISIBLE_DEVICES)"
    except Exception as e:  # noqa: BLE001
        return f"torch_npu not importable: {e}"
    return None


def _ops():
    from .ops import IMPLEMENTED

    return frozenset(IMPLEMENTED)


def probe():
    from backends import BackendInfo

    if emulate_requested():
        if not _installed("triton"):
            return BackendInfo(
                "ascend",
                "cpu (emulated)",
                False,
                "emulation runs the Triton-Ascend kernels in Triton's interpreter: pip install triton",
                frozenset(),
                (),
                (),
            )
        return BackendInfo(
            "ascend",
            "cpu (CANN ops emulated, Triton-Ascend kernels interpreted)",
            True,
            "",
            _ops(),
            DTYPES,
            ("plain",),
            notes="emulated on CPU (DSV4_ASCEND_EMULATE=1): for checking, not a real NPU",
            auto=False,
        )
    why = _real_reason()
    if why is not None:
        return BackendInfo("ascend", "npu", False, why, _ops() if _installed("triton") else frozenset(), (), ())
    return BackendInfo("ascend", "npu", True, "", _ops(), DTYPES, ("plain",), notes="CANN ops + Triton-Ascend kernels")


def make_ops(device=None, weights: str = "dequant", chip: str | None = None):
    """weights: OPTIONS' `weights`; chip: A2 / A3 / 950 for the kernels' tiles (default: the one found here)."""
    from .ops import AscendOps

    if emulate_requested():
        # the kernels are decorated at import: the interpreter must be chosen before that
        os.environ["TRITON_INTERPRET"] = "1"
        from . import emulation

        return AscendOps(device or "cpu", npu=emulation, weights=weights, chip=chip)
    import torch_npu

    torch_npu.npu.set_deterministic_level(1)  # parity runs must be repeatable; HCCL_DETERMINISTIC covers collectives
    return AscendOps(device or "npu", npu=torch_npu, weights=weights, chip=chip)
