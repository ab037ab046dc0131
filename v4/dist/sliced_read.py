"""Reading one rank's slice of a checkpoint tensor straight from its stored form.

`rank_slice` (shard.py) answers in LOGICAL coordinates: rows or columns of the dequantised
[out, in] tensor. The stored forms are coarser along some dims:
- plain (F32 / BF16 / F16 / I64 / I32): one stored element per logical element, any range;
- FP8: F8_E4M3 data [out, in] + one scale per 128x128 block, along both dims;
- FP4: packed I8 data [out, in/2] (two values per byte along `in`) + one scale per 32 inputs:
  rows any range, columns in units of 32.

`plan_read` maps a Slice onto index tuples for the stored data and scale. When the range falls on
scale-cell boundaries (start a multiple of the cell, stop a multiple or the end of the dim) the
rank keeps the stored form (a `QuantizedWeight` of the slice). Otherwise it reads the smallest
covering run of whole cells, dequantises that and cuts the exact range (a float32 tensor); the
model takes either form. `read_stored` reads an index through safetensors' `get_slice`, so only
those bytes are requested from the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import QuantizedWeight
from ..weights import FP4_BLOCK, FP8_BLOCK
from .shard import SKIP, WHOLE, Slice

Index = tuple  # a tuple of python slices, one per leading dim it cuts


@dataclass(frozen=True)
class ReadPlan:
    """What to read of one weight and how to finish it.

    data / scale: index into the stored data / scale tensor, None = the whole tensor.
    cut: after dequantising what was read, keep this range of it (relative to what was read);
    None = return what was read as it is stored (a QuantizedWeight for FP8 / FP4).
    """

    data: Index | None = None
    scale: Index | None = None
    cut: Slice | None = None


def _cells(form: str, dim: int) -> tuple[int, int]:
    """(logical elements per scale cell, logical elements per stored data element) along `dim`."""
    if form == "fp8":
        return FP8_BLOCK, 1
    if form == "fp4":
        return (1, 1) if dim == 0 else (FP4_BLOCK, 2)
    raise ValueError(f"unknown stored form {form!r}")


def _index(dim: int, start: int, stop: int) -> Index:
    return (slice(None),) * dim + (slice(start, stop),)


def plan_read(name: str, form: str, shape: tuple[int, ...], answer) -> ReadPlan:
    """The reads for `answer` (WHOLE or a Slice) of tensor `name` with logical `shape`, stored as
    `form` ("plain" | "fp8" | "fp4")."""
    if answer == WHOLE:
        return ReadPlan()
    if not isinstance(answer, Slice):
        raise ValueError(f"select answered {answer!r} for {name}; expected WHOLE, SKIP or a Slice")
    dim, start, stop = answer.dim, answer.start, answer.stop
    if not 0 <= dim < len(shape) or not 0 <= start <= stop <= shape[dim]:
        raise ValueError(f"select answered {answer} for {name} of shape {list(shape)}, which is out of range")
    if form == "plain":
        return ReadPlan(data=_index(dim, start, stop))
    n = shape[dim]
    cell, pack = _cells(form, dim)
    if start % cell == 0 and (stop % cell == 0 or stop == n):
        lo, hi, cut = start, stop, None
    else:  # the covering run of whole cells, dequantised and cut afterwards
        lo = start // cell * cell
        hi = min(-(-stop // cell) * cell, n)
        cut = Slice(dim, start - lo, stop - lo)
    # lo and hi are multiples of the cell (or the dim's end, which is a multiple of `pack`)
    return ReadPlan(
        data=_index(dim, lo // pack, hi // pack),
        scale=_index(dim, lo // cell, -(-hi // cell)),
        cut=cut,
    )


def read_stored(handle, stored: str, index: Index | None) -> torch.Tensor:
    """One stored tensor, or the part of it `index` names, from an open safetensors file."""
    if index is None:
        return handle.get_tensor(stored)
    return handle.get_slice(stored)[index].contiguous()


def finish(form: str, data: torch.Tensor, scale: torch.Tensor | None, plan: ReadPlan):
    """The loaded weight from what was read: the plain tensor, a QuantizedWeight, or (plan.cut)
    the exact range of the dequantised covering slice as float32."""
    if form == "plain":
        return data
    w = QuantizedWeight(fmt=form, data=data, scale=scale)
    if plan.cut is None:
        return w
    c = plan.cut
    return w.dequantize(torch.float32).narrow(c.dim, c.start, c.stop - c.start).contiguous()


__all__ = ["ReadPlan", "plan_read", "read_stored", "finish", "WHOLE", "SKIP", "Slice"]
