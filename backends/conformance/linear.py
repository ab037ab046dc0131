"""Conformance cases of the projections and experts: linear, grouped_out_proj, moe_experts.

Weights are drawn as float64 matrices in the roles `W` (one projection), `experts` (routed: lists W1,
W3 [I, D] and W2 [D, I], one per expert) and `shared` (the shared expert, or None); each side brings
them into its own form with its `prepare_linear` / `prepare_experts`, as the model does. In exact
mode the activations are FP8-quantised (`act_quant`), and `extra["formats"]` names the stored form
(FP8 blocks, FP4) each weight takes first, by role, as a checkpoint holds it.

The sized builders (`projection_weight`, `expert_weights`, `routing_inputs`) are shared with the kernel
benches: they take `r(*shape, s=1.0)`, a draw of s * N(0, 1) (float64 on CPU for the cases, the
bench's own device draw there), and the bench asks for the weights in their stored forms.
"""

from __future__ import annotations

import torch

from .case import DM, H, HD, LENGTHS, Case, draw64
from .inputs import stored_weight

E, TOPK, INTER = 8, 2, 64  # routed experts, experts per token, expert hidden size
GROUPS, RANK = 2, 16  # grouped output projection: groups, rank of each group's wo_a


def projection_weight(r, N: int, K: int, fmt: str = "dense"):
    """A projection's weight [N, K], N(0, 1 / K) (outputs of unit variance), in the stored form `fmt`
    (`stored_weight`: "fp8", "fp4", or "dense": the drawn tensor itself)."""
    return stored_weight(r(N, K, s=K**-0.5), fmt)


def expert_weights(r, n: int, D: int, I: int, fmt: str = "dense") -> tuple[list, list, list]:  # noqa: E741
    """(W1s, W3s [I, D], W2s [D, I]) of n experts in the stored form `fmt`, each stored as soon as it
    is drawn (a bench's 256 experts are never all in float at once)."""
    return ([projection_weight(r, I, D, fmt) for _ in range(n)],
            [projection_weight(r, I, D, fmt) for _ in range(n)],
            [projection_weight(r, D, I, fmt) for _ in range(n)])


def routing_inputs(g: torch.Generator, r, T: int, E: int, k: int, route_scale: float = 1.5) -> list:
    """ids [T, k] int32 (raw): k distinct experts per token drawn from `g`; weights [T, k] (acc):
    softmax of a draw of r, times route_scale."""
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    return [("raw", ids), ("acc", torch.softmax(r(T, k), -1) * route_scale)]


def _act_quant(mode: str) -> dict:
    return {"act_quant": mode == "exact"}


def _linear_cases():
    """x [T, 64] @ W [96, 64]^T at the boundary token counts; FP8 and FP4 weights in turn."""
    def build(T):
        def inputs(g, mode):
            r = draw64(g)
            return [("D", r(T, DM)), ("W", projection_weight(r, 96, DM))], _act_quant(mode)
        return inputs

    for i, T in enumerate(LENGTHS):
        yield Case("linear", f"T={T}", build(T), extra={"formats": {"W": ("fp8", "fp4")[i % 2]}})


def _grouped_out_proj_cases():
    """The attention output o [T, H d] through wo_a per group ([G R, H d / G]) then wo_b ([64, G R])."""
    def build(T):
        def inputs(g, mode):
            r = draw64(g)
            return [
                ("D", r(T, H * HD)),
                ("W", projection_weight(r, GROUPS * RANK, H * HD // GROUPS)),
                ("W", projection_weight(r, DM, GROUPS * RANK)),
                ("raw", GROUPS),
            ], _act_quant(mode)
        return inputs

    for T in LENGTHS:
        yield Case("grouped_out_proj", f"T={T}", build(T), extra={"formats": {"W": "fp8"}})


def _moe_experts_cases():
    """T tokens routed to 2 of 8 experts each (random ids, softmax weights x 1.5), with and without the
    shared expert; routed experts FP4 and the shared one FP8 in exact mode (V4's checkpoint)."""
    def build(T, shared):
        def inputs(g, mode):
            r = draw64(g)
            route = routing_inputs(g, r, T, E, TOPK)  # ids, weights
            routed = expert_weights(r, E, DM, INTER)
            sh = expert_weights(r, 1, DM, INTER) if shared else None
            return [("D", r(T, DM) * 2), *route, ("experts", routed), ("shared", sh), ("raw", 10.0)], _act_quant(mode)
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
