"""Conformance cases of the lightning indexer's top-k (indexer_topk)."""

from __future__ import annotations

import torch

from .case import BF16, DTYPES, F32, F64, H, HD, LENGTHS, ROPE, DM, NHC  # noqa: F401

from .inputs import gen, hc_params, indexer_case, layer_inputs, qs, random_table, rng  # noqa: F401
from .legacy import EPS, TOKENS, KernelCase, _dt, _g, _inv_freq, _randn  # noqa: F401


def _cases_indexer_topk(g, mode):
    Hi, Di, bs = 8, 128, 16
    for T, start, topk, m in [
        (1, 0, 4, 4),
        (3, 0, 4, 4),
        (4, 0, 4, 4),
        (5, 0, 4, 4),
        (5, 0, 8, 4),
        (127, 0, 8, 4),
        (128, 0, 8, 4),
        (129, 0, 8, 4),
        (1, 128, 16, 4),
        (3, 1, 4, 4),
        (129, 0, 4, 128),
        (17, 0, 2, 16),
    ]:
        # one sequence, positions start .. start+T-1; pool filled for every entry that may be visible
        n_ent = (start + T) // m
        nb = max(1, -(-n_ent // bs))
        table = torch.arange(nb, dtype=torch.int32).flip(0).view(1, nb).contiguous()
        pos = torch.arange(start, start + T)
        name = f"T={T},start={start},topk={topk},ratio={m},entries={n_ent}" + (" (empty pool)" if n_ent == 0 else "")
        yield (
            name,
            [
                ("D", _randn(g, T, Hi, Di)),
                ("acc", _randn(g, T, Hi, std=(Di * Hi) ** -0.5)),
                ("D", _randn(g, nb, bs, Di)),
                ("raw", table),
                ("raw", torch.zeros(T, dtype=torch.long)),
                ("raw", pos),
                ("raw", m),
                ("raw", topk),
            ],
            {},
            "indexer",
        )
    # two sequences packed in one call
    T1, T2 = 5, 129
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    yield (
        "two sequences T=5,129",
        [
            ("D", _randn(g, T1 + T2, Hi, Di)),
            ("acc", _randn(g, T1 + T2, Hi, std=(Di * Hi) ** -0.5)),
            ("D", _randn(g, 4, bs, Di)),
            ("raw", table),
            ("raw", torch.cat([torch.zeros(T1, dtype=torch.long), torch.ones(T2, dtype=torch.long)])),
            ("raw", torch.cat([torch.arange(T1), torch.arange(T2)])),
            ("raw", 4),
            ("raw", 8),
        ],
        {},
        "indexer",
    )


def _indexer_topk_cases():
    """Boundary token counts (few tokens reach ~175 entries over several tiles and gathered rows,
    many tokens ~60), mixed visibility with 8 heads, nothing visible and an empty batch, a top-k
    wider than the pool, a prefill chunk of one slot, slots reading their own table rows, bf16.
    Index heads of width 64 and 32 (the kernel families' test sizes before the merge)."""
    def case(name, seed, T, topk, extra=None, edit=None, **kw):
        def build():
            q, w, pool, table, tok_slot, positions = indexer_case(seed, T, **kw)
            if edit is not None:
                q, w, tok_slot, positions = edit(q, w, tok_slot, positions)
            return (q, w, pool, table, tok_slot, positions, 4, topk), {}
        return KernelCase("indexer_topk", name, kw.get("dtype", F32), build, extra or {})

    def mixed(q, w, tok_slot, positions):
        positions[:6] = torch.tensor([0, 1, 2, 3, 4, 7])  # 0, 0, 0, 1, 1, 2 visible entries
        return q, w, tok_slot, positions

    def twins(q, w, tok_slot, positions):
        q[1], w[1] = q[0], w[0]  # identical queries, different keys behind each slot's table
        return q, w, torch.tensor([0, 1]), torch.tensor([47, 47])

    for d, seeds in ((64, (7, 8, 9, 10, 11)), (32, (7, 8, 10, 12, None))):
        for T in TOKENS:
            yield case(f"T={T},d={d}", 100 + T, T, 24, d=d, max_pos=700 if T <= 5 else 250)
        yield case(f"mixed visibility 8 heads,d={d // 2}", seeds[0], 40, 16, {"mixed": True}, mixed,
                   H=8, d=d // 2, slots=4, bs=5, max_pos=160)
        yield case(f"nothing visible,d={d}", seeds[1], 6, 8, {"none_visible": True}, d=d, max_pos=2)
        yield case(f"top-k wider than the pool,d={d}", seeds[2], 9, 64, d=d, max_pos=37, bs=4)
        yield case(f"slots read their own table rows,d={d}", seeds[3], 2, 5, {"own_rows": True}, twins,
                   d=d, slots=2, bs=3, max_pos=47)
        if seeds[4] is not None:
            yield case(f"bf16 T=5,d={d}", seeds[4], 5, 24, d=d, max_pos=400, dtype=BF16)

    def prefix():
        g, rnd = gen(11)
        table, nb = random_table(g, 1, 8)
        pool = rnd(nb, 8, 32)
        T = 30
        q, w = rnd(T, 16, 32), rnd(T, 16, s=0.5)
        return (q, w, pool, table, torch.zeros(T, dtype=torch.long), torch.arange(100, 100 + T), 4, 26), {}

    yield KernelCase("indexer_topk", "one slot's prefill chunk: each token its own prefix", F32, prefix)


# transitional: the boundary builders of `dsv4 parity ops` and the kernel tests' cases
BOUNDARY = {"indexer_topk": _cases_indexer_topk}
KERNEL = {"indexer_topk": list(_indexer_topk_cases())}
