"""The engine's side of the KV memory: which sequence holds which cache slot and pool blocks.

V4's cache has two kinds of memory (v4/cache.py): a slot per running sequence (its window ring
and compressor state, fixed size) and paged pools of compressed entries and indexer keys, one
block table per compression ratio. A sequence takes a slot when it is first scheduled and pool
blocks step by step as its length crosses block boundaries; it gives all of them back when it
finishes, is aborted or is preempted.
"""

from __future__ import annotations

import math

from ..cache import KVCache
from .sequence import Sequence


class BlockManager:
    def __init__(self, cache: KVCache, reserved_slots: int = 0):
        self.cache = cache
        self.reserved_slots = reserved_slots  # slots the runner holds for itself (graph padding)

    def blocks_needed(self, num_tokens: int) -> dict[int, int]:
        """Blocks per ratio a sequence of `num_tokens` tokens holds."""
        bs = self.cache.block_size
        return {m: math.ceil((num_tokens // m) / bs) for m in self.cache.tables}

    def fits_at_all(self, num_tokens: int) -> str | None:
        """Why a sequence of `num_tokens` tokens can never fit in this cache, or None."""
        for m, n in self.blocks_needed(num_tokens).items():
            total = self.cache.tables[m].num_blocks
            if n > total:
                return (f"needs {n} blocks of the ratio-{m} pool, which holds {total} in all; "
                        "raise runtime.kv_cache_memory or shorten the request")
        return None

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Room for `seq` to hold `num_tokens` tokens: a slot if it has none, and the blocks it lacks."""
        c = self.cache
        if seq.slot is None:
            return c.num_free_slots > 0 and all(
                n <= len(c.tables[m].free) for m, n in self.blocks_needed(num_tokens).items()
            )
        return c.can_reserve(seq.slot, num_tokens)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        if seq.slot is None:
            seq.slot = self.cache.alloc()  # zeroes the slot's compressor state
        self.cache.reserve(seq.slot, num_tokens)

    def free(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.cache.release(seq.slot)
            seq.slot = None

    @property
    def num_free_slots(self) -> int:
        return self.cache.num_free_slots

    def usage(self) -> float:
        """Share of the cache's bytes held by sequences, in [0, 1] (vllm:kv_cache_usage_perc)."""
        return self.cache.usage(self.reserved_slots)
