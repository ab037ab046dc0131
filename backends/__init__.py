"""Backend registry: which ops run where.

A backend declares its name, device type, whether it can run here (and if not, a sentence that
says what to install), the ops it implements, the dtypes / numerics modes it supports and its own
settings (`BackendOption`: `runtime.backend_options.<backend>.<option>` in a runtime YAML,
`--<backend>-<option>` on the command line, validated here against the declaration).
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

from v4.errors import BackendUnavailable, ConfigError
from v4.ops import OP_NAMES  # the op set; its contract (types, signatures) is v4.ops. Also read as backends.OP_NAMES

# Ops that consume prepared weights. A backend's weight form is its own, so these ops and the
# prepare hooks come from one backend together: if any is filled from reference, all are.
WEIGHT_OPS = ("linear", "grouped_out_proj", "moe_experts")
WEIGHT_HOOKS = ("prepare_linear", "prepare_experts")

# `auto` tries these in order.
AUTO_ORDER = ("cuda", "ascend", "reference")


@dataclass(frozen=True)
class BackendOption:
    """One setting a backend declares in its package's `OPTIONS` (read without probing the backend).

    It is `runtime.backend_options: {<backend>: {<name>: value}}` in a runtime YAML and
    `--<backend>-<name>` on the command line (`add_option_flags`), and reaches only that backend, as
    `make_ops(device, <name>=value)`, whose default must be `default`."""

    name: str
    default: object
    choices: tuple = ()  # the accepted values (empty: any value `check` accepts)
    help: str = ""
    check: Callable | None = None  # value -> None, or what is wrong with it ("must be ..."), beyond `choices`

    def flag(self, backend: str) -> str:
        return f"--{backend}-{self.name.replace('_', '-')}"

    def as_dict(self, backend: str) -> dict:
        """For `dsv4 backends --json`."""
        return {"name": self.name, "field": f"runtime.backend_options.{backend}.{self.name}",
                "flag": self.flag(backend), "default": self.default, "choices": list(self.choices), "help": self.help}

    def problem(self, value) -> str | None:
        """None when `value` is acceptable, else what is wrong with it (to follow a field name)."""
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        return self.check(value) if self.check is not None else None


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
    options: tuple = ()  # its settings (BackendOption), from the package's OPTIONS; `probe` fills them in


@dataclass
class _Entry:
    # package that defines `probe() -> BackendInfo` and `make_ops(device, **options) -> ops`, and optionally
    # `OPTIONS` (its BackendOption declarations: the keyword arguments of make_ops) and
    # `readiness_report() -> str` (what a real run of it needs on this machine; `dsv4 backends` prints it).
    # The package itself imports no kernels (only probe / make_ops do), so OPTIONS is cheap to read.
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
        info = mod.probe()
    except Exception as e:  # noqa: BLE001
        info = BackendInfo(name, "?", False, f"{_REGISTRY[name].module}.probe() failed: {e}", frozenset(), (), ())
    info.options = tuple(getattr(mod, "OPTIONS", ()))  # declared whether or not the backend can run here
    return info


# ------------------------------------------------------------------ backend options
def declared_options(name: str) -> tuple:
    """The settings backend `name` declares (its package's OPTIONS), without probing it: a runtime
    config that names an option of a backend missing here still validates (and reads the same)."""
    if name not in _REGISTRY:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of: {', '.join(_REGISTRY)}")
    try:
        mod = importlib.import_module(_REGISTRY[name].module)
    except Exception:  # noqa: BLE001 - `probe` says why; a backend that cannot be imported declares nothing
        return ()
    return tuple(getattr(mod, "OPTIONS", ()))


def check_options(options) -> dict:
    """`runtime.backend_options` ({backend: {option: value}}) against every backend's declaration.
    Returns a copy; raises ConfigError naming the field (`runtime.backend_options.ascend.weights`)."""
    where = "runtime.backend_options"
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(f"field '{where}' must be a mapping of backend name -> {{option: value}}, "
                          f"e.g. {{ascend: {{weights: w8a8}}}}; got {options!r}")
    out = {}
    for backend, opts in options.items():
        if backend not in _REGISTRY:
            raise ConfigError(f"field '{where}' names unknown backend {backend!r}; backends: {', '.join(_REGISTRY)}")
        declared = {o.name: o for o in declared_options(backend)}
        opts = {} if opts is None else opts
        if not isinstance(opts, dict):
            raise ConfigError(f"field '{where}.{backend}' must be a mapping of option -> value, got {opts!r}")
        for key, value in opts.items():
            if key not in declared:
                raise ConfigError(f"field '{where}.{backend}': backend '{backend}' has no option {key!r} "
                                  f"(it declares: {', '.join(declared) or 'none'})")
            why = declared[key].problem(value)
            if why is not None:
                raise ConfigError(f"field '{where}.{backend}.{key}' {why}")
        out[backend] = dict(opts)
    return out


def _dest(backend: str, opt: BackendOption) -> str:
    return f"backend_option__{backend}__{opt.name}"


def add_option_flags(parser) -> None:
    """One flag per option every registered backend declares (`--ascend-weights`, ...), each
    overriding `runtime.backend_options.<backend>.<option>`; `option_overrides` reads them back."""
    group = parser.add_argument_group("backend options (runtime.backend_options; each reaches its own backend only)")
    for backend in _REGISTRY:
        for opt in declared_options(backend):
            group.add_argument(opt.flag(backend), dest=_dest(backend, opt), choices=list(opt.choices) or None,
                               help=f"overrides runtime.backend_options.{backend}.{opt.name}: {opt.help} "
                                    f"(default {opt.default})")


def option_overrides(args) -> dict:
    """{backend: {option: value}} of the flags `add_option_flags` added and the command line set."""
    out: dict = {}
    for backend in _REGISTRY:
        for opt in declared_options(backend):
            value = getattr(args, _dest(backend, opt), None)
            if value is not None:
                out.setdefault(backend, {})[opt.name] = value
    return out


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
        raise BackendUnavailable(
            f"backend '{chosen}' does not support numerics mode '{mode}' (it supports: {', '.join(info.modes)})"
        )
    if dtype is not None and dtype not in info.dtypes:
        raise BackendUnavailable(
            f"backend '{chosen}' does not support dtype '{dtype}' (it supports: {', '.join(info.dtypes)})"
        )
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
    rows.append(
        ["dtypes"] + [",".join(d.replace("float", "f").replace("bf", "bf") for d in i.dtypes) or "-" for i in infos]
    )
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
    opts = [(i.name, o) for i in infos for o in i.options]
    if opts:
        lines.append("")
        lines.append("backend options (runtime.backend_options: {backend: {option: value}}, or the flag):")
        for name, o in opts:
            values = "|".join(map(str, o.choices)) or "value"
            lines.append(f"  {name}.{o.name} = {values} (default {o.default}; {o.flag(name)}): {o.help}")
    return "\n".join(lines)
