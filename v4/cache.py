"""Paged decode state of V4 (design.md "Conventions at the seam").

Per attention layer:
- window ring `[slots, W, head_dim]`: token t of a sequence lives at row t mod W of its slot;
- compressed-entry pool `[blocks, block_size, head_dim]` (CSA and HCA layers), paged: entry j of
  a sequence lives in block `block_table[slot, j // block_size]`, row `j % block_size`;
- indexer-key pool `[blocks, block_size, index_head_dim]` (CSA layers), same paging as the CSA
  entries (both hold one row per 4 tokens, so they share one block table);
- compressor state per sequence slot (tokens of the window not yet closed; for the overlapping
  compressor also the previous window). Kept in fp32 (fp64 for fp64 runs), as the official code does.

All CSA layers hold the same number of entries per sequence, and so do all HCA layers: one
block table per compression ratio serves every layer with that ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .batch import DecodeBatch, StepBatch
from .config import CSA, HCA, SLIDING, ModelConfig
from .errors import ConfigError, InputError
from .ops import acc


class BlockTable:
    """Block allocator for one compression ratio, shared by every layer with that ratio."""

    def __init__(self, ratio: int, block_size: int, num_blocks: int, max_slots: int, max_entries: int, device):
        self.ratio, self.block_size, self.num_blocks = ratio, block_size, num_blocks
        self.max_blocks_per_seq = max(1, math.ceil(max_entries / block_size))
        self.table = torch.zeros(max_slots, self.max_blocks_per_seq, dtype=torch.int32, device=device)
        self.owned: list[list[int]] = [[] for _ in range(max_slots)]
        self.free = list(range(num_blocks - 1, -1, -1))

    def missing(self, slot: int, n_entries: int) -> int:
        """Blocks `slot` still lacks to hold `n_entries` entries."""
        return max(0, math.ceil(n_entries / self.block_size) - len(self.owned[slot]))

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def ensure(self, slot: int, n_entries: int) -> None:
        need = math.ceil(n_entries / self.block_size)
        if need > self.max_blocks_per_seq:
            raise InputError(
                f"sequence needs {n_entries} entries at ratio {self.ratio}, more than the cache was sized for; "
                "raise runtime.max_seq_len"
            )
        while len(self.owned[slot]) < need:
            if not self.free:
                raise InputError(
                    f"compressed-entry pool (ratio {self.ratio}) is out of blocks; "
                    "lower the batch or raise runtime.max_seq_len"
                )
            b = self.free.pop()
            self.table[slot, len(self.owned[slot])] = b
            self.owned[slot].append(b)

    def release(self, slot: int) -> None:
        self.free.extend(reversed(self.owned[slot]))
        self.owned[slot] = []
        self.table[slot].zero_()


@dataclass
class LayerCache:
    kind: str
    ring: torch.Tensor  # [slots, W, D]
    pool: torch.Tensor | None = None  # [blocks, bs, D]
    state_kv: torch.Tensor | None = None  # [slots, k*m, k*D]
    state_score: torch.Tensor | None = None
    index_pool: torch.Tensor | None = None  # [blocks, bs, Di]
    index_state_kv: torch.Tensor | None = None
    index_state_score: torch.Tensor | None = None


class KVCache:
    """Decode state of `max_slots` sequences of up to `max_seq_len` tokens each.

    num_blocks: blocks per compression ratio of the paged pools; by default enough for every slot
    to reach max_seq_len at once (nothing can run out). The engine passes fewer when a byte budget
    (runtime.kv_cache_memory) sizes the pools, and then preempts when they run out.
    """

    def __init__(self, cfg: ModelConfig, max_slots: int, max_seq_len: int, dtype: torch.dtype,
                 device="cpu", block_size: int = 64, num_layers: int | None = None,
                 num_blocks: dict[int, int] | None = None):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.max_slots, self.max_seq_len, self.block_size = max_slots, max_seq_len, block_size
        self.seq_len = [0] * max_slots
        self.in_use = [False] * max_slots
        # when a list: every alloc / release / reserve is appended, so that the other ranks of a
        # tensor-parallel group can replay them on their own copy of the cache (v4.dist.step_plan)
        self.journal: list | None = None
        W, D, Di = cfg.sliding_window, cfg.head_dim, cfg.index_head_dim
        a = acc(dtype)
        n_layers = num_layers if num_layers is not None else cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.tables: dict[int, BlockTable] = {}
        self.layers: list[LayerCache] = []
        for i in range(n_layers):
            kind, m = cfg.layer_type(i), cfg.layer_ratio(i)
            lc = LayerCache(kind, torch.zeros(max_slots, W, D, dtype=dtype, device=self.device))
            if kind != SLIDING:
                if m not in self.tables:
                    max_e = max_seq_len // m
                    blocks = max_slots * max(1, math.ceil(max_e / block_size))
                    if num_blocks is not None:
                        blocks = num_blocks[m]
                    self.tables[m] = BlockTable(m, block_size, blocks, max_slots, max_e, self.device)
                nb = self.tables[m].num_blocks
                k = 2 if kind == CSA else 1
                lc.pool = torch.zeros(nb, block_size, D, dtype=dtype, device=self.device)
                lc.state_kv = torch.zeros(max_slots, k * m, k * D, dtype=a, device=self.device)
                lc.state_score = torch.zeros_like(lc.state_kv)
                if kind == CSA:
                    lc.index_pool = torch.zeros(nb, block_size, Di, dtype=dtype, device=self.device)
                    lc.index_state_kv = torch.zeros(max_slots, 2 * m, 2 * Di, dtype=a, device=self.device)
                    lc.index_state_score = torch.zeros_like(lc.index_state_kv)
            self.layers.append(lc)
        self.geometry = CacheGeometry.of(cfg, dtype, block_size, n_layers)
        self.hca_ratios = {cfg.layer_ratio(i) for i, lc in enumerate(self.layers) if lc.kind == HCA}

    # ------------------------------------------------------------------ slots
    @property
    def num_free_slots(self) -> int:
        return self.in_use.count(False)

    def alloc(self) -> int:
        for s in range(self.max_slots):
            if not self.in_use[s]:
                self.in_use[s] = True
                self.seq_len[s] = 0
                for lc in self.layers:
                    for t in (lc.state_kv, lc.state_score, lc.index_state_kv, lc.index_state_score):
                        if t is not None:
                            t[s].zero_()
                if self.journal is not None:
                    self.journal.append(("alloc", s))
                return s
        raise InputError(f"all {self.max_slots} cache slots are in use; raise runtime.max_num_seqs")

    def release(self, slot: int) -> None:
        if self.journal is not None:
            self.journal.append(("release", slot))
        self.in_use[slot] = False
        self.seq_len[slot] = 0
        for t in self.tables.values():
            t.release(slot)

    def missing_blocks(self, slot: int, new_len: int) -> dict[int, int]:
        """Blocks per ratio that `slot` still lacks to grow to `new_len` tokens."""
        return {m: t.missing(slot, new_len // m) for m, t in self.tables.items()}

    def can_reserve(self, slot: int, new_len: int) -> bool:
        return all(n <= len(self.tables[m].free) for m, n in self.missing_blocks(slot, new_len).items())

    def reserve(self, slot: int, new_len: int) -> None:
        """Make room for a sequence growing to `new_len` tokens."""
        if new_len > self.max_seq_len:
            raise InputError(
                f"sequence of {new_len} tokens exceeds the cache's max_seq_len={self.max_seq_len}; "
                "raise runtime.max_model_len"
            )
        if self.journal is not None:
            self.journal.append(("reserve", slot, new_len))
        for m, t in self.tables.items():
            t.ensure(slot, new_len // m)

    def reserve_step(self, batch: StepBatch) -> None:
        """The host-side bookkeeping of one StepBatch step, done by whoever runs the model (the engine's
        runner, or a test driving `Transformer.forward` directly): room for every sequence's new tokens,
        and its new length."""
        for slot, start, n, _ in batch.seqs:
            self.reserve(slot, start + n)
            self.seq_len[slot] = start + n

    # ------------------------------------------------------------------ sizes
    def bytes_used(self) -> int:
        total = 0
        for lc in self.layers:
            for t in (lc.ring, lc.pool, lc.state_kv, lc.state_score,
                      lc.index_pool, lc.index_state_kv, lc.index_state_score):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def usage(self, reserved_slots: int = 0) -> float:
        """Share of the cache's bytes held by live sequences (slots and pool blocks), in [0, 1].
        `reserved_slots`: slots held by the runner itself (the graph scratch slot), not counted."""
        g = self.geometry
        held = (sum(self.in_use) - reserved_slots) * g.slot_bytes
        held += sum(t.num_used * g.block_bytes[m] for m, t in self.tables.items())
        return held / self.bytes_used()


class RowBackup:
    """The cache rows that tokens at given positions are about to write, saved so that the rows of
    tokens later rejected (speculative drafts) can be put back: afterwards the cache holds exactly
    what it held had those tokens never run.

    A token at position p of slot s writes, in each layer: ring row p mod W; for a compressed
    layer, state row cur + p mod m of its compressor (and of its indexer on CSA layers), and when
    it closes a window (p mod m = m - 1) the state's previous-window rows [0, m) (overlapping
    compressor) and the pool row of entry p // m. Restoring a rejected token's rows is exact as
    long as no accepted token of the same step wrote the same rows: that holds when a step gives
    a sequence at most min(W, smallest ratio) tokens (`max_tokens_per_step`), so that no two of
    them share a ring row, a state row or a window close.
    """

    def __init__(self, cache: "KVCache", pairs: list[tuple[int, int]], layers: range | None = None,
                 step: list[tuple[int, int, int]] | None = None):
        """pairs: (slot, position) of every token whose rows may need restoring; their pool blocks
        must be reserved already. step: the packed step that will write them, (slot, first position,
        tokens) per sequence in batch order (needed by `restore` to rewrite the rows of accepted
        tokens that a rejected token's window close folded away)."""
        self.cache = cache
        self.pairs = pairs
        self.layers = layers if layers is not None else range(len(cache.layers))
        dev = cache.device
        self.slot = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=dev)
        self.pos = torch.tensor([p for _, p in pairs], dtype=torch.long, device=dev)
        self.saved = [self._take(cache.layers[i], cache.cfg.layer_ratio(i)) for i in self.layers]
        self.step_rows = {}  # (slot, position) -> the token's row in the step's packed layout
        row = 0
        for slot, start, n in step or ():
            self.step_rows.update({(slot, start + i): row + i for i in range(n)})
            row += n

    @staticmethod
    def max_tokens_per_step(cfg: ModelConfig) -> int:
        ratios = [cfg.layer_ratio(i) for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
                  if cfg.layer_type(i) != SLIDING]
        return min([cfg.sliding_window] + ratios)

    def _rows(self, lc: LayerCache, m: int):
        """[(how, tensor, index)] of every row the saved tokens write in one layer. how: "row" (one row
        per saved token, index (slots, rows)), "block" (a state's rows [0, m) per window close, index
        slots) or "pool" (an entry's pool row per window close, index flat pool rows)."""
        out = [("row", lc.ring, (self.slot, self.pos % lc.ring.shape[1]))]
        if lc.kind == SLIDING:
            return out
        cur = m if lc.kind == CSA else 0  # the overlapping (CSA) compressor keeps the previous window first
        closes = (self.pos + 1) % m == 0
        table = self.cache.tables[m]
        bs, entry = table.block_size, self.pos // m
        block = table.table[self.slot, (entry // bs).clamp(max=table.max_blocks_per_seq - 1)].long()
        pool_row = (block * bs + entry % bs)[closes]
        groups = [(lc.state_kv, lc.state_score, lc.pool)]
        if lc.kind == CSA:
            groups.append((lc.index_state_kv, lc.index_state_score, lc.index_pool))
        for state_kv, state_score, pool in groups:
            for st in (state_kv, state_score):
                out.append(("row", st, (self.slot, cur + self.pos % m)))
                if cur:
                    out.append(("block", st, self.slot[closes]))
            out.append(("pool", pool.view(-1, pool.shape[-1]), pool_row))
        return out

    def _take(self, lc: LayerCache, m: int):
        saved = []
        for how, t, idx in self._rows(lc, m):
            rows = t[idx] if how == "row" else t[idx, :m] if how == "block" else t[idx]
            saved.append((how, t, idx, rows.clone()))
        return saved

    def restore(self, rejected: list[bool], compress_inputs: dict | None = None) -> None:
        """Put back the rows of the tokens flagged in `rejected` (one flag per saved pair).

        compress_inputs: the step's compressor inputs {(layer, "kv" | "index"): (kv, score, ape)}
        (`Transformer.compress_inputs`). A compressor that closes a window stores none of that
        window's new tokens in its state: they went into the entry. When the token that closed it
        is rejected, the window is open again and its accepted tokens of this step must be back in
        their state rows, as a step without the rejected tokens would have left them."""
        if not any(rejected):
            return
        back = torch.tensor(rejected, dtype=torch.bool, device=self.cache.device)
        for i, saved in zip(self.layers, self.saved):
            m = self.cache.cfg.layer_ratio(i)
            back_close = back[(self.pos + 1) % m == 0] if m else back[:0]  # flags of the window closes
            for how, t, idx, rows in saved:
                if how == "row":
                    t[idx[0][back], idx[1][back]] = rows[back]
                elif how == "block":
                    t[idx[back_close], :m] = rows[back_close]
                else:
                    t[idx[back_close]] = rows[back_close]
            if m and bool(back_close.any()):
                self._rejoin(i, m, rejected, compress_inputs)

    def _rejoin(self, layer: int, m: int, rejected: list[bool], compress_inputs: dict | None) -> None:
        """Rewrite the state rows of the accepted step tokens in each window a rejected token closed."""
        lc = self.cache.layers[layer]
        cur = m if lc.kind == CSA else 0
        closed = {(s, p // m) for (s, p), r in zip(self.pairs, rejected) if r and (p + 1) % m == 0}
        accepted = [(s, p) for (s, p), r in zip(self.pairs, rejected) if not r]
        # the step's tokens before the first saved one of each slot (always accepted) count too
        firsts = {}
        for s, p in self.pairs:
            firsts[s] = min(p, firsts.get(s, p))
        accepted += [(s, p) for (s, p) in self.step_rows if p < firsts.get(s, -1)]
        redo = [(s, p) for s, p in accepted if (s, p // m) in closed]
        if not redo:
            return
        if compress_inputs is None or (layer, "kv") not in compress_inputs:
            raise RuntimeError("RowBackup.restore: a rejected token closed a compressor window; the step's compressor "
                               "inputs (Transformer.compress_inputs) are needed to reopen it")
        slot = torch.tensor([s for s, _ in redo], device=self.cache.device)
        pos = torch.tensor([p for _, p in redo], device=self.cache.device)
        tok = torch.tensor([self.step_rows[x] for x in redo], device=self.cache.device)
        pairs = [("kv", lc.state_kv, lc.state_score)]
        if lc.kind == CSA:
            pairs.append(("index", lc.index_state_kv, lc.index_state_score))
        for which, state_kv, state_score in pairs:
            kv, score, ape = compress_inputs[(layer, which)]
            # what a step that stops at these tokens writes: kv, and the score plus ape at position mod m
            state_kv[slot, cur + pos % m] = kv[tok].to(state_kv.dtype)
            state_score[slot, cur + pos % m] = (score[tok] + ape[pos % m].to(score.dtype)).to(state_score.dtype)


@dataclass
class CacheGeometry:
    """Bytes of one sequence slot (window rings + compressor states, fixed per sequence) and of one
    pool block per compression ratio (compressed entries + indexer keys of every layer at that ratio)."""

    slot_bytes: int
    block_bytes: dict[int, int]
    block_size: int

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: torch.dtype, block_size: int, num_layers: int) -> "CacheGeometry":
        e, a = torch.empty(0, dtype=dtype).element_size(), torch.empty(0, dtype=acc(dtype)).element_size()
        W, D, Di = cfg.sliding_window, cfg.head_dim, cfg.index_head_dim
        slot, blocks = 0, {}
        for i in range(num_layers):
            kind, m = cfg.layer_type(i), cfg.layer_ratio(i)
            slot += W * D * e
            if kind == SLIDING:
                continue
            k = 2 if kind == CSA else 1
            slot += 2 * (k * m) * (k * D) * a
            blocks[m] = blocks.get(m, 0) + block_size * D * e
            if kind == CSA:
                slot += 2 * (2 * m) * (2 * Di) * a
                blocks[m] += block_size * Di * e
        return cls(slot, blocks, block_size)

    def tokens_per_block(self, ratio: int) -> int:
        return ratio * self.block_size

    def pool_bytes_per_token(self) -> float:
        return sum(b / self.tokens_per_block(m) for m, b in self.block_bytes.items())

    def blocks_for_tokens(self, tokens: int, slots: int = 0) -> dict[int, int]:
        """Blocks per ratio for pools that hold `tokens` context tokens in all, plus one partly
        filled last block per sequence slot (at ratio 128 and 64 entries a block, one block spans
        8192 tokens: without it, short sequences would run out of blocks long before of memory)."""
        return {m: max(1, tokens // self.tokens_per_block(m) + slots) for m in self.block_bytes}

    def blocks_for_budget(self, budget: int, slots: int, source: str = "runtime.kv_cache_memory") -> dict[int, int]:
        """Blocks per ratio that fit in `budget` bytes once `slots` sequence slots (and their
        partly filled last blocks) are paid for."""
        fixed = slots * (self.slot_bytes + sum(self.block_bytes.values()))
        if budget <= fixed:
            raise ConfigError(f"{source}={budget} bytes does not even hold the fixed state of {slots} sequence slots "
                              f"({fixed} bytes: window rings, compressor states and one pool block per ratio each); "
                              "raise it or lower runtime.max_num_seqs")
        per_token = self.pool_bytes_per_token()
        return self.blocks_for_tokens(int((budget - fixed) // per_token) if per_token else 0, slots)


def cache_bytes_per_token(cfg: ModelConfig, entry_bytes: int | None = None, index_bytes: int | None = None,
                          elem_bytes: int = 2) -> dict:
    """Cache bytes per context token by the spec §6 formula, for the layout given.

    Per CSA layer (E + I)/4, per HCA layer E/m, sliding layers 0; plus a fixed W * E ring per
    layer. E and I default to what this cache stores: head_dim and index_head_dim elements of
    `elem_bytes` each.
    """
    E = entry_bytes if entry_bytes is not None else cfg.head_dim * elem_bytes
    idx_bytes = index_bytes if index_bytes is not None else cfg.index_head_dim * elem_bytes
    per_type = {SLIDING: 0.0, CSA: 0.0, HCA: 0.0}
    counts = {SLIDING: 0, CSA: 0, HCA: 0}
    for i in range(cfg.num_hidden_layers):
        kind, m = cfg.layer_type(i), cfg.layer_ratio(i)
        counts[kind] += 1
        per_type[kind] = 0.0 if kind == SLIDING else ((E + idx_bytes) / m if kind == CSA else E / m)
    total = sum(per_type[k] * counts[k] for k in counts)
    ring = cfg.num_hidden_layers * cfg.sliding_window * E
    return {"entry_bytes": E, "index_bytes": idx_bytes, "per_layer": per_type, "layers": counts,
            "per_token_total": total, "window_ring_bytes": ring}


# ---------------------------------------------------------------------------- step layout
def window_rows(batch: StepBatch | DecodeBatch, num_rings: int, W: int) -> torch.Tensor:
    """Rows of cat([the step's rings, new kv]) holding each query's window {t-W+1 .. t}: older
    tokens from the ring of its sequence (batch row b's ring is rows [b*W, (b+1)*W); `num_rings`
    rings of W rows come first), this step's from the new kv; -1 before position 0. [T, W] int32,
    the same for every layer."""
    p = batch.positions[:, None] - torch.arange(W, device=batch.device)[None, :]  # [T, W]
    fresh = p >= batch.tok_start[:, None]
    from_new = num_rings * W + batch.tok_off[:, None] + (p - batch.tok_start[:, None])
    from_ring = batch.tok_row[:, None] * W + p.remainder(W)
    idx = torch.where(fresh, from_new, from_ring)
    return torch.where(p >= 0, idx, -1).to(torch.int32)


def ring_rows(batch: StepBatch | DecodeBatch, W: int):
    """(which new tokens stay in the ring, the ring rows they go to): the last W of each sequence."""
    if batch.graph_safe:  # one token per sequence: every token stays (and no mask, no host read)
        return slice(None), batch.tok_slot * W + batch.positions % W
    end = batch.tok_start + batch.cu_seqlens[1:].long()[batch.tok_row] - batch.tok_off  # [T] end of its sequence
    keep = batch.positions >= end - W
    return keep, batch.tok_slot[keep] * W + batch.positions[keep] % W


def entry_rows(logical: torch.Tensor, tok_slot: torch.Tensor, table) -> torch.Tensor:
    """Logical entry ids [T, K] (-1 = none) -> rows of the flattened pool (int32, -1 kept)."""
    bs = table.block_size
    j = logical.long().clamp(min=0)
    phys = table.table[tok_slot[:, None], j // bs].long() * bs + j % bs
    return torch.where(logical >= 0, phys, -1).to(torch.int32)


def visible_entry_rows(batch: StepBatch | DecodeBatch, ratio: int, table) -> torch.Tensor:
    """Pool rows of every complete entry each query may see (HCA attends to all of them):
    [T, max_visible] int32, -1 past a query's (position + 1) // ratio entries."""
    nvis = (batch.positions + 1) // ratio
    width = batch.max_visible(ratio) if batch.num_tokens else 0
    j = torch.arange(width, device=batch.device)
    return entry_rows(torch.where(j[None, :] < nvis[:, None], j[None, :], -1), batch.tok_slot, table)


class StepLayout:
    """Where the tokens of one step read and write in the cache, built once per step (before the
    first layer) and read by every layer: window rows, ring rows, and per compression ratio the
    block table, the `max_visible` bound and, for HCA ratios, the rows of every visible entry."""

    def __init__(self, batch: StepBatch | DecodeBatch, cache: KVCache):
        W = cache.cfg.sliding_window
        self.batch = batch
        self.window_idx = window_rows(batch, batch.row_slot.shape[0], W)  # [T, W]
        if not batch.graph_safe:  # columns past the longest sequence are -1 in every row: not worth a gather
            self.window_idx = self.window_idx[:, :min(W, max((s + n for _, s, n, _ in batch.seqs), default=0))]
        self.ring_keep, self.ring_at = ring_rows(batch, W)
        self.tables = cache.tables
        self.max_visible = {m: batch.max_visible(m) for m in cache.tables}
        self.hca_rows = {m: visible_entry_rows(batch, m, cache.tables[m]) for m in cache.hca_ratios}  # [T, max_visible]

    def entry_rows(self, logical: torch.Tensor, ratio: int) -> torch.Tensor:
        """Indexer picks [T, K] at `ratio` -> pool rows."""
        return entry_rows(logical, self.batch.tok_slot, self.tables[ratio])

    def picked_rows(self, topk: torch.Tensor, ratio: int) -> torch.Tensor:
        """The indexer's picks [T, K] -> pool rows [T, min(K, max_visible)]: no query sees more than
        max_visible entries, so the columns past it are -1 in every row (short contexts)."""
        return self.entry_rows(topk[:, :self.max_visible[ratio]], ratio)

    def window(self, kv: torch.Tensor, ring: torch.Tensor):
        """(keys of every window row: the step's rings [B*W, D] then its new kv [T, D]; their indices [T, W])."""
        # the rings of this step's sequences only: a gather of B rings, not a copy of every slot's
        return torch.cat([ring[self.batch.row_slot].view(-1, ring.shape[-1]), kv.to(ring.dtype)]), self.window_idx

    def write_ring(self, kv: torch.Tensor, ring: torch.Tensor) -> None:
        ring.view(-1, ring.shape[-1])[self.ring_at] = kv[self.ring_keep].to(ring.dtype)

