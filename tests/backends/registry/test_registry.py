"""Backend registry, runtime selection, fallback, lazy imports (the config tests: tests/core/test_config.py).

Expected values come from design.md (registry rules), computed by hand in the tests, never read back
from our own output.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import backends
from backends.reference.ops import ReferenceOps
from v4.config import build_runtime
from v4.errors import BackendUnavailable, ConfigError

pytestmark = pytest.mark.usefixtures("no_triton_interpreter")

REPO = Path(__file__).resolve().parents[3]
KNOWN = ("reference", "cuda", "ascend")

HAVE_CUDA = importlib.util.find_spec("triton") is not None and torch.cuda.is_available()
HAVE_NPU = importlib.util.find_spec("torch_npu") is not None


# ----------------------------------------------------------------------------- registry


def test_op_set_is_the_design_table():
    # design.md "The seam: ops", in table order
    assert backends.OP_NAMES == (
        "rms_norm", "rope", "hc_pre", "hc_post", "hc_head", "compress", "indexer_topk",
        "attention", "moe_gate", "moe_experts", "linear", "grouped_out_proj",
    )
    assert set(KNOWN) <= set(backends.names())


def test_reference_available_with_every_op():
    info = backends.probe("reference")
    assert info.name == "reference"
    assert info.available is True
    assert info.reason == ""
    assert set(info.ops) == set(backends.OP_NAMES)
    assert {"plain", "exact"} <= set(info.modes)
    assert {"float32", "float64"} <= set(info.dtypes)


def test_reference_bundle_has_every_op_and_no_fallback():
    ops = backends.get_ops("reference", "cpu")
    for op in backends.OP_NAMES:
        assert callable(getattr(ops, op)), op
    assert ops.fallback == ()
    assert ops.impl == {op: "reference" for op in backends.OP_NAMES}
    assert str(ops.device) == "cpu"


@pytest.mark.skipif(HAVE_CUDA, reason="this machine has triton and a CUDA GPU")
def test_cuda_unavailable_says_what_to_install():
    info = backends.probe("cuda")
    assert info.available is False
    assert info.reason.strip()
    assert "install" in info.reason.lower()


def test_cuda_probe_names_the_triton_it_needs(monkeypatch):
    from backends import cuda

    assert cuda.triton_version_reason("3.6.0") is None and cuda.triton_version_reason("3.9.0") is None
    assert cuda.triton_version_reason("4.0.1+git1234") is None
    why = cuda.triton_version_reason("3.2.0")
    assert why == "triton 3.2.0 is older than the 3.6 the cuda backend's kernels need (pip install 'triton>=3.6')"
    import triton

    monkeypatch.setattr(triton, "__version__", "3.1.0")
    info = backends.probe("cuda")
    assert info.available is False and info.reason.startswith("triton 3.1.0 is older than the 3.6")


@pytest.mark.skipif(HAVE_NPU, reason="torch_npu is installed here")
def test_ascend_unavailable_says_what_to_install():
    info = backends.probe("ascend")
    assert info.available is False
    assert "torch_npu" in info.reason
    assert "install" in info.reason.lower()


@pytest.mark.skipif(HAVE_CUDA, reason="this machine has triton and a CUDA GPU")
@pytest.mark.parametrize("allow_fallback", [False, True])
def test_asking_for_unavailable_backend_raises_never_falls_back(allow_fallback):
    # allow_fallback fills missing *ops*; it must never replace a whole unavailable backend
    with pytest.raises(BackendUnavailable) as ei:
        backends.get_ops("cuda", allow_fallback=allow_fallback)
    msg = str(ei.value)
    assert "cuda" in msg
    assert backends.probe("cuda").reason in msg


@pytest.mark.skipif(HAVE_NPU, reason="torch_npu is installed here")
def test_asking_for_ascend_raises():
    with pytest.raises(BackendUnavailable, match="ascend"):
        backends.get_ops("ascend", allow_fallback=True)


@pytest.mark.skipif(HAVE_CUDA or HAVE_NPU, reason="an accelerator backend could be available here")
def test_auto_resolves_to_reference_here():
    assert backends.resolve("auto") == "reference"
    assert backends.get_ops("auto").impl["attention"] == "reference"


@pytest.mark.parametrize("call", [backends.probe, backends.resolve, backends.get_ops])
def test_unknown_backend_lists_valid_names(call):
    with pytest.raises(BackendUnavailable) as ei:
        call("tpu")
    msg = str(ei.value)
    assert "tpu" in msg
    for n in KNOWN + ("auto",):
        assert n in msg


def test_unknown_backend_in_runtime_config_lists_valid_names():
    with pytest.raises(ConfigError) as ei:
        build_runtime({"backend": "tpu"}, env={})
    msg = str(ei.value)
    assert "backend" in msg
    for n in KNOWN + ("auto",):
        assert n in msg
    with pytest.raises(ConfigError, match="backend"):
        build_runtime({}, env={"DSV4_BACKEND": "tpu"})


def test_format_matrix_lists_every_op_and_reasons():
    txt = backends.format_matrix()
    for op in backends.OP_NAMES:
        assert op in txt
    for n in KNOWN:
        assert n in txt
    for n in ("cuda", "ascend"):
        info = backends.probe(n)
        if not info.available:
            assert f"{n}: unavailable: {info.reason}" in txt


# ----------------------------------------------------------------------------- backend options


def test_each_backend_declares_its_options_with_make_ops_defaults():
    """OPTIONS are make_ops' keyword arguments, with the same defaults; probe() carries them whether
    or not the backend can run here, and the matrix lists them."""
    import inspect

    for name in KNOWN:
        mod = importlib.import_module(backends._REGISTRY[name].module)
        params = inspect.signature(mod.make_ops).parameters
        declared = backends.declared_options(name)
        for opt in declared:
            assert params[opt.name].default == opt.default, (name, opt.name)
            assert opt.problem(opt.default) is None
        assert backends.probe(name).options == declared
    assert [o.name for o in backends.declared_options("ascend")] == ["weights"]
    assert backends.declared_options("cuda") == () and backends.declared_options("reference") == ()
    assert "ascend.weights = dequant|w8a8 (default dequant; --ascend-weights)" in backends.format_matrix()


@pytest.mark.parametrize("options,needle", [
    ({"cuda": {"weights": "w8a8"}}, "backend 'cuda' has no option 'weights' (it declares: none)"),
    ({"gpu": {}}, "unknown backend 'gpu'; backends: reference, cuda, ascend"),
    ({"ascend": {"weights": "int4"}},
     "'runtime.backend_options.ascend.weights' must be one of dequant, w8a8, got 'int4'"),
    ({"ascend": "w8a8"}, "'runtime.backend_options.ascend' must be a mapping"),
    ("ascend=w8a8", "'runtime.backend_options' must be a mapping"),
])
def test_backend_options_are_checked_against_the_declarations(options, needle):
    with pytest.raises(ConfigError) as ei:
        build_runtime({"backend_options": options}, env={})
    assert needle in str(ei.value)


def _install_option_backend(monkeypatch):
    """A registered backend that declares one option (`tile`); make_ops records what it got."""
    got = []
    mod = types.ModuleType("dsv4_test_option_backend")
    mod.OPTIONS = (backends.BackendOption("tile", "64", ("64", "128"), "tile size"),)
    mod.probe = lambda: backends.BackendInfo("tiles", "cpu", True, "", frozenset(backends.OP_NAMES),
                                             ("float32",), ("plain",))

    def make_ops(device=None, tile="64"):
        got.append(tile)
        return ReferenceOps(device or "cpu")

    mod.make_ops = make_ops
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(backends._REGISTRY, "tiles", backends._Entry(mod.__name__))
    return got


def test_option_flags_are_generated_from_the_declarations(monkeypatch):
    """A backend's declared option becomes a flag of `dsv4 generate / serve / info` and of `dsv4 parity
    record / run`, overrides runtime.backend_options, and reaches that backend's make_ops only."""
    from v4 import cli

    got = _install_option_backend(monkeypatch)
    parser = cli.build_parser()
    a = parser.parse_args(["generate", "--config", "tiny", "--tiles-tile", "128", "--ids", "1"])
    over = cli._overrides(a)
    assert over["backend_options"] == {"tiles": {"tile": "128"}}
    rt = build_runtime({"backend_options": {"tiles": {"tile": "64"}, "ascend": {"weights": "w8a8"}}}, over, env={})
    assert rt.backend_options == {"tiles": {"tile": "128"}, "ascend": {"weights": "w8a8"}}
    backends.get_ops("tiles", backend_options=rt.backend_options)
    assert got == ["128"]
    assert cli._overrides(parser.parse_args(["generate", "--config", "tiny", "--ids", "1"]))["backend_options"] is None
    for argv in (["parity", "record", "--suite", "smoke", "--out", "x", "--tiles-tile", "128"],
                 ["parity", "run", "--tiles-tile", "128"], ["info", "--tiles-tile", "128"]):
        assert getattr(parser.parse_args(argv), "backend_option__tiles__tile") == "128"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--tiles-tile", "32"])


# ----------------------------------------------------------------------------- selection precedence


def test_selection_precedence_config_cli_env():
    cfg, cli = {"backend": "reference"}, {"backend": "cuda"}
    assert build_runtime(cfg, cli, env={"DSV4_BACKEND": "ascend"}).backend == "ascend"
    assert build_runtime(cfg, cli, env={}).backend == "cuda"
    assert build_runtime(cfg, {"backend": None}, env={}).backend == "reference"
    assert build_runtime(cfg, None, env={"DSV4_BACKEND": "ascend"}).backend == "ascend"
    assert build_runtime({}, None, env={}).backend == "auto"  # the documented default
    # other fields: CLI overrides the file, the file overrides the defaults
    rt = build_runtime({"dtype": "bfloat16", "max_num_seqs": 3}, {"dtype": "float64", "mode": None}, env={})
    assert (rt.dtype, rt.mode, rt.max_num_seqs) == ("float64", "plain", 3)


def test_selection_reads_process_environment(monkeypatch):
    monkeypatch.setenv("DSV4_BACKEND", "ascend")
    assert build_runtime({"backend": "reference"}, {"backend": "cuda"}).backend == "ascend"
    from v4.runtime import resolve

    _, rt = resolve(None, "tiny", None, {"backend": "reference"})
    assert rt.backend == "ascend"


# ----------------------------------------------------------------------------- a fake backend


def _install_fake(monkeypatch, declared=("rms_norm", "attention"), modes=("plain",), dtypes=("float32",)):
    """Register a backend module 'fake' that implements only `declared` (delegating to reference)."""
    calls = {op: 0 for op in declared}
    ref = ReferenceOps("cpu")

    class FakeOps:
        name = "fake"
        device = torch.device("cpu")

    def _wrap(op):
        fn = getattr(ref, op)

        def impl(*a, **kw):
            calls[op] += 1
            return fn(*a, **kw)

        impl.fake = True
        return impl

    def make_ops(device=None):
        o = FakeOps()
        for op in declared:
            setattr(o, op, _wrap(op))
        if "linear" in declared:  # the weight layout its own `linear` consumes
            o.prepare_linear = ref.prepare_linear
        return o

    def probe():
        return backends.BackendInfo("fake", "cpu", True, "", frozenset(declared), dtypes, modes)

    mod = types.ModuleType("dsv4_test_fake_backend")
    mod.probe, mod.make_ops = probe, make_ops
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(backends._REGISTRY, "fake", backends._Entry(mod.__name__))
    return calls


def test_fake_backend_missing_ops_refused_without_fallback(monkeypatch):
    _install_fake(monkeypatch)
    with pytest.raises(BackendUnavailable) as ei:
        backends.get_ops("fake", "cpu")
    msg = str(ei.value)
    assert "fake" in msg and "allow_fallback" in msg
    for op in ("rope", "compress", "moe_experts"):
        assert op in msg
    assert "rms_norm" not in msg.split("does not implement")[-1].split(";")[0]


def test_fake_backend_fallback_fills_and_reports(monkeypatch):
    _install_fake(monkeypatch)
    ops = backends.get_ops("fake", "cpu", allow_fallback=True)
    missing = tuple(op for op in backends.OP_NAMES if op not in ("rms_norm", "attention"))
    assert ops.fallback == missing
    assert ops.impl["rms_norm"] == "fake" and ops.impl["attention"] == "fake"
    assert all(ops.impl[op] == "reference" for op in missing)
    assert getattr(ops.rms_norm, "fake", False) and getattr(ops.attention, "fake", False)
    for op in missing:
        fn = getattr(ops, op)
        assert isinstance(getattr(fn, "__self__", None), ReferenceOps), op
    # unsupported mode / dtype of the fake are refused, not silently run elsewhere
    with pytest.raises(BackendUnavailable, match="exact"):
        backends.get_ops("fake", "cpu", allow_fallback=True, mode="exact")
    with pytest.raises(BackendUnavailable, match="float64"):
        backends.get_ops("fake", "cpu", allow_fallback=True, dtype="float64")
    # the fake shows up in the registry listing and the matrix
    assert "fake" in backends.names()
    assert "fake" in backends.format_matrix()


def _tiny_model(ops):
    from v4.config import load_config_file
    from v4.model import Transformer
    from v4.runtime import random_weights

    cfg, _ = load_config_file("tiny")
    return Transformer(cfg, random_weights(cfg, 0), ops, torch.float32, "plain")


@pytest.mark.parametrize("declared", [("rms_norm", "attention"), ("rms_norm",)])
def test_model_runs_on_partial_backend_with_fallback(monkeypatch, declared):
    """A partial backend + reference fill computes the same logits as the reference backend."""
    calls = _install_fake(monkeypatch, declared=declared)
    ops = backends.get_ops("fake", "cpu", allow_fallback=True)
    ids = [5, 6, 7, 8, 9]
    got = _tiny_model(ops).logits(ids)
    want = _tiny_model(backends.get_ops("reference", "cpu")).logits(ids)
    assert all(calls[op] > 0 for op in declared), calls
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- lazy imports

_LAZY_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = ("triton", "torch_npu")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import v4, v4.model, v4.cli, backends, backends.reference
    import backends.cuda, backends.ascend
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print(backends.format_matrix())
    print("CUDA_AVAILABLE", backends.probe("cuda").available)
    print("ASCEND_AVAILABLE", backends.probe("ascend").available)
    print("RESOLVED", backends.resolve("auto"))
    """
)


def test_imports_work_without_triton_and_torch_npu():
    env = {k: v for k, v in os.environ.items() if k != "DSV4_BACKEND"} | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _LAZY_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "CUDA_AVAILABLE False" in out
    assert "ASCEND_AVAILABLE False" in out
    assert "RESOLVED reference" in out
    assert "cuda: unavailable:" in out and "ascend: unavailable:" in out
    assert "triton is not installed" in out
    assert "torch_npu is not installed" in out
    for op in backends.OP_NAMES:
        assert op in out


def test_weight_ops_fall_back_together(monkeypatch):
    """A backend's `linear` consumes its own weight form: if moe_experts or grouped_out_proj come
    from reference, linear and the prepare hooks must come from reference as well."""
    _install_fake(monkeypatch, declared=("rms_norm", "linear"))
    ops = backends.get_ops("fake", "cpu", allow_fallback=True)
    assert ops.impl["linear"] == "reference" and "linear" in ops.fallback
    assert isinstance(ops.prepare_linear.__self__, ReferenceOps)
    assert isinstance(ops.prepare_experts.__self__, ReferenceOps)
