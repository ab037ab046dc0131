"""Launch sizing for the Triton-Ascend kernels: core counts, Unified Buffer budget, lowering cases.

On an NPU the core counts come from the driver (`get_device_properties`); without one (the
interpreter in CI, the offline lowering check) from the chip table below. The table's figures
are the published configurations of the named parts; the kernels never depend on them for
correctness, only for how many programs share the work.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

# A2 / A3 (DaVinci C220): 192 KiB Unified Buffer per vector core (ascend.md §2.2); the compiler
# double-buffers by default, so a kernel's live tiles must fit half of it.
UB_BYTES = 192 * 1024
UB_BUDGET = UB_BYTES // 2


@dataclass(frozen=True)
class Chip:
    name: str  # the SoC name CANN and BiShengIR use (--target=...)
    generation: str  # "A2" | "A3" | "950"
    ai_cores: int  # cube cores (tl.dot kernels)
    vector_cores: int


CHIPS = {
    "Ascend910B3": Chip("Ascend910B3", "A2", 20, 40),
    "Ascend910B1": Chip("Ascend910B1", "A2", 24, 48),
    "Ascend910_9391": Chip("Ascend910_9391", "A3", 24, 48),
}
DEFAULT_CHIP = "Ascend910B3"


def chip_name() -> str:
    """The chip the kernels are sized for: DSV4_ASCEND_CHIP, else the A2 default."""
    name = os.environ.get("DSV4_ASCEND_CHIP", DEFAULT_CHIP)
    if name not in CHIPS:
        raise ValueError(f"DSV4_ASCEND_CHIP={name!r} is not a known chip; choose one of {', '.join(CHIPS)}")
    return name


@functools.lru_cache(maxsize=None)
def _device_cores(index: int) -> tuple[int, int]:
    import triton

    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return int(props["num_aicore"]), int(props["num_vectorcore"])


def cores(kind: str, device=None) -> int:
    """AI-core ("cube") or vector-core ("vector") count of the device, or of the chip table."""
    if kind not in ("cube", "vector"):
        raise ValueError(f"core kind must be 'cube' or 'vector', got {kind!r}")
    import torch

    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "npu":
        aic, aiv = _device_cores(dev.index if dev.index is not None else torch.npu.current_device())
    else:
        chip = CHIPS[chip_name()]
        aic, aiv = chip.ai_cores, chip.vector_cores
    return aic if kind == "cube" else aiv


def programs(kind: str, work: int, device=None) -> int:
    """Grid size: one program per core, never more programs than work items (at least 1)."""
    n = cores(kind, device)
    from ...triton_common import interpreting  # here: AscendOps imports this module without triton

    if interpreting():  # no kernel at hand: whether one decorated now would be interpreted
        n = min(n, 4)  # the interpreter runs programs one after another: fewer is just as correct
    return max(1, min(n, int(work)))


def check_ub(what: str, nbytes: int) -> None:
    """Fail early (and clearly) when a tile choice would overflow the Unified Buffer budget."""
    if nbytes > UB_BUDGET:
        raise ValueError(f"{what}: live tiles need {nbytes} B, more than the {UB_BUDGET} B Unified Buffer budget "
                         f"(half of {UB_BYTES} B for double buffering); use smaller BLOCK sizes")


@dataclass
class LoweringCase:
    """One kernel specialisation for the offline lowering check (backends/ascend/lowering.py).

    signature: argument name -> Triton type string ("*fp32", "*bf16", "*i32", "i32", "fp32", ...)
    for every non-constexpr argument; constexprs: name -> value for every tl.constexpr argument.
    Use V4-Flash shapes where they matter (head dim 512, 64 heads, ...).
    """

    name: str
    fn: object  # the @triton.jit function
    signature: dict
    constexprs: dict = field(default_factory=dict)
    kind: str = "vector"  # "vector" or "cube" (uses tl.dot)
