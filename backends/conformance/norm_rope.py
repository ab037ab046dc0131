"""Conformance cases of rms_norm and rope.

The sized builders (`rms_norm_inputs`, `rope_inputs`) are shared with the kernel benches: they take
`r(*shape, s=1.0)`, a draw of s * N(0, 1) (float64 on CPU for the cases, the bench's own device draw
there), and return the tagged inputs.
"""

from __future__ import annotations

import torch

from .case import LENGTHS, ROPE, Case, draw64


def yarn_inv_freq() -> torch.Tensor:
    """V4-Flash's rope frequencies (YaRN, factor 16 over 65536 positions), float64 [ROPE / 2]."""
    from v4.config import yarn_inv_freq as inv_freq

    return inv_freq(ROPE, 160000.0, {"factor": 16, "original_max_position_embeddings": 65536,
                                     "beta_fast": 32, "beta_slow": 1}).double()


def rms_norm_inputs(r, shape: tuple, weight_role: str | None = "D", scale: float = 3.0, shift: float = 0.5) -> list:
    """x [*shape] (D), scale * N(0, 1) + shift; weight [shape[-1]] around 1 in `weight_role` (None: no
    weight, the per-head q / kv norms); eps."""
    x = r(*shape, s=scale) + shift
    weight = None if weight_role is None else (weight_role, 1 + r(shape[-1], s=0.2))
    return [("D", x), weight or ("raw", None), ("raw", 1e-6)]


def rope_inputs(r, positions: torch.Tensor, heads: int, dim: int, inv_freq: torch.Tensor) -> list:
    """x [T, heads, dim] (D; the rope dims are the last 2 len(inv_freq)), positions [T], inv_freq (acc)."""
    return [("D", r(len(positions), heads, dim)), ("raw", positions), ("acc", inv_freq)]


def _rms_norm_cases():
    """Rows of 96 (not a power of two: the tile is masked) at the boundary token counts; a float32
    weight; per-head norm of [T, H, d] without a weight (the q / kv norms)."""
    for T in LENGTHS:
        yield Case("rms_norm", f"T={T}", lambda g, mode, T=T: (rms_norm_inputs(draw64(g), (T, 96)), {}))
    yield Case("rms_norm", "T=5,fp32 weight", lambda g, mode: (rms_norm_inputs(draw64(g), (5, 96), "acc"), {}))
    yield Case("rms_norm", "heads unweighted",
               lambda g, mode: (rms_norm_inputs(draw64(g), (5, 3, 64), None, 1.0, 0.0), {}))


def _rope_cases():
    """[T, H, d] with 32 nope dims ahead of the 64 rope dims (copied unchanged), forward and inverse,
    positions from a random offset up to V4's 65536-position YaRN range."""
    def build(T, inverse):
        def inputs(g, mode):
            pos = torch.arange(T) + int(torch.randint(0, 65536, (1,), generator=g))
            return rope_inputs(draw64(g), pos, 3, 96, yarn_inv_freq()), {"inverse": inverse}
        return inputs

    for T in LENGTHS:
        for inverse in (False, True):
            yield Case("rope", f"T={T},{'inverse' if inverse else 'forward'}", build(T, inverse), extra={"nope": 32})


CASES = {"rms_norm": list(_rms_norm_cases()), "rope": list(_rope_cases())}
