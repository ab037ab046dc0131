"""Conformance cases of rms_norm and rope."""

from __future__ import annotations

import torch

from .case import LENGTHS, ROPE, Case, randn


def yarn_inv_freq() -> torch.Tensor:
    """V4-Flash's rope frequencies (YaRN, factor 16 over 65536 positions), float64 [ROPE / 2]."""
    from v4.config import yarn_inv_freq as inv_freq

    return inv_freq(ROPE, 160000.0, {"factor": 16, "original_max_position_embeddings": 65536,
                                     "beta_fast": 32, "beta_slow": 1}).double()


def _rms_norm_cases():
    """Rows of 96 (not a power of two: the tile is masked) at the boundary token counts; a float32
    weight; per-head norm of [T, H, d] without a weight (the q / kv norms)."""
    def rows(T, weight_role):
        return lambda g, mode: ([("D", randn(g, T, 96, std=3.0) + 0.5), (weight_role, 1 + randn(g, 96, std=0.2)),
                                 ("raw", 1e-6)], {})

    for T in LENGTHS:
        yield Case("rms_norm", f"T={T}", rows(T, "D"))
    yield Case("rms_norm", "T=5,fp32 weight", rows(5, "acc"))
    yield Case("rms_norm", "heads unweighted", lambda g, mode: ([("D", randn(g, 5, 3, 64)), ("raw", None),
                                                                 ("raw", 1e-6)], {}))


def _rope_cases():
    """[T, H, d] with 32 nope dims ahead of the 64 rope dims (copied unchanged), forward and inverse,
    positions from a random offset up to V4's 65536-position YaRN range."""
    def build(T, inverse):
        def inputs(g, mode):
            pos = torch.arange(T) + int(torch.randint(0, 65536, (1,), generator=g))
            return [("D", randn(g, T, 3, 96)), ("raw", pos), ("acc", yarn_inv_freq())], {"inverse": inverse}
        return inputs

    for T in LENGTHS:
        for inverse in (False, True):
            yield Case("rope", f"T={T},{'inverse' if inverse else 'forward'}", build(T, inverse), extra={"nope": 32})


CASES = {"rms_norm": list(_rms_norm_cases()), "rope": list(_rope_cases())}
