"""Launch sizing shared by the split-K kernels."""

from __future__ import annotations

import functools

import torch

MAX_SPLITS = 32  # K splits: enough to spread a decode step's weight read, few for the reducer


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a launch should offer to fill the machine (small in the interpreter)."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4
