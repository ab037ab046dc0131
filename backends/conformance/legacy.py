"""Transitional: the two case formats before the merge into `Case` (backends/conformance/case.py).
`KernelCase` (the kernel tests' cases, already in their working dtype) and the boundary builders'
helpers. Goes when every op module exposes `CASES` only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .case import BF16, DTYPES, F32, LENGTHS, ROPE  # noqa: F401

TOKENS = LENGTHS
EPS = 1e-6


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * std


def _inv_freq():
    from v4.config import yarn_inv_freq

    return yarn_inv_freq(
        ROPE, 160000.0, {"factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}
    )


@dataclass(frozen=True)
class KernelCase:
    """One input set of an op: `build()` -> (args, kwargs) on CPU in the working dtype `dtype`;
    `extra` holds what the op's check needs beyond the inputs (selection size, expected behaviour)."""

    op: str
    name: str
    dtype: torch.dtype
    build: Callable[[], tuple]
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name


def _dt(dtype) -> str:
    return {F32: "f32", BF16: "bf16"}[dtype]
