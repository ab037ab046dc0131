"""Conformance cases of the projections and experts: linear, grouped_out_proj, moe_experts.

Weights are drawn as float64 matrices in the roles `W` (one projection), `experts` (routed: lists W1,
W3 [I, D] and W2 [D, I], one per expert) and `shared` (the shared expert, or None); each side brings
them into its own form with its `prepare_linear` / `prepare_experts`, as the model does. In exact
mode the activations are FP8-quantised (`act_quant`), and `extra["formats"]` names the stored form
(FP8 blocks, FP4) each weight takes first, by role, as a checkpoint holds it.
"""

from __future__ import annotations

import torch

from .case import DM, HD, LENGTHS, Case, H, randn

E, TOPK, INTER = 8, 2, 64  # routed experts, experts per token, expert hidden size
GROUPS, RANK = 2, 16  # grouped output projection: groups, rank of each group's wo_a


def _act_quant(mode: str) -> dict:
    return {"act_quant": mode == "exact"}


def _linear_cases():
    """x [T, 64] @ W [96, 64]^T at the boundary token counts; FP8 and FP4 weights in turn."""
    def build(T):
        return lambda g, mode: ([("D", randn(g, T, DM)), ("W", randn(g, 96, DM, std=DM**-0.5))], _act_quant(mode))

    for i, T in enumerate(LENGTHS):
        yield Case("linear", f"T={T}", build(T), extra={"formats": {"W": ("fp8", "fp4")[i % 2]}})


def _grouped_out_proj_cases():
    """The attention output o [T, H d] through wo_a per group ([G R, H d / G]) then wo_b ([64, G R])."""
    def build(T):
        def inputs(g, mode):
            return [
                ("D", randn(g, T, H * HD)),
                ("W", randn(g, GROUPS * RANK, H * HD // GROUPS, std=(H * HD // GROUPS) ** -0.5)),
                ("W", randn(g, DM, GROUPS * RANK, std=(GROUPS * RANK) ** -0.5)),
                ("raw", GROUPS),
            ], _act_quant(mode)
        return inputs

    for T in LENGTHS:
        yield Case("grouped_out_proj", f"T={T}", build(T), extra={"formats": {"W": "fp8"}})


def _expert_weights(g, n: int) -> tuple[list, list, list]:
    """(W1s, W3s [I, D], W2s [D, I]) of n experts, float64."""
    return ([randn(g, INTER, DM, std=DM**-0.5) for _ in range(n)],
            [randn(g, INTER, DM, std=DM**-0.5) for _ in range(n)],
            [randn(g, DM, INTER, std=INTER**-0.5) for _ in range(n)])


def _moe_experts_cases():
    """T tokens routed to 2 of 8 experts each (random ids, softmax weights x 1.5), with and without the
    shared expert; routed experts FP4 and the shared one FP8 in exact mode (V4's checkpoint)."""
    def build(T, shared):
        def inputs(g, mode):
            ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(T)]).to(torch.int32)
            weights = torch.softmax(randn(g, T, TOPK), -1) * 1.5
            routed = _expert_weights(g, E)
            sh = _expert_weights(g, 1) if shared else None
            return [("D", randn(g, T, DM) * 2), ("raw", ids), ("acc", weights), ("experts", routed),
                    ("shared", sh), ("raw", 10.0)], _act_quant(mode)
        return inputs

    for T in LENGTHS:
        for shared in (True, False):
            yield Case("moe_experts", f"T={T},{'shared' if shared else 'no shared'}", build(T, shared),
                       extra={"formats": {"experts": "fp4", "shared": "fp8"}})


CASES = {
    "linear": list(_linear_cases()),
    "grouped_out_proj": list(_grouped_out_proj_cases()),
    "moe_experts": list(_moe_experts_cases()),
}
