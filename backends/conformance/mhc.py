"""Conformance cases of the mHC ops: hc_pre, hc_post, hc_head."""

from __future__ import annotations

import torch

from .case import BF16, DTYPES, F32, F64, H, HD, LENGTHS, ROPE, DM, NHC  # noqa: F401

from .inputs import gen, hc_params, indexer_case, layer_inputs, qs, random_table, rng  # noqa: F401
from .legacy import EPS, TOKENS, KernelCase, _dt, _g, _inv_freq, _randn  # noqa: F401


def _hc_params(g, rows):
    return [("acc", _randn(g, rows, NHC * DM, std=(NHC * DM) ** -0.5)), ("acc", _randn(g, rows, std=0.1))]


def _cases_hc_pre(g, mode):
    for T in LENGTHS:
        fn, base = _hc_params(g, (2 + NHC) * NHC)
        yield (
            f"T={T}",
            [
                ("D", _randn(g, T, NHC, DM)),
                fn,
                base,
                ("acc", 1 + _randn(g, 3, std=0.1)),
                ("raw", 20),
                ("raw", 1e-6),
                ("raw", 1e-6),
            ],
            {},
            "tensor",
        )


def _cases_hc_post(g, mode):
    for T in LENGTHS:
        comb = torch.softmax(_randn(g, T, NHC, NHC), -1)
        yield (
            f"T={T}",
            [
                ("D", _randn(g, T, DM)),
                ("D", _randn(g, T, NHC, DM)),
                ("acc", 2 * torch.sigmoid(_randn(g, T, NHC))),
                ("acc", comb),
            ],
            {},
            "tensor",
        )


def _cases_hc_head(g, mode):
    for T in LENGTHS:
        fn, base = _hc_params(g, NHC)
        yield (
            f"T={T}",
            [("D", _randn(g, T, NHC, DM)), fn, base, ("acc", 1 + _randn(g, 1, std=0.1)), ("raw", 1e-6), ("raw", 1e-6)],
            {},
            "tensor",
        )


def _hc_pre_cases():
    """D 96 (not a power of two: masked tiles) and 64, 20 Sinkhorn iterations; 1 and 2 iterations."""
    def build(T, D, dtype, iters, seed, n_scale):
        n = 4
        r = rng(seed)
        X = r(T, n, D).to(dtype)
        return (X, *hc_params(r, n, D, (2 + n) * n, n_scale), iters, EPS, EPS), {}

    for D, n_scale in ((96, 6), (64, 3)):  # hc_pre reads the first 3 scales
        for T in TOKENS:
            for dt in DTYPES:
                yield KernelCase("hc_pre", f"T={T},D={D},{_dt(dt)}", dt,
                                 lambda T=T, D=D, dt=dt, ns=n_scale: build(T, D, dt, 20, 200 + T, ns), {"sums": True})
    for iters in (1, 2):
        yield KernelCase("hc_pre", f"T=5,D=64,iters={iters}", F32,
                         lambda it=iters: build(5, 64, F32, it, 300 + it, 3), {"sums": False})


def _hc_post_cases():
    def build(T, dtype):
        n, D = 4, 96  # D not a power of two: the D tile is masked
        r = rng(500 + T)
        X, y = r(T, n, D).to(dtype), r(T, D).to(dtype)
        post = 2 * torch.sigmoid(r(T, n))
        comb = torch.softmax(r(T, n, n), -1)
        return (y, X, post, comb), {}

    for T in TOKENS:
        for dt in DTYPES:
            yield KernelCase("hc_post", f"T={T},{_dt(dt)}", dt, lambda T=T, dt=dt: build(T, dt))


def _hc_head_cases():
    def build(T, D, dtype):
        n = 4
        r = rng(600 + T)
        X = r(T, n, D).to(dtype)
        return (X, *hc_params(r, n, D, n), EPS, EPS), {}

    for D in (96, 64):
        for T in (1, 4, 5, 129):
            for dt in DTYPES:
                yield KernelCase("hc_head", f"T={T},D={D},{_dt(dt)}", dt, lambda T=T, D=D, dt=dt: build(T, D, dt))


# transitional: the boundary builders of `dsv4 parity ops` and the kernel tests' cases
BOUNDARY = {"hc_pre": _cases_hc_pre, "hc_post": _cases_hc_post, "hc_head": _cases_hc_head}
KERNEL = {"hc_pre": list(_hc_pre_cases()), "hc_post": list(_hc_post_cases()), "hc_head": list(_hc_head_cases())}
