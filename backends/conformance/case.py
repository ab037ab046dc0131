"""One conformance case: an op's inputs, tagged with the role each plays, drawn in float64.

The same `Case` feeds both readers:
- the conformance tests (tests/conformance/) run it over every backend with a kernel for the op, in
  each of its working dtypes (`Case.dtypes`), through `kernel_args`;
- `dsv4 parity ops` (parity/opcheck.py) hands the truth side float64 and backend B its dtype, per
  role, and scores the outputs with the comparator `Case.kind`.

Roles: `D` (activations: the working dtype), `acc` (float32, the accumulation dtype; float64 in a
float64 run), `W` (a stored weight: each side brings it into its form with its own
`prepare_linear`), `experts` / `shared` (routed / shared expert weights, through `prepare_experts`),
`rows` (a `DecodeRows` layout), `raw` (as it is: ints, index tensors, specs, scalars).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
DTYPES = (F32, BF16)
# boundary token counts: around 4-token compression windows, 16-token blocks, the 128 window and a
# persistent loop's wrap
LENGTHS = (1, 3, 4, 5, 127, 128, 129)
H, HD, ROPE, DM, NHC = 4, 128, 64, 64, 4  # heads, head dim, rope dims, hidden, mHC streams


@dataclass(frozen=True)
class Case:
    """`build(g, mode)` -> ([(role, value)], kwargs): the inputs, floating values in float64 (or already
    rounded to the case's dtype), drawn from the generator `g`; `mode` is "plain" or "exact" (FP8 / FP4
    quantisation on). `dtypes`: the working dtypes the tests run the case in. `kind`: `dsv4 parity
    ops`' comparator (tensor, compress, indexer, gate). `extra`: what a test's check needs beyond the
    inputs (selection size, expected behaviour, kernel block sizes)."""

    op: str
    name: str
    build: Callable[[torch.Generator, str], tuple[list, dict]]
    dtypes: tuple = DTYPES
    kind: str = "tensor"
    extra: dict = field(default_factory=dict)

    def inputs(self, seed: int = 0, mode: str = "plain") -> tuple[list, dict]:
        """The case's tagged inputs; the same for every reader with the same seed (a case's generator
        is seeded by its op and name, so adding a case does not change the others)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{self.op}/{self.name}".encode()))
        return self.build(g, mode)

    def __repr__(self) -> str:
        return self.name


def randn(g: torch.Generator, *shape, std: float = 1.0) -> torch.Tensor:
    """std * N(0, 1) in float64 from `g`."""
    return torch.randn(*shape, generator=g, dtype=F64) * std


def draw64(g: torch.Generator):
    """r(*shape, s=1.0): s * N(0, 1) in float64 from `g`, the draw the sized builders take."""
    return lambda *shape, s=1.0: randn(g, *shape, std=s)


def kernel_args(tagged: list, dtype: torch.dtype) -> list:
    """The values a kernel gets in working dtype `dtype`: `D` in dtype, `acc` in float32, the rest as
    they are (weights in the roles W / experts / shared are the op's test's to prepare)."""
    out = []
    for role, v in tagged:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and role in ("D", "acc"):
            v = v.to(dtype if role == "D" else F32)
        out.append(v)
    return out
