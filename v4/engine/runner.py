"""ModelRunner: turns a scheduled step into one model call over the engine's persistent cache.

It owns the cache (sized once, at start-up), the decode graphs and the host-side bookkeeping
that `Transformer.forward` no longer does: room in the cache for the step's tokens (reserved by
the scheduler through the BlockManager) and each slot's new length. A step made only of decode
tokens replays a captured graph when graphs are on; anything else (prompt chunks, mixed steps,
or a step with parity hooks attached) runs eagerly as one packed StepBatch.
"""

from __future__ import annotations

import logging

import torch

from ..batch import StepBatch
from ..cache import CacheGeometry, KVCache
from ..config import GRAPH_SETTINGS, RuntimeConfig
from ..errors import InputError
from ..model import Transformer
from .scheduler import ScheduledSeq

log = logging.getLogger("dsv4")

DECODE_LABEL = {"off": "eager", "cuda": "cuda graphs", "npu": "npu graphs (ACL graph)",
                "emulate": "graph path, emulated"}


def graph_mode(setting: str, model: Transformer) -> str:
    """runtime.decode_graphs (auto | on | off) -> how decode runs: "off" (eager), the backend's graphs
    for the model's device (`ops.graph_capture`: "cuda" = CUDA graphs on the cuda backend, "npu" = ACL
    graphs on ascend) or "emulate" (the captured path's static buffers and checks, run eagerly: this
    device has no graphs). auto = the backend's graphs where it has them, else eager."""
    from ..graphs import native_capture

    capturable = getattr(model.ops, "capturable", False)
    native = native_capture(model)
    if setting == "off" or (setting == "auto" and native is None):
        return "off"
    if setting not in GRAPH_SETTINGS:
        raise InputError(f"runtime.decode_graphs must be auto, on or off, got {setting!r}")
    if not capturable:
        raise InputError(f"runtime.decode_graphs is on, but backend '{model.ops.name}' cannot capture its decode step "
                         "(only the cuda backend can); set it to auto or off")
    return native.mode if native is not None else "emulate"


class ModelRunner:
    def __init__(
        self, model: Transformer, rt: RuntimeConfig, graphs: str | None = None, buckets: list[int] | None = None
    ):
        """With runtime.speculative_config, decode graphs capture the verification step: 1 + k tokens
        per sequence (`run_trunk`); otherwise one token per sequence (`run`)."""
        self.model = model
        spec = rt.speculative
        self.q = 1 + spec.num_speculative_tokens if spec is not None else 1
        self.graph_mode = graph_mode(rt.decode_graphs if graphs is None else graphs, model)
        extra = 1 if self.graph_mode != "off" else 0  # the graphs' padding rows run on a scratch slot
        self.cache = self._allocate_cache(rt, extra)
        self.graphs = None
        if self.graph_mode != "off":
            from ..graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.cache, rt.max_num_seqs, self.graph_mode, buckets=buckets, q=self.q)
        self.reserved_slots = extra
        self.last_batch: StepBatch | None = None  # the last eager step's layout (None after a graph replay)

    def _allocate_cache(self, rt: RuntimeConfig, extra_slots: int) -> KVCache:
        m = self.model
        slots = rt.max_num_seqs + extra_slots
        n_layers = m.cfg.num_hidden_layers + m.cfg.num_nextn_predict_layers
        geo = CacheGeometry.of(m.cfg, m.dtype, rt.block_size, n_layers)
        budget = rt.kv_cache_bytes
        num_blocks = geo.blocks_for_budget(budget, slots) if budget is not None else None
        cache = KVCache(m.cfg, slots, rt.max_model_len, m.dtype, m.device, rt.block_size, num_blocks=num_blocks)
        tokens = min((t.num_blocks * geo.tokens_per_block(r) for r, t in cache.tables.items()),
                     default=rt.max_num_seqs * rt.max_model_len)
        self.capacity_tokens = min(tokens, rt.max_num_seqs * rt.max_model_len)
        self.cache_summary = (
            f"KV cache: {cache.bytes_used() / 2**20:.1f} MiB ({cache.bytes_used()} bytes) on {m.device}: "
            f"{self.capacity_tokens} tokens of context, "
            f"{min(rt.max_num_seqs, self.capacity_tokens // rt.max_model_len)} "
            f"sequences of max_model_len={rt.max_model_len} at once (max_num_seqs={rt.max_num_seqs}; "
            f"{geo.slot_bytes} bytes per sequence slot, block_size={rt.block_size})"
        )
        log.info(self.cache_summary)
        return cache

    @torch.no_grad()
    def run(self, step: list[ScheduledSeq], logits: str = "last") -> torch.Tensor:
        """One model step. Returns logits: one row per scheduled sequence ("last") or per token ("all")."""
        decode_only = all(s.num_tokens == 1 for s in step)
        # parity hooks need the eager step: a replayed graph never calls back into Python (a one-token
        # prompt's step is decode-shaped, and its hooks would be lost)
        if self.graphs is not None and self.q == 1 and decode_only and self.model.hook is None:
            return self._replay(step)
        batch, ids = self._prepare(step)
        out, _ = self.model.forward(ids, batch, self.cache, logits=logits)
        return out

    @torch.no_grad()
    def run_trunk(self, step: list[ScheduledSeq], rows: torch.Tensor | str):
        """One model step that keeps what speculative decoding needs: returns (the head's logits at
        `rows` (a LongTensor of token rows, or "all"), the main stack's streams [T, hc, D], the
        compressors' inputs {(layer, "kv" | "index"): (kv, score, ape)}). A step in which every
        sequence verifies k drafts replays the captured verification graph (all its rows are `rows`)."""
        if (self.graphs is not None and self.model.hook is None
                and all(s.num_tokens == self.q and s.num_drafts == self.q - 1 for s in step)):
            logits, X, inputs = self.graphs.verify([s.seq.slot for s in step], [s.start for s in step],
                                                   [t for s in step for t in s.token_ids()])
            self.last_batch = None
            return logits.clone(), X.clone(), inputs  # views into the graph's buffers, overwritten by the next replay
        batch, ids = self._prepare(step)
        self.model.compress_inputs = inputs = {}
        try:
            X = self.model.trunk(ids, batch, self.cache)
        finally:
            self.model.compress_inputs = None
        return self.model.head_logits(X, batch, rows), X, inputs

    def _prepare(self, step: list[ScheduledSeq]):
        """(the step's StepBatch, its packed ids); each slot's length moves on (its blocks were
        reserved by the scheduler)."""
        batch = StepBatch([s.seq.slot for s in step], [s.start for s in step], [s.num_tokens for s in step],
                          self.model.device)
        ids = torch.tensor([t for s in step for t in s.token_ids()], device=self.model.device)
        for s in step:
            self.cache.seq_len[s.seq.slot] = s.start + s.num_tokens
        self.last_batch = batch
        return batch, ids

    def _replay(self, step: list[ScheduledSeq]) -> torch.Tensor:
        """A decode-only step from the captured graphs (no hooks attached: see run)."""
        logits = self.graphs.step([s.seq.slot for s in step], [s.start for s in step],
                                  [s.token_ids()[0] for s in step])
        self.last_batch = None
        return logits.clone()  # a view into the graph's output buffer, overwritten by the next replay
