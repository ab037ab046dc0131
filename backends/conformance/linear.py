"""Conformance cases of the projections and experts: linear, grouped_out_proj, moe_experts."""

from __future__ import annotations

import torch

from .case import BF16, DTYPES, F32, F64, H, HD, LENGTHS, ROPE, DM, NHC  # noqa: F401

from .inputs import gen, hc_params, indexer_case, layer_inputs, qs, random_table, rng  # noqa: F401
from .legacy import EPS, TOKENS, KernelCase, _dt, _g, _inv_freq, _randn  # noqa: F401


def _cases_linear(g, mode):
    for T in LENGTHS:
        yield (
            f"T={T}",
            [("D", _randn(g, T, DM)), ("W", _randn(g, 96, DM, std=DM**-0.5))],
            {"act_quant": mode == "exact"},
            "tensor",
        )


def _cases_grouped_out_proj(g, mode):
    G, R = 2, 16
    for T in LENGTHS:
        yield (
            f"T={T}",
            [
                ("D", _randn(g, T, H * HD)),
                ("W", _randn(g, G * R, H * HD // G, std=(H * HD // G) ** -0.5)),
                ("W", _randn(g, DM, G * R, std=(G * R) ** -0.5)),
                ("raw", G),
            ],
            {"act_quant": mode == "exact"},
            "tensor",
        )


def _cases_moe_experts(g, mode):
    E, k, I = 8, 2, 64  # noqa: E741
    for T in LENGTHS:
        for shared in (True, False):
            ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
            w = torch.softmax(_randn(g, T, k), -1) * 1.5
            # per-expert stored weights (W1, W3 [I, D], W2 [D, I]), brought into each backend's
            # form by its own prepare_experts, as the model does
            routed = (
                [_randn(g, I, DM, std=DM**-0.5) for _ in range(E)],
                [_randn(g, I, DM, std=DM**-0.5) for _ in range(E)],
                [_randn(g, DM, I, std=I**-0.5) for _ in range(E)],
            )
            sh = (
                ([_randn(g, I, DM, std=DM**-0.5)], [_randn(g, I, DM, std=DM**-0.5)], [_randn(g, DM, I, std=I**-0.5)])
                if shared
                else None
            )
            yield (
                f"T={T},{'shared' if shared else 'no shared'}",
                [
                    ("D", _randn(g, T, DM) * 2),
                    ("raw", ids),
                    ("acc", w),
                    ("experts", routed),
                    ("shared", sh),
                    ("raw", 10.0),
                ],
                {"act_quant": mode == "exact"},
                "tensor",
            )


# transitional: the boundary builders of `dsv4 parity ops` and the kernel tests' cases
BOUNDARY = {"linear": _cases_linear, "grouped_out_proj": _cases_grouped_out_proj, "moe_experts": _cases_moe_experts}
KERNEL = {}
