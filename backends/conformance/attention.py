"""Conformance cases of sparse attention (attention)."""

from __future__ import annotations

import torch

from .case import BF16, DTYPES, F32, F64, H, HD, LENGTHS, ROPE, DM, NHC  # noqa: F401

from .inputs import gen, hc_params, indexer_case, layer_inputs, qs, random_table, rng  # noqa: F401
from .legacy import EPS, TOKENS, KernelCase, _dt, _g, _inv_freq, _randn  # noqa: F401
from v4.batch import StepBatch


def _cases_attention(g, mode):
    W = 16
    for T in LENGTHS:
        for comp in ("none", "some", "empty"):
            pos = torch.arange(T)
            p = pos[:, None] - torch.arange(W)[None, :]
            widx = torch.where(p >= 0, p, -1).to(torch.int32)  # the window just closed / is still filling
            Nc = 40
            if comp == "none":
                cidx, ckv = None, None
            elif comp == "empty":
                cidx, ckv = torch.full((T, 4), -1, dtype=torch.int32), _randn(g, Nc, HD)
            else:
                cidx = torch.randint(0, Nc, (T, 8), generator=g, dtype=torch.int32)
                cidx[torch.rand(T, 8, generator=g) < 0.3] = -1
                ckv = _randn(g, Nc, HD)
            yield (
                f"T={T},compressed={comp}",
                [
                    ("D", _randn(g, T, H, HD)),
                    ("D", _randn(g, T, HD)),
                    ("raw", widx),
                    ("D", ckv),
                    ("raw", cidx),
                    ("acc", _randn(g, H)),
                    ("raw", HD**-0.5),
                ],
                {},
                "tensor",
            )


def _attention_cases():
    """Prefill of one sequence from position 0 at the boundary token counts: window rows before 0 are
    -1; HCA entries j < (t+1)//4, none at all for T < 4 (the model then passes comp_idx with Kc = 0).
    Head dims 128 and 32 (the kernel families' test sizes before the merge); bf16 at d = 32 skips 127
    and 128 (the boundaries do not depend on the dtype; the interpreter pays ~3 s per long prefill)."""
    def build(T, d, dtype):
        batch = StepBatch([0], [0], [T], torch.device("cpu"))
        wkv, widx, ckv, cidx = layer_inputs(batch, 1, "hca", d, dtype, seed=T)
        assert (widx < 0).any() and (T >= 4) == (cidx.shape[1] > 0)
        q, sink = qs(T, 8 if T < 100 else 4, d, dtype, seed=100 + T)
        return (q, wkv, widx, ckv, cidx, sink, d ** -0.5), {}

    for d, grid in ((128, [(T, dt) for T in TOKENS for dt in DTYPES]),
                    (32, [(T, F32) for T in TOKENS] + [(T, BF16) for T in (1, 3, 4, 5, 129)])):
        for T, dt in grid:
            # long prefills: one 128-index chunk per list where the tiles allow it (the interpreter pays
            # per chunk); Ascend's Unified Buffer holds a 128-row chunk up to d = 64
            long = {"block_k": 128} if T > 100 else {}
            blocks = {"cuda": long, "ascend": long if d <= 64 else {}}
            yield KernelCase("attention", f"prefill T={T},d={d},{_dt(dt)}", dt, lambda T=T, d=d, dt=dt: build(T, d, dt),
                             {"blocks": blocks})


# transitional: the boundary builders of `dsv4 parity ops` and the kernel tests' cases
BOUNDARY = {"attention": _cases_attention}
KERNEL = {"attention": list(_attention_cases())}
