"""Conformance cases of the MoE gate (moe_gate)."""

from __future__ import annotations

import torch

from .case import BF16, DTYPES, F32, F64, H, HD, LENGTHS, ROPE, DM, NHC  # noqa: F401

from .inputs import gen, hc_params, indexer_case, layer_inputs, qs, random_table, rng  # noqa: F401
from .legacy import EPS, TOKENS, KernelCase, _dt, _g, _inv_freq, _randn  # noqa: F401


def _cases_moe_gate(g, mode):
    E, k, V = 8, 2, 512
    for T in LENGTHS:
        for hashed in (False, True):
            ids = torch.randint(0, V, (T,), generator=g)
            tid2eid = torch.argsort(torch.rand(V, E, generator=g), 1)[:, :k].contiguous() if hashed else None
            yield (
                f"T={T},{'hash' if hashed else 'bias top-k'}",
                [
                    ("D", _randn(g, T, DM)),
                    ("acc", _randn(g, E, DM, std=DM**-0.5)),
                    ("acc", None if hashed else _randn(g, E, std=0.1)),
                    ("raw", tid2eid),
                    ("raw", ids),
                    ("raw", k),
                    ("raw", 1.5),
                ],
                {},
                "gate",
            )


def _moe_gate_cases():
    """Bias top-k (64 experts top-6 and 8 top-2; the bias is as large as the score spread, so it
    steers picks from `steer_from` tokens on), bf16 weights (16-bit dot path; expert counts that are
    not a block multiple), top-k = every expert, hash routing (int64 and int32 tables), full ties."""
    def topk(T, E, D, k, dtype, seed=None):
        r = rng(700 + T if seed is None else seed)
        x, W = r(T, D).to(dtype), r(E, D, s=D ** -0.5)
        return (x, W, r(E, s=0.3), None, None, k, 1.5), {}

    for E, D, k, steer_from in ((64, 96, 6, 4), (8, 64, 2, 127)):
        for T in TOKENS:
            for dt in DTYPES:
                yield KernelCase("moe_gate", f"T={T},E={E},top{k},{_dt(dt)}", dt,
                                 lambda T=T, E=E, D=D, k=k, dt=dt: topk(T, E, D, k, dt), {"steer_from": steer_from})

    def bf16_weight(T, E, D, k, rs, sb):
        r = rng(800)
        x, W, bias = r(T, D).to(BF16), r(E, D, s=D ** -0.5).to(BF16), r(E, s=sb)
        return (x, W, bias, None, None, k, rs), {}

    for T, E, D, k, rs, sb in ((20, 8, 64, 2, 1.5, 0.1), (5, 384, 256, 8, 2.5, 0.1), (20, 40, 160, 6, 2.5, 0.1)):
        yield KernelCase("moe_gate", f"bf16 weight T={T},E={E},D={D},top{k}", BF16,
                         lambda a=(T, E, D, k, rs, sb): bf16_weight(*a), {"tie_free": E < 64})

    def all_experts():
        E, D = 8, 64
        r = rng(750)
        return (r(7, D), r(E, D, s=D ** -0.5), r(E, s=0.3), None, None, E, 2.0), {}

    yield KernelCase("moe_gate", "top-k = all 8 experts", F32, all_experts, {"all": True})

    def hashed(T, E, D, k, index_dtype):
        r = rng(900 + T)
        x, W = r(T, D).to(BF16), r(E, D, s=D ** -0.5)
        g = torch.Generator().manual_seed(T)
        tid2eid = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(50)])  # int64 [V, k]
        toks = torch.randint(0, 50, (T,), generator=g)
        return (x, W, None, tid2eid.to(index_dtype), toks.to(index_dtype), k, 1.5), {}

    for E, D, k in ((64, 96, 6), (8, 64, 2)):
        for T in (1, 5, 129):
            for idt in (torch.int64, torch.int32):
                yield KernelCase("moe_gate", f"hash T={T},E={E},top{k},{str(idt)[6:]}", BF16,
                                 lambda a=(T, E, D, k, idt): hashed(*a), {"hash": True})

    def ties():
        E, D, k = 64, 96, 6
        # every score is sqrt(ln 2): a full tie
        return (torch.zeros(3, D), torch.randn(E, D, generator=torch.Generator().manual_seed(0)), torch.zeros(E),
                None, None, k, 1.5), {}

    yield KernelCase("moe_gate", "full tie: lowest index first", F32, ties, {"ties": True})


# transitional: the boundary builders of `dsv4 parity ops` and the kernel tests' cases
BOUNDARY = {"moe_gate": _cases_moe_gate}
KERNEL = {"moe_gate": list(_moe_gate_cases())}
