"""Backend registry: which ops run where.

A backend declares its name, device type, whether it can run here (and if not, a sentence that
says what to install), the ops it implements and the dtypes / numerics modes it supports.
`get_ops` hands the model an object with every op of the op set (the contract: `v4.ops.Ops`); ops
a backend lacks are filled from `reference` only when the runtime allows fallback, and the filled
ops are reported.

Kernel packages are imported only when their backend is probed or selected, so importing
`v4` or `backends` needs neither triton nor torch_npu.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

from v4.errors import BackendUnavailable
from v4.ops import OP_NAMES  # the op set; its contract (types, signatures) is v4.ops. Also read as backends.OP_NAMES

# Ops that consume prepared weights. A backend's weight form is its own, so these ops and the
# prepare hooks come from one backend together: if any is filled from reference, all are.
WEIGHT_OPS = ("linear", "grouped_out_proj", "moe_experts")
WEIGHT_HOOKS = ("prepare_linear", "prepare_experts")

# `auto` tries these in order.
AUTO_ORDER = ("cuda", "ascend", "reference")


@dataclass
class BackendInfo:
    name: str
    device_type: str
    available: bool
    reason: str  # why not available (empty when available)
    ops: frozenset  # op names implemented natively
    dtypes: tuple
    modes: tuple
    notes: str = ""
    auto: bool = True  # may `auto` pick it (False for check-only modes such as Triton's interpreter)


@dataclass
class _Entry:
    # package that defines `probe() -> BackendInfo` and `make_ops(device) -> ops`, and optionally
    # `readiness_report() -> str` (what a real run of it needs on this machine; `dsv4 backends` prints it)
    module: str
    probe: Callable | None = None


_REGISTRY: dict[str, _Entry] = {
    "reference": _Entry("backends.reference"),
    "cuda": _Entry("backends.cuda"),
    "ascend": _Entry("backends.ascend"),
}


def installed(name: str) -> bool:
    """Is package `name` importable here (without importing it)?"""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # an import hook that refuses the package counts as absent
        return False


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def probe(name: str) -> BackendInfo:
    """Availability of one backend. Never raises for a missing kernel stack: says why instead."""
    if name not in _REGISTRY:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of: auto, {', '.join(_REGISTRY)}")
    try:
        mod = importlib.import_module(_REGISTRY[name].module)
    except Exception as e:  # noqa: BLE001 - any import failure is a reason, not a crash
        return BackendInfo(name, "?", False, f"cannot import {_REGISTRY[name].module}: {e}", frozenset(), (), ())
    try:
        return mod.probe()
    except Exception as e:  # noqa: BLE001
        return BackendInfo(name, "?", False, f"{_REGISTRY[name].module}.probe() failed: {e}", frozenset(), (), ())


def resolve(name: str) -> str:
    """`auto` -> the first available of cuda, ascend, reference; a named backend must be available."""
    if name == "auto":
        for cand in AUTO_ORDER:
            info = probe(cand)
            if info.available and info.auto:
                return cand
        return "reference"
    info = probe(name)
    if not info.available:
        raise BackendUnavailable(f"backend '{name}' was asked for but is not available here: {info.reason}")
    return name


@dataclass
class OpsBundle:
    """What the model computes through: one attribute per op, plus where each op came from."""

    backend: str
    device: str
    impl: dict = field(default_factory=dict)  # op name -> backend that implements it
    fallback: tuple = ()

    def describe(self) -> str:
        if not self.fallback:
            return f"{self.backend} ({self.device})"
        return f"{self.backend} ({self.device}); from reference: {', '.join(self.fallback)}"


def get_ops(name: str = "auto", device: str | None = None, allow_fallback: bool = False, mode: str = "plain",
            dtype: str | None = None, backend_options: dict | None = None):
    """Build the ops object for a backend. Raises BackendUnavailable instead of falling back silently.

    backend_options: {backend name: {keyword: value}} passed to that backend's make_ops only
    (e.g. {"ascend": {"weights": "w8a8"}}), so one runtime config serves every backend."""
    chosen = resolve(name)
    info = probe(chosen)
    if mode not in info.modes:
        raise BackendUnavailable(f"backend '{chosen}' does not support numerics mode '{mode}' (it supports: {', '.join(info.modes)})")
    if dtype is not None and dtype not in info.dtypes:
        raise BackendUnavailable(f"backend '{chosen}' does not support dtype '{dtype}' (it supports: {', '.join(info.dtypes)})")
    mod = importlib.import_module(_REGISTRY[chosen].module)
    native = mod.make_ops(device, **(backend_options or {}).get(chosen, {}))
    missing = [op for op in OP_NAMES if op not in info.ops]
    if any(op in missing for op in WEIGHT_OPS):
        missing = [op for op in OP_NAMES if op in missing or op in WEIGHT_OPS]
    if missing and chosen != "reference":
        if not allow_fallback:
            raise BackendUnavailable(
                f"backend '{chosen}' does not implement {', '.join(missing)}; set runtime.allow_fallback: true "
                f"to run those ops with the reference backend"
            )
        ref = importlib.import_module("backends.reference").make_ops(native.device)
        native.capturable = False  # reference ops read the batch layout on the host: no graph capture
        for op in missing:
            setattr(native, op, getattr(ref, op))
        if any(op in missing for op in WEIGHT_OPS):
            for hook in WEIGHT_HOOKS:
                setattr(native, hook, getattr(ref, hook))
    native.impl = {op: ("reference" if op in missing else chosen) for op in OP_NAMES}
    native.fallback = tuple(missing) if chosen != "reference" else ()
    return native


def matrix() -> list[BackendInfo]:
    return [probe(n) for n in _REGISTRY]


def readiness_reports() -> list[str]:
    """Each registered backend's own readiness report, in registry order; a backend without one (or
    whose package cannot be imported here: `format_matrix` already says why) adds nothing."""
    reports = []
    for entry in _REGISTRY.values():
        try:
            mod = importlib.import_module(entry.module)
        except Exception:  # noqa: BLE001 - probe() reports the import failure
            continue
        report = getattr(mod, "readiness_report", None)
        if report is not None:
            reports.append(report())
    return reports


def format_matrix(infos: list[BackendInfo] | None = None) -> str:
    infos = infos if infos is not None else matrix()
    lines = []
    head = ["op"] + [i.name for i in infos]
    rows = [[op] + [("yes" if op in i.ops else "-") for i in infos] for op in OP_NAMES]
    rows.append(["available"] + [("yes" if i.available else "NO") for i in infos])
    rows.append(["device"] + [i.device_type for i in infos])
    rows.append(["dtypes"] + [",".join(d.replace("float", "f").replace("bf", "bf") for d in i.dtypes) or "-" for i in infos])
    rows.append(["modes"] + [",".join(i.modes) or "-" for i in infos])
    widths = [max(len(str(r[c])) for r in [head] + rows) for c in range(len(head))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines.append(fmt.format(*head))
    lines.append(fmt.format(*["-" * w for w in widths]))
    lines += [fmt.format(*r) for r in rows]
    lines.append("")
    for i in infos:
        status = "available" if i.available else f"unavailable: {i.reason}"
        lines.append(f"{i.name}: {status}" + (f" ({i.notes})" if i.notes else ""))
    return "\n".join(lines)
