import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import pytest
import torch

# Without a GPU every Triton kernel (CUDA and Ascend families alike) runs in Triton's interpreter on
# CPU tensors. `triton.jit` reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is
# first imported, so it is set here, once, before any test module imports triton: the result must not
# depend on which test files were collected, or in which order.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from v4.config import load_config_file


@pytest.fixture(scope="session")
def tiny_cfg():
    cfg, _ = load_config_file("tiny")
    return cfg


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (logits: the largest logit sets the scale)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


# The test models are tiny: one thread beats two (no spin-wait handoffs), and a busy machine
# cannot oversubscribe the cores.
torch.set_num_threads(1)


def _import_triton_kernels() -> None:
    """Import (so decorate) every Triton kernel module of both families now, under the interpreter."""
    import importlib
    import importlib.util
    import pkgutil

    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    for name in ("backends.cuda.kernels", "backends.ascend.kernels"):
        pkg = importlib.import_module(name)
        for info in pkgutil.walk_packages(pkg.__path__, name + "."):
            importlib.import_module(info.name)


@pytest.fixture
def no_triton_interpreter(monkeypatch):
    """TRITON_INTERPRET is on for the session without a GPU (set above); tests about what a bare CPU
    machine reports must not see it. A kernel module first imported while it is off would be decorated
    for a GPU and fail every later kernel test ("0 active drivers"), so the kernels are imported first."""
    _import_triton_kernels()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """DSV4_BACKEND overrides every selection; a value left in the shell must not steer the tests."""
    monkeypatch.delenv("DSV4_BACKEND", raising=False)


def run_step(model, ids, cache, slots, starts, lens, logits="all", **kw):
    """One model step over a StepBatch, with the cache bookkeeping the engine's runner does."""
    from v4.batch import StepBatch

    batch = StepBatch(slots, starts, lens, model.device)
    cache.reserve_step(batch)
    return model.forward(ids, batch, cache, logits, **kw)
