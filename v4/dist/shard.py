"""Which slice of each checkpoint tensor one rank reads (the layouts of `parallel`).

`rank_slice(name, cfg, place)` answers for a tensor of the official checkpoint, by its canonical
name (`v4.weights.expected_tensors`):
- `WHOLE`: the rank reads all of it (replicated);
- `SKIP`: the rank reads none of it (a routed expert another EP rank holds);
- `Slice(dim, start, stop)`: rows (dim 0) or columns (dim 1) [start, stop) of the logical
  (dequantised) tensor.
The loader maps a Slice onto the stored form (FP8 data + 128x128 block scales, packed FP4 + scales
per 32 inputs) and reads only those bytes; `slice_tensor` cuts an in-memory tensor the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .parallel import RankPlacement

WHOLE = "whole"
SKIP = "skip"


@dataclass(frozen=True)
class Slice:
    dim: int
    start: int
    stop: int


_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.(w[123])\.weight$")
_SHARED = re.compile(r"\.ffn\.shared_experts\.(w[123])\.weight$")


def _inter_slice(w: str, place: RankPlacement) -> Slice | str:
    a, b = place.moe_inter
    return Slice(1, a, b) if w == "w2" else Slice(0, a, b)  # w2 [D, I] by column, w1 / w3 [I, D] by row


def rank_slice(name: str, cfg, place: RankPlacement):
    """WHOLE, SKIP or a Slice of tensor `name` for the rank `place` describes."""
    lay = place.layout
    if lay.is_single:
        return WHOLE
    if name in ("embed.weight", "head.weight"):
        return Slice(0, *place.vocab) if lay.tp > 1 else WHOLE
    if m := _EXPERT.search(name):
        if lay.ep:
            return WHOLE if place.owns_expert(int(m.group(1))) else SKIP
        return _inter_slice(m.group(2), place) if lay.tp > 1 else WHOLE
    if m := _SHARED.search(name):
        return _inter_slice(m.group(1), place) if lay.tp > 1 and not lay.ep else WHOLE
    if lay.tp == 1 or ".attn." not in name or ".indexer." in name or ".compressor." in name:
        return WHOLE
    D, R = cfg.head_dim, cfg.o_lora_rank
    h0, h1 = place.heads
    g0, g1 = place.o_groups
    if name.endswith(".attn.wq_b.weight"):
        return Slice(0, h0 * D, h1 * D)
    if name.endswith(".attn.attn_sink"):
        return Slice(0, h0, h1)
    if name.endswith(".attn.wo_a.weight"):
        return Slice(0, g0 * R, g1 * R)
    if name.endswith(".attn.wo_b.weight"):
        return Slice(1, g0 * R, g1 * R)
    return WHOLE


def slice_tensor(t: torch.Tensor, s) -> torch.Tensor:
    """Cut a logical (float) tensor by a rank_slice answer (not SKIP)."""
    if s == WHOLE:
        return t
    return t.narrow(s.dim, s.start, s.stop - s.start).contiguous()


def shard_weights(weights: dict, cfg, place: RankPlacement) -> dict:
    """This rank's part of a full in-memory weight dict (random weights of --config runs)."""
    from ..quant import QuantizedWeight

    out = {}
    for name, t in weights.items():
        s = rank_slice(name, cfg, place)
        if s == SKIP:
            continue
        if isinstance(t, QuantizedWeight) and s != WHOLE:
            t = t.dequantize(torch.float32)
        out[name] = slice_tensor(t, s)
    return out
