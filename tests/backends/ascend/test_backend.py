"""The Ascend backend's registry entry, readiness report, emulation switch and runtime options."""

import pytest
import torch

import backends
from backends import ascend
from v4 import cli
from v4.config import ConfigDeprecationWarning, RuntimeConfig, build_runtime, load_config_file
from v4.errors import BackendUnavailable, ConfigError

HAVE_NPU_STACK = ascend._installed("torch_npu")


@pytest.fixture
def no_emulation(monkeypatch):
    monkeypatch.delenv(ascend.EMULATE_ENV, raising=False)


@pytest.mark.skipif(HAVE_NPU_STACK, reason="torch_npu is installed here")
def test_without_npu_stack_ascend_is_unavailable_and_says_why(no_emulation):
    info = backends.probe("ascend")
    assert not info.available and "torch_npu is not installed" in info.reason and "dsv4[ascend]" in info.reason
    with pytest.raises(BackendUnavailable, match="torch_npu"):
        backends.get_ops("ascend")


@pytest.mark.skipif(HAVE_NPU_STACK, reason="torch_npu is installed here")
def test_readiness_lists_what_is_missing_and_how_to_get_it(no_emulation, monkeypatch):
    monkeypatch.delenv("ASCEND_HOME_PATH", raising=False)
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    checks = {c.item: c for c in ascend.readiness()}
    assert checks["CANN toolkit"].ok is False and "set_env.sh" in checks["CANN toolkit"].fix
    assert checks["torch_npu"].ok is False and "dsv4[ascend]" in checks["torch_npu"].fix
    assert checks["CPU torch wheel"].ok is (torch.version.cuda is None)
    assert checks["HCCL_DETERMINISTIC"].ok is False and "strict" in checks["HCCL_DETERMINISTIC"].fix
    text = ascend.format_readiness(list(checks.values()))
    assert "[MISS] CANN toolkit" in text and "-> install CANN" in text


def test_readiness_is_printed_by_dsv4_backends(capsys, no_emulation):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "Ascend readiness" in out and "torch_npu" in out and "ASCEND_RT_VISIBLE_DEVICES" in out


def test_emulation_only_on_request_and_never_auto(monkeypatch):
    monkeypatch.setenv(ascend.EMULATE_ENV, "1")
    info = backends.probe("ascend")
    assert info.available and info.auto is False
    assert "emulated" in info.device_type and "emulated on CPU" in info.notes
    assert info.modes == ("plain",)  # no FP8 on A2/A3: exact mode is refused, not approximated
    assert backends.resolve("auto") != "ascend"
    with pytest.raises(BackendUnavailable, match="numerics mode 'exact'"):
        backends.get_ops("ascend", mode="exact")
    ops = backends.get_ops("ascend", dtype="float32")
    assert ops.emulated and ops.fallback == () and set(ops.impl.values()) == {"ascend"}


def test_weight_option_reaches_the_backend(monkeypatch):
    monkeypatch.setenv(ascend.EMULATE_ENV, "1")
    ops = backends.get_ops("ascend", backend_options={"ascend": {"weights": "w8a8"}, "cuda": {"ignored": 1}})
    assert ops.weights == "w8a8"


def test_runtime_config_validates_ascend_weights():
    rt = RuntimeConfig.from_dict({"backend_options": {"ascend": {"weights": "w8a8"}}})
    assert rt.backend_options == {"ascend": {"weights": "w8a8"}}
    with pytest.raises(ConfigError, match="runtime.backend_options.ascend.weights' must be one of dequant, w8a8"):
        RuntimeConfig.from_dict({"backend_options": {"ascend": {"weights": "int4"}}})
    with pytest.raises(ConfigError, match="has no option 'wieghts'"):
        RuntimeConfig.from_dict({"backend_options": {"ascend": {"wieghts": "w8a8"}}})


def test_old_ascend_weights_field_still_works_and_says_the_new_form():
    with pytest.warns(ConfigDeprecationWarning, match=r"'runtime.ascend_weights' is deprecated; write "
                      r"'runtime.backend_options: \{ascend: \{weights: w8a8\}\}' instead"):
        assert RuntimeConfig.from_dict({"ascend_weights": "w8a8"}).backend_options == {"ascend": {"weights": "w8a8"}}
    with pytest.raises(ConfigError, match="runtime.ascend_weights"):
        RuntimeConfig.from_dict({"ascend_weights": "int4"})
    with pytest.warns(ConfigDeprecationWarning), pytest.raises(ConfigError, match="disagree"):
        RuntimeConfig.from_dict({"ascend_weights": "w8a8", "backend_options": {"ascend": {"weights": "dequant"}}})


def test_weights_option_is_declared_by_the_backend_and_becomes_a_flag(capsys):
    opts = {o.name: o for o in backends.declared_options("ascend")}
    assert opts["weights"].choices == ("dequant", "w8a8") and opts["weights"].default == "dequant"
    assert backends.probe("ascend").options == backends.declared_options("ascend")  # available or not
    args = cli.build_parser().parse_args(["generate", "--config", "tiny", "--ascend-weights", "w8a8", "--ids", "1"])
    over = cli._overrides(args)
    assert over["backend_options"] == {"ascend": {"weights": "w8a8"}} and "ascend_weights" not in over
    # the flag beats the runtime file, option by option
    rt = build_runtime({"backend_options": {"ascend": {"weights": "dequant"}}}, over, env={})
    assert rt.backend_options == {"ascend": {"weights": "w8a8"}}
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "--ascend-weights", "int4"])
    assert "invalid choice" in capsys.readouterr().err


def test_graph_capture_is_acl_graph_on_an_npu_only(monkeypatch):
    """The capture hook of the ascend backend: nothing on CPU (the emulation has no graphs), torch_npu's
    NPUGraph through v4.graphs.StreamCapture on an NPU (faked here: no NPU), imported only then."""
    import sys
    import types

    from v4.graphs import StreamCapture

    monkeypatch.setenv(ascend.EMULATE_ENV, "1")
    ops = backends.get_ops("ascend", dtype="float32")
    assert ops.capturable is False  # compress plans on the host: decode stays eager for now
    assert ops.graph_capture(torch.device("cpu")) is None
    npu_api = types.SimpleNamespace(NPUGraph=object)
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", npu_api, raising=False)
    cap = ops.graph_capture(types.SimpleNamespace(type="npu", index=0))
    assert isinstance(cap, StreamCapture) and cap.mode == "npu"
    assert cap.api is npu_api and cap.graph_class is npu_api.NPUGraph and "NPUGraph" in cap.what


def test_ascend_runtime_config_file():
    cfg, rt = load_config_file("ascend")
    assert cfg is None
    r = RuntimeConfig.from_dict(rt)
    assert r.backend == "ascend" and r.dtype == "bfloat16" and r.mode == "plain" and r.block_size % 16 == 0


def test_launch_sizing_follows_the_chip(monkeypatch):
    from backends.ascend.kernels import launch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("DSV4_ASCEND_CHIP", "Ascend910B3")
    assert launch.programs("cube", 1000) == 20 and launch.programs("vector", 1000) == 40
    assert launch.programs("vector", 3) == 3 and launch.programs("cube", 0) == 1
    monkeypatch.setenv("DSV4_ASCEND_CHIP", "Ascend910_9391")
    assert launch.programs("cube", 1000) == 24
    monkeypatch.setenv("DSV4_ASCEND_CHIP", "Ascend999")
    with pytest.raises(ValueError, match="DSV4_ASCEND_CHIP"):
        launch.chip_name()
    launch.check_ub("fits", launch.UB_BUDGET)
    with pytest.raises(ValueError, match="Unified Buffer"):
        launch.check_ub("too big", launch.UB_BUDGET + 1)
