"""Conformance cases of the MoE gate (moe_gate).

The top-k cases that must be tie-free at the selection boundary (the tests assert it, and that the
bias steers picks) draw from fixed seeds, whatever the case's generator: their values stay the ones
checked tie-free. `topk_inputs` is the sized builder the kernel benches share.
"""

from __future__ import annotations

import torch

from .case import BF16, F32, LENGTHS, Case, randn
from .inputs import rng

ROUTE_SCALE = 1.5


def topk_inputs(r, T: int, E: int, D: int, k: int, bias_std: float, route_scale: float = ROUTE_SCALE,
                weight_role: str = "acc") -> list:
    """Bias top-k routing: x [T, D] (D), W [E, D] (acc: the gate's float32 weight; "D" for a weight in the
    working dtype), bias [E] (acc), no hash table, k, route_scale. `r(*shape, s=1.0)` draws s * N(0, 1)."""
    x, W = r(T, D), r(E, D, s=D ** -0.5)
    return [("D", x), (weight_role, W), ("acc", r(E, s=bias_std)), ("raw", None), ("raw", None), ("raw", k),
            ("raw", route_scale)]


def _fixed(seed: int, *size, **kw):
    """A build drawing topk_inputs(*size, **kw) from `seed` (float32 values) instead of the case's generator."""
    return lambda g, mode: (topk_inputs(rng(seed), *size, **kw), {})


def _topk_cases():
    """Bias top-k at the boundary token counts: 64 experts top-6 and 8 top-2; the bias is as large as
    the score spread, so it steers picks from `steer_from` tokens on."""
    for E, D, k, steer_from in ((64, 96, 6, 4), (8, 64, 2, 127)):
        for T in LENGTHS:
            yield Case("moe_gate", f"T={T},E={E},top{k}", _fixed(700 + T, T, E, D, k, 0.3), kind="gate",
                       extra={"steer_from": steer_from})


def _bf16_weight_cases():
    """bf16 weights (the 16-bit dot path), expert counts that are not a block multiple."""
    for T, E, D, k, rs in ((20, 8, 64, 2, 1.5), (5, 384, 256, 8, 2.5), (20, 40, 160, 6, 2.5)):
        yield Case("moe_gate", f"bf16 weight T={T},E={E},D={D},top{k}",
                   _fixed(800, T, E, D, k, 0.1, rs, weight_role="D"), dtypes=(BF16,), kind="gate",
                   extra={"tie_free": E < 64})


def _hash_cases():
    """Hash routing (the table's experts in the table's order) with int64 and int32 tables over 50
    token ids; every boundary token count with 8 experts top-2, the ends with 64 experts top-6."""
    def build(T, E, D, k, index_dtype):
        def inputs(g, mode):
            tid2eid = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(50)])  # [V, k]
            toks = torch.randint(0, 50, (T,), generator=g)
            return [("D", randn(g, T, D)), ("acc", randn(g, E, D, std=D ** -0.5)), ("acc", None),
                    ("raw", tid2eid.to(index_dtype)), ("raw", toks.to(index_dtype)), ("raw", k),
                    ("raw", ROUTE_SCALE)], {}
        return inputs

    for E, D, k, lengths in ((64, 96, 6, (1, 5, 129)), (8, 64, 2, LENGTHS)):
        for T in lengths:
            for idt in (torch.int64, torch.int32):
                yield Case("moe_gate", f"hash T={T},E={E},top{k},{str(idt)[6:]}", build(T, E, D, k, idt),
                           dtypes=(BF16,), kind="gate", extra={"hash": True})


def _all_and_ties():
    """Top-k = every expert; a full tie (every score sqrt(ln 2)): lowest index first."""
    yield Case("moe_gate", "top-k = all 8 experts", _fixed(750, 7, 8, 64, 8, 0.3, 2.0), dtypes=(F32,), kind="gate",
               extra={"all": True})

    def ties(g, mode):
        E, D, k = 64, 96, 6
        W = torch.randn(E, D, generator=torch.Generator().manual_seed(0))
        return [("D", torch.zeros(3, D)), ("acc", W), ("acc", torch.zeros(E)), ("raw", None), ("raw", None),
                ("raw", k), ("raw", ROUTE_SCALE)], {}

    yield Case("moe_gate", "full tie: lowest index first", ties, dtypes=(F32,), kind="gate", extra={"ties": True})


CASES = {"moe_gate": [*_topk_cases(), *_bf16_weight_cases(), *_hash_cases(), *_all_and_ties()]}
