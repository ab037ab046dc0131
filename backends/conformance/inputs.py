"""Input builders of the conformance cases and the kernel tests: seeded random tensors, paged block
tables, window / compressed-pool indices of an attention layer, indexer pools. CPU tensors only."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from v4.batch import StepBatch
from v4.cache import entry_rows, visible_entry_rows, window_rows

F32, F64 = torch.float32, torch.float64
W = 128  # V4 sliding window


def _same(t):
    return t


def gen(seed):
    """(generator, r): r(*shape, s=1.0, dtype=fp32) draws s * N(0, 1) from the seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return g, (lambda *shape, s=1.0, dtype=F32: (torch.randn(*shape, generator=g) * s).to(dtype))


def rng(seed):
    """gen(seed)'s draw function alone."""
    return gen(seed)[1]


def cpu64(t):
    return t.detach().cpu().to(F64) if t.is_floating_point() else t.detach().cpu()


def hc_params(r, n, D, rows, n_scale=3):
    """fn [rows, n D], base [rows], scale: n_scale entries where rows > n (hc_pre), else one (hc_head)."""
    fn = r(rows, n * D, s=2.0 / (n * D) ** 0.5)
    return fn, r(rows, s=0.5), 0.5 + r(n_scale if rows > n else 1, s=0.1).abs()


def paged_table(slots: int, entries: int, bs: int, g) -> SimpleNamespace:
    """A block table over a random permutation of the pool's blocks (entries scattered in the pool)."""
    nb = -(-entries // bs)
    phys = torch.randperm(slots * nb, generator=g).to(torch.int32).view(slots, nb)
    return SimpleNamespace(block_size=bs, table=phys, num_rows=slots * nb * bs)


def csa_logical(batch: StepBatch, ratio: int, topk: int, g, scatter: bool) -> torch.Tensor:
    """Indexer-like picks: a random subset of the visible entries, -1 padded (interspersed if scatter)."""
    out = torch.full((batch.num_tokens, topk), -1, dtype=torch.int32)
    for t, p in enumerate(batch.positions.tolist()):
        pick = torch.randperm((p + 1) // ratio, generator=g)[:topk]
        out[t, : pick.numel()] = pick.to(torch.int32)
        if scatter:
            out[t] = out[t, torch.randperm(topk, generator=g)]
    return out


def layer_inputs(
    batch: StepBatch,
    ring_slots: int,
    kind: str,
    d: int,
    dtype,
    seed: int,
    *,
    ratio: int = 4,
    topk: int = 16,
    bs: int = 8,
    scatter: bool = False,
    window: int = W,
    draw=None,
):
    """window_kv = cat(ring, new kv) [ring_slots * window + T, d] with its indices [T, window], and the
    compressed pool [rows, d] with its indices [T, Kc] (int32 index lists, -1 = none).

    kind: "sliding" (comp None), "sliding0" (comp_idx with Kc = 0), "hca" (all visible entries;
    Kc = 0 while none is visible), "csa" (top-k picks, -1 padded; topk may exceed the visible count).
    draw(*shape): the kv rows' draw (a bench's, on its device); by default gen(seed)'s, on CPU. The
    block table and the picks come from gen(seed)'s generator either way.
    """
    g, r = gen(seed)
    r = r if draw is None else draw
    T = batch.num_tokens
    window_kv = r(ring_slots * window + T, d).to(dtype)
    window_idx = window_rows(batch, ring_slots, window)
    comp_kv, comp_idx = None, None
    if kind == "sliding0":
        comp_kv, comp_idx = r(4, d).to(dtype), torch.zeros(T, 0, dtype=torch.int32)
    elif kind in ("hca", "csa"):
        n_ent = int(((batch.positions + 1) // ratio).max()) + 1
        table = paged_table(max(batch.slots) + 1, n_ent, bs, g)
        comp_kv = r(table.num_rows, d).to(dtype)
        if kind == "hca":
            comp_idx = visible_entry_rows(batch, ratio, table)
        else:
            comp_idx = entry_rows(csa_logical(batch, ratio, topk, g, scatter), batch.tok_slot, table)
    return window_kv, window_idx, comp_kv, comp_idx


def qs(T, H, d, dtype, seed, s=1.0):
    """Queries [T, H, d] in dtype and fp32 sinks [H]."""
    _, r = gen(seed)
    return r(T, H, d, s=s).to(dtype), r(H, s=2.0)


def random_table(g, slots, per_slot, spare=3):
    """Non-identity block table: a random permutation of the pool's blocks split among the slots."""
    nb = slots * per_slot + spare
    return torch.randperm(nb, generator=g)[: slots * per_slot].view(slots, per_slot).to(torch.int32), nb


def indexer_case(seed, T, H=16, d=32, slots=3, bs=12, max_pos=250, ratio=4, dtype=F32):
    """q [T, H, d], w [T, H], pool [nb, bs, d] behind a random block table, tok_slot, positions."""
    g, rnd = gen(seed)
    per = max(1, -(-((max_pos + 1) // ratio) // bs))
    table, nb = random_table(g, slots, per)
    pool = rnd(nb, bs, d, dtype=dtype)
    q = rnd(T, H, d, dtype=dtype)
    w = rnd(T, H, s=0.5)
    tok_slot = torch.randint(0, slots, (T,), generator=g)
    positions = torch.randint(0, max_pos + 1, (T,), generator=g)
    return q, w, pool, table, tok_slot, positions


def stored_weight(w: torch.Tensor, fmt: str):
    """A float weight in one of the checkpoint's stored forms: "fp8" (e4m3, one scale per 128 x 128
    block), "fp4" (e2m1, one scale per 32 inputs) or "dense" (the tensor itself)."""
    from v4 import quant

    if fmt == "fp8":
        return quant.QuantizedWeight("fp8", *quant.quant_fp8_block(w))
    if fmt == "fp4":
        return quant.QuantizedWeight("fp4", *quant.quant_fp4(w))
    return w
