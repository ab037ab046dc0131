"""Conformance cases of the mHC ops: hc_pre, hc_post, hc_head (n = 4 streams).

The sized builders (`hc_pre_inputs`, `hc_post_inputs`, `hc_head_inputs`) are shared with the kernel
benches: they take `r(*shape, s=1.0)`, a draw of s * N(0, 1) (float64 on CPU for the cases, the
bench's own device draw there), and return the tagged inputs.
"""

from __future__ import annotations

import torch

from .case import F32, LENGTHS, NHC, Case, draw64
from .inputs import hc_params

EPS = 1e-6


def hc_pre_inputs(r, T: int, n: int, D: int, iters: int = 20, n_scale: int = 3) -> list:
    """X [T, n, D] (D); fn [(2 + n) n, n D], base [(2 + n) n], scale [n_scale] (acc); iters, eps, eps."""
    fn, base, scale = hc_params(r, n, D, (2 + n) * n, n_scale)
    return [("D", r(T, n, D)), ("acc", fn), ("acc", base), ("acc", scale), ("raw", iters), ("raw", EPS),
            ("raw", EPS)]


def hc_post_inputs(r, T: int, n: int, D: int) -> list:
    """y [T, D], X [T, n, D] (D); post [T, n] in (0, 2), comb [T, n, n] row-stochastic (acc)."""
    y, X = r(T, D), r(T, n, D)
    return [("D", y), ("D", X), ("acc", 2 * torch.sigmoid(r(T, n))), ("acc", torch.softmax(r(T, n, n), -1))]


def hc_head_inputs(r, T: int, n: int, D: int) -> list:
    """X [T, n, D] (D); fn [n, n D], base [n], scale [1] (acc); eps, eps."""
    fn, base, scale = hc_params(r, n, D, n)
    return [("D", r(T, n, D)), ("acc", fn), ("acc", base), ("acc", scale), ("raw", EPS), ("raw", EPS)]


def _sized(builder, *size, **kw):
    """A Case's build: the sized builder over the case's float64 draw, no kwargs."""
    return lambda g, mode: (builder(draw64(g), *size, **kw), {})


def _hc_pre_cases():
    """D 96 (not a power of two: masked tiles; 6 scales of which hc_pre reads the first 3) and 64 at the
    boundary token counts, 20 Sinkhorn iterations (rows and columns must sum to one); 1 and 2
    iterations."""
    for D, n_scale in ((96, 6), (64, 3)):
        for T in LENGTHS:
            yield Case("hc_pre", f"T={T},D={D}", _sized(hc_pre_inputs, T, NHC, D, n_scale=n_scale),
                       extra={"sums": True})
    for iters in (1, 2):
        yield Case("hc_pre", f"T=5,D=64,iters={iters}", _sized(hc_pre_inputs, 5, NHC, 64, iters), dtypes=(F32,),
                   extra={"sums": False})


def _hc_post_cases():
    """D 96 (the D tile masked) at the boundary token counts; D 64 (no masking) at the ends."""
    for T in LENGTHS:
        yield Case("hc_post", f"T={T},D=96", _sized(hc_post_inputs, T, NHC, 96))
    for T in (1, 129):
        yield Case("hc_post", f"T={T},D=64", _sized(hc_post_inputs, T, NHC, 64), dtypes=(F32,))


def _hc_head_cases():
    """D 96 (masked) and 64 around the 4-token boundary and past 128 in both dtypes; the other boundary
    token counts at D 96."""
    for D in (96, 64):
        for T in (1, 4, 5, 129):
            yield Case("hc_head", f"T={T},D={D}", _sized(hc_head_inputs, T, NHC, D))
    for T in (3, 127, 128):
        yield Case("hc_head", f"T={T},D=96", _sized(hc_head_inputs, T, NHC, 96), dtypes=(F32,))


CASES = {"hc_pre": list(_hc_pre_cases()), "hc_post": list(_hc_post_cases()), "hc_head": list(_hc_head_cases())}
