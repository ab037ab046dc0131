"""Conformance cases of the lightning indexer's top-k (indexer_topk).

`sequences_inputs` (sequences packed in one call, each its tokens at consecutive positions) is the
sized builder the kernel benches share: their decode case is one token per sequence at the context's
last position.
"""

from __future__ import annotations

import torch

from .case import BF16, F32, LENGTHS, Case, randn
from .inputs import indexer_case, random_table

RATIO = 4


def sequences_inputs(g, r, lengths: list, ratio: int, topk: int, *, start: int = 0, H: int = 8, d: int = 128,
                     bs: int = 16) -> list:
    """Sequence i's lengths[i] tokens at positions start .. start + lengths[i] - 1, its pool entries
    behind its own row of a random block table: q [T, H, d] (D), w [T, H] (acc), pool [nb, bs, d] (D),
    table [slots, per], tok_slot [T], positions [T], ratio, topk. `g` draws the table (CPU), `r(*shape,
    s=1.0)` the values."""
    per = max(1, -(-((start + max(lengths)) // ratio) // bs))
    table, nb = random_table(g, len(lengths), per)
    T = sum(lengths)
    tok_slot = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    positions = torch.cat([torch.arange(start, start + n) for n in lengths])
    return [("D", r(T, H, d)), ("acc", r(T, H, s=(d * H) ** -0.5)), ("D", r(nb, bs, d)), ("raw", table),
            ("raw", tok_slot), ("raw", positions), ("raw", ratio), ("raw", topk)]


def _sequences(lengths, ratio, topk, **kw):
    return lambda g, mode: (sequences_inputs(g, lambda *shape, s=1.0: randn(g, *shape, std=s), lengths, ratio,
                                             topk, **kw), {})


def _random_slots(T, topk, edit=None, **kw):
    """indexer_case's tokens of random slots at random positions (seeded from the case's generator),
    optionally edited: (q, w, tok_slot, positions) -> the same."""
    def build(g, mode):
        q, w, pool, table, tok_slot, positions = indexer_case(int(torch.randint(1 << 30, (1,), generator=g)), T, **kw)
        if edit is not None:
            q, w, tok_slot, positions = edit(q, w, tok_slot, positions)
        return [("D", q), ("acc", w), ("D", pool), ("raw", table), ("raw", tok_slot), ("raw", positions),
                ("raw", RATIO), ("raw", topk)], {}
    return build


def _mixed(q, w, tok_slot, positions):
    positions[:6] = torch.tensor([0, 1, 2, 3, 4, 7])  # 0, 0, 0, 1, 1, 2 visible entries
    return q, w, tok_slot, positions


def _twins(q, w, tok_slot, positions):
    q[1], w[1] = q[0], w[0]  # identical queries, different keys behind each slot's table
    return q, w, torch.tensor([0, 1]), torch.tensor([47, 47])


def _random_slot_cases():
    """Tokens of three slots at random positions, at the boundary token counts (few tokens reach ~175
    entries over several tiles and gathered rows, many tokens ~60); mixed visibility with 8 heads,
    nothing visible and an empty batch, a top-k wider than the pool, slots reading their own table
    rows, bf16. Index heads of width 64 and 32."""
    for d in (64, 32):
        for T in LENGTHS:
            yield Case("indexer_topk", f"T={T},d={d}", _random_slots(T, 24, d=d, max_pos=700 if T <= 5 else 250),
                       dtypes=(F32,), kind="indexer")
        yield Case("indexer_topk", f"mixed visibility 8 heads,d={d // 2}",
                   _random_slots(40, 16, _mixed, H=8, d=d // 2, slots=4, bs=5, max_pos=160), dtypes=(F32,),
                   kind="indexer", extra={"mixed": True})
        yield Case("indexer_topk", f"nothing visible,d={d}", _random_slots(6, 8, d=d, max_pos=2), dtypes=(F32,),
                   kind="indexer", extra={"none_visible": True})
        yield Case("indexer_topk", f"top-k wider than the pool,d={d}", _random_slots(9, 64, d=d, max_pos=37, bs=4),
                   dtypes=(F32,), kind="indexer")
        yield Case("indexer_topk", f"slots read their own table rows,d={d}",
                   _random_slots(2, 5, _twins, d=d, slots=2, bs=3, max_pos=47), dtypes=(F32,), kind="indexer",
                   extra={"own_rows": True})
    yield Case("indexer_topk", "bf16 T=5,d=64", _random_slots(5, 24, d=64, max_pos=400), dtypes=(BF16,),
               kind="indexer")


def _sequence_cases():
    """Whole sequences at V4's index head width 128: the compression ratios 128 and 16 (one entry
    closes at the step's end), a prefill with an empty pool, two sequences packed in one call, a
    decode step (one token per sequence); one slot's prefill chunk (each token its own prefix)."""
    for name, lengths, ratio, topk, kw in (
        ("ratio 128: T=129, one entry", [129], 128, 4, {}),
        ("ratio 16: T=17, top-2 of one entry", [17], 16, 2, {}),
        ("empty pool: T=3 from position 0", [3], RATIO, 4, {}),
        ("two sequences packed: T=5,129", [5, 129], RATIO, 8, {}),
        ("decode: 3 sequences at position 128", [1, 1, 1], RATIO, 16, {"start": 128}),
    ):
        yield Case("indexer_topk", name, _sequences(lengths, ratio, topk, **kw), dtypes=(F32,), kind="indexer")

    def prefix(g, mode):
        table, nb = random_table(g, 1, 8)
        T = 30
        pool, q, w = randn(g, nb, 8, 32), randn(g, T, 16, 32), randn(g, T, 16, std=0.5)
        return [("D", q), ("acc", w), ("D", pool), ("raw", table), ("raw", torch.zeros(T, dtype=torch.long)),
                ("raw", torch.arange(100, 100 + T)), ("raw", RATIO), ("raw", 26)], {}

    yield Case("indexer_topk", "one slot's prefill chunk: each token its own prefix", prefix, dtypes=(F32,),
               kind="indexer")


CASES = {"indexer_topk": [*_random_slot_cases(), *_sequence_cases()]}
