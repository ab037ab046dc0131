"""Conformance cases of the KV compressor (compress)."""

from __future__ import annotations

import torch

from .case import BF16, DTYPES, F32, F64, H, HD, LENGTHS, ROPE, DM, NHC  # noqa: F401

from .inputs import gen, hc_params, indexer_case, layer_inputs, qs, random_table, rng  # noqa: F401
from .legacy import EPS, TOKENS, KernelCase, _dt, _g, _inv_freq, _randn  # noqa: F401
from v4.ops import CompressSpec, DecodeRows


def _cases_compress(g, mode):
    """Per case: a list of sequences (start, n) in one packed call, with random partial-window
    state for sequences that start mid-window."""
    bs = 16  # pool block size: 129 tokens at ratio 4 = 32 entries span 2 blocks
    plans = [[(0, T)] for T in LENGTHS] + [
        [(3, 1)],  # the window closes at this step's only token
        [(4, 1)],  # one token after a close: nothing emitted
        [(6, 7)],  # starts mid-window, closes one, leaves a partial one
        [(0, 1), (15, 1), (2, 129), (0, 5)],  # several sequences in one packed call
    ]
    quant = {"overlap": "fp4" if mode == "exact" else "none", "plain": "fp8" if mode == "exact" else "none"}
    for m, overlap in ((4, True), (16, False), (128, False)):
        for seqs in plans:
            if m == 128 and max(s + n for s, n in seqs) < 100:
                continue  # ratio 128 only matters where a window can close
            k = 2 if overlap else 1
            c = HD
            slots = len(seqs)
            T = sum(n for _, n in seqs)
            max_e = max((s + n) // m for s, n in seqs) + 1
            nb = -(-max_e // bs)
            table = (
                torch.arange(slots * nb, dtype=torch.int32).view(slots, nb).flip(1).contiguous()
            )  # non-trivial paging
            state_kv, state_score = (
                torch.zeros(slots, k * m, k * c, dtype=torch.float64),
                torch.zeros(slots, k * m, k * c, dtype=torch.float64),
            )
            for slot, (s, _) in enumerate(seqs):
                state_kv[slot] = _randn(g, k * m, k * c)
                state_score[slot] = _randn(g, k * m, k * c)
            packed, off = [], 0
            for slot, (s, n) in enumerate(seqs):
                packed.append((slot, s, n, off))
                off += n
            spec = CompressSpec(m, c, overlap, quant["overlap" if overlap else "plain"], ROPE, 1e-6)
            name = f"m={m},seqs={[(s, n) for s, n in seqs]}"
            yield (
                name,
                [
                    ("acc", _randn(g, T, k * c)),
                    ("acc", _randn(g, T, k * c)),
                    ("acc", _randn(g, m, k * c, std=0.1)),
                    ("raw", spec),
                    ("acc", 1 + _randn(g, c, std=0.1)),
                    ("acc", _inv_freq()),
                    ("acc", state_kv),
                    ("acc", state_score),
                    ("D", torch.zeros(slots * nb, bs, c, dtype=torch.float64)),
                    ("raw", table),
                    ("raw", packed),
                ],
                {},
                "compress",
            )
        # decode form (DecodeRows, what a captured decode step passes): one token per sequence, the
        # first window closing, a sequence's first token, a later window closing, mid-window
        k = 2 if overlap else 1
        pos = [m - 1, 0, 5 * m + m - 1, 3 * m + 1]
        slots = len(pos)
        nb = -(-(max(pos) // m + 1) // bs)
        table = torch.arange(slots * nb, dtype=torch.int32).view(slots, nb).flip(1).contiguous()
        spec = CompressSpec(m, HD, overlap, quant["overlap" if overlap else "plain"], ROPE, 1e-6)
        yield (
            f"m={m},decode rows at {pos}",
            [
                ("acc", _randn(g, slots, k * HD)),
                ("acc", _randn(g, slots, k * HD)),
                ("acc", _randn(g, m, k * HD, std=0.1)),
                ("raw", spec),
                ("acc", 1 + _randn(g, HD, std=0.1)),
                ("acc", _inv_freq()),
                ("acc", _randn(g, slots, k * m, k * HD)),
                ("acc", _randn(g, slots, k * m, k * HD)),
                ("D", torch.zeros(slots * nb, bs, HD, dtype=torch.float64)),
                ("raw", table),
                ("rows", DecodeRows(torch.tensor([2, 0, 3, 1]), torch.tensor([pos[2], pos[0], pos[3], pos[1]]))),
            ],
            {},
            "compress",
        )


# transitional: the boundary builders of `dsv4 parity ops` and the kernel tests' cases
BOUNDARY = {"compress": _cases_compress}
KERNEL = {}
