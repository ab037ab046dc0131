"""Conformance cases of the KV compressor (compress).

One call per case: kv, score [T, k c] of the sequences packed in the call, ape, the spec, the norm
weight, the rope frequencies, the compressor state (random: a sequence that starts mid-window reads
it as its earlier tokens), the paged pool (behind a non-trivial block table) and the layout (a list
of (slot, start, n, offset), or `DecodeRows` in the decode form). The comparator ("compress") scores
the emitted entries and the state and pool after the call; in exact mode the overlapping compressor
fake-quantises its entries to FP4, the plain one to FP8.

`compress_inputs` is the sized builder the kernel benches share (their prefill of one sequence and
their decode step of B sequences, drawn on the device).
"""

from __future__ import annotations

import torch

from v4.ops import CompressSpec, DecodeRows

from .case import BF16, F32, F64, HD, LENGTHS, ROPE, Case, draw64
from .norm_rope import yarn_inv_freq

BS = 16  # pool block size: 129 tokens at ratio 4 = 32 entries span 2 blocks

# sequences (start, n) in one packed call, in batch order
PLANS = [[(0, T)] for T in LENGTHS] + [
    [(3, 1)],  # the window closes at this step's only token
    [(4, 1)],  # one token after a close: nothing emitted
    [(6, 7)],  # starts mid-window, closes one, leaves a partial one
    [(13, 3)],  # the state's head and the new tokens fill a window exactly (ratio 16)
    [(0, 1), (15, 1), (2, 129), (0, 5)],  # several sequences in one packed call
]
# a sequence continuing at position 1001 (its state holds the open window so far), one from 0, one in
# the batch with no new tokens; batch order is not slot order
FAR_PLAN, FAR_SLOTS = [(1001, 9), (0, 7), (5, 0)], [2, 0, 1]


def _spec(m: int, overlap: bool, mode: str) -> CompressSpec:
    quant = ("fp4" if overlap else "fp8") if mode == "exact" else "none"
    return CompressSpec(m, HD, overlap, quant, ROPE, 1e-6)


def _table(slots: int, entries: int) -> torch.Tensor:
    """Each slot's blocks in reverse order (non-trivial paging): int32 [slots, blocks per slot]."""
    nb = -(-entries // BS)
    return torch.arange(slots * nb, dtype=torch.int32).view(slots, nb).flip(1).contiguous()


def compress_inputs(r, spec: CompressSpec, T: int, slots: int, table: torch.Tensor, layout, *,
                    pool_dtype=F64, block_size: int = BS) -> list:
    """The op's arguments with their roles: kv, score [T, k c], ape [m, k c], spec, norm weight [c],
    rope frequencies [ROPE / 2], state_kv, state_score [slots, k m, k c], a zero pool [table.numel(),
    block_size, c] in pool_dtype, the block table and the layout (`DecodeRows` or the packed list).
    `r(*shape, s=1.0)` draws s * N(0, 1): float64 from the case's generator, or the bench's device draw."""
    k, m, c = (2 if spec.overlap else 1), spec.ratio, spec.dim
    return [
        ("acc", r(T, k * c)),  # kv
        ("acc", r(T, k * c)),  # score
        ("acc", r(m, k * c, s=0.1)),  # ape
        ("raw", spec),
        ("acc", 1 + r(c, s=0.1)),  # norm weight
        ("acc", yarn_inv_freq()),
        ("acc", r(slots, k * m, k * c)),  # state_kv
        ("acc", r(slots, k * m, k * c)),  # state_score
        ("D", torch.zeros(table.numel(), block_size, c, dtype=pool_dtype)),  # pool
        ("raw", table),
        (("rows" if isinstance(layout, DecodeRows) else "raw"), layout),
    ]


def _packed_case(m, overlap, seqs, slot_of=None, dtypes=(F32,)) -> Case:
    """One packed call of the sequences `seqs` [(start, n)], sequence i in slot slot_of[i]."""
    slot_of = list(range(len(seqs))) if slot_of is None else slot_of
    name = f"m={m},seqs={seqs}" + ("" if slot_of == sorted(slot_of) else f",slots={slot_of}")

    def build(g, mode):
        packed, off = [], 0
        for slot, (s, n) in zip(slot_of, seqs):
            packed.append((slot, s, n, off))
            off += n
        table = _table(len(seqs), max((s + n) // m for s, n in seqs) + 1)
        return compress_inputs(draw64(g), _spec(m, overlap, mode), off, len(seqs), table, packed), {}

    return Case("compress", name, build, dtypes=dtypes, kind="compress")


def _decode_case(m, overlap, dtypes=(F32,)) -> Case:
    """The decode form (`DecodeRows`, what a captured decode step passes): one token per sequence, rows
    not in slot order: the first window closing, a sequence's first token, a later window closing,
    mid-window."""
    pos = [m - 1, 0, 5 * m + m - 1, 3 * m + 1]

    def build(g, mode):
        rows = DecodeRows(torch.tensor([2, 0, 3, 1]), torch.tensor([pos[2], pos[0], pos[3], pos[1]]))
        table = _table(len(pos), max(pos) // m + 1)
        return compress_inputs(draw64(g), _spec(m, overlap, mode), len(pos), len(pos), table, rows), {}

    return Case("compress", f"m={m},decode rows at {pos}", build, dtypes=dtypes, kind="compress")


def _compress_cases():
    """The overlapping compressor (ratio 4) and the plain one (ratios 16 and 128) over every plan, the
    far-position batch and the decode form; the bf16 pool at one long prefill and the packed plans."""
    for m, overlap in ((4, True), (16, False), (128, False)):
        for seqs in PLANS:
            yield _packed_case(m, overlap, seqs, dtypes=(F32, BF16) if len(seqs) > 1 or seqs == [(0, 129)] else (F32,))
        yield _packed_case(m, overlap, FAR_PLAN, FAR_SLOTS, dtypes=(F32, BF16))
        yield _decode_case(m, overlap, dtypes=(F32, BF16))


CASES = {"compress": list(_compress_cases())}
