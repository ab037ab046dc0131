import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import pytest
import torch

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


@pytest.fixture
def no_triton_interpreter(monkeypatch):
    """The Triton kernel tests turn on TRITON_INTERPRET for the session (kernels are decorated at
    import); tests about what a bare CPU machine reports must not see it."""
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
