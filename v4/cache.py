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

from .config import CSA, HCA, SLIDING, ModelConfig
from .errors import InputError


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class BlockTable:
    """Block allocator for one compression ratio, shared by every layer with that ratio."""

    def __init__(self, ratio: int, block_size: int, num_blocks: int, max_slots: int, max_entries: int, device):
        self.ratio, self.block_size, self.num_blocks = ratio, block_size, num_blocks
        self.max_blocks_per_seq = max(1, math.ceil(max_entries / block_size))
        self.table = torch.zeros(max_slots, self.max_blocks_per_seq, dtype=torch.int32, device=device)
        self.owned: list[list[int]] = [[] for _ in range(max_slots)]
        self.free = list(range(num_blocks - 1, -1, -1))

    def ensure(self, slot: int, n_entries: int) -> None:
        need = math.ceil(n_entries / self.block_size)
        if need > self.max_blocks_per_seq:
            raise InputError(f"sequence needs {n_entries} entries at ratio {self.ratio}, more than the cache was sized for; raise runtime.max_seq_len")
        while len(self.owned[slot]) < need:
            if not self.free:
                raise InputError(f"compressed-entry pool (ratio {self.ratio}) is out of blocks; lower the batch or raise runtime.max_seq_len")
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
    """Decode state of `max_slots` sequences of up to `max_seq_len` tokens each."""

    def __init__(self, cfg: ModelConfig, max_slots: int, max_seq_len: int, dtype: torch.dtype,
                 device="cpu", block_size: int = 64, num_layers: int | None = None):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.max_slots, self.max_seq_len, self.block_size = max_slots, max_seq_len, block_size
        self.seq_len = [0] * max_slots
        self.in_use = [False] * max_slots
        W, D, Di = cfg.sliding_window, cfg.head_dim, cfg.index_head_dim
        a = _acc(dtype)
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

    # ------------------------------------------------------------------ slots
    def alloc(self) -> int:
        for s in range(self.max_slots):
            if not self.in_use[s]:
                self.in_use[s] = True
                self.seq_len[s] = 0
                for lc in self.layers:
                    for t in (lc.state_kv, lc.state_score, lc.index_state_kv, lc.index_state_score):
                        if t is not None:
                            t[s].zero_()
                return s
        raise InputError(f"all {self.max_slots} cache slots are in use; raise runtime.max_batch")

    def release(self, slot: int) -> None:
        self.in_use[slot] = False
        self.seq_len[slot] = 0
        for t in self.tables.values():
            t.release(slot)

    def reserve(self, slot: int, new_len: int) -> None:
        """Make room for a sequence growing to `new_len` tokens."""
        if new_len > self.max_seq_len:
            raise InputError(f"sequence of {new_len} tokens exceeds the cache's max_seq_len={self.max_seq_len}; raise runtime.max_seq_len")
        for m, t in self.tables.items():
            t.ensure(slot, new_len // m)

    # ------------------------------------------------------------------ sizes
    def bytes_used(self) -> int:
        total = 0
        for lc in self.layers:
            for t in (lc.ring, lc.pool, lc.state_kv, lc.state_score, lc.index_pool, lc.index_state_kv, lc.index_state_score):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


def cache_bytes_per_token(cfg: ModelConfig, entry_bytes: int | None = None, index_bytes: int | None = None,
                          elem_bytes: int = 2) -> dict:
    """Cache bytes per context token by the spec §6 formula, for the layout given.

    Per CSA layer (E + I)/4, per HCA layer E/m, sliding layers 0; plus a fixed W * E ring per
    layer. E and I default to what this cache stores: head_dim and index_head_dim elements of
    `elem_bytes` each.
    """
    E = entry_bytes if entry_bytes is not None else cfg.head_dim * elem_bytes
    I = index_bytes if index_bytes is not None else cfg.index_head_dim * elem_bytes
    per_type = {SLIDING: 0.0, CSA: 0.0, HCA: 0.0}
    counts = {SLIDING: 0, CSA: 0, HCA: 0}
    for i in range(cfg.num_hidden_layers):
        kind, m = cfg.layer_type(i), cfg.layer_ratio(i)
        counts[kind] += 1
        per_type[kind] = 0.0 if kind == SLIDING else ((E + I) / m if kind == CSA else E / m)
    total = sum(per_type[k] * counts[k] for k in counts)
    ring = cfg.num_hidden_layers * cfg.sliding_window * E
    return {"entry_bytes": E, "index_bytes": I, "per_layer": per_type, "layers": counts,
            "per_token_total": total, "window_ring_bytes": ring}
