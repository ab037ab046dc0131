"""DeepSeek V4 forward pass, device-agnostic.

The model never touches a kernel: every op goes through `self.ops` (see `backends`). One call of
`Transformer.forward` runs one engine step over a packed batch: any mix of prompt chunks and
single decode tokens, each sequence continuing from what its cache slot already holds.

Reading order for a newcomer: `Transformer.forward` -> `_block` -> `_attention` (the three layer
types: window only; CSA = window + indexer-selected compressed entries; HCA = window + all
compressed entries) -> `_moe`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

from . import quant
from .batch import DecodeBatch, StepBatch
from .cache import KVCache, StepLayout
from .config import CSA, SLIDING, ModelConfig, yarn_inv_freq
from .errors import CheckpointError, InputError
from .ops import CompressSpec, acc

__all__ = ["Transformer", "StepBatch", "DecodeBatch", "FP8_LINEARS"]

# Linears that the official checkpoint stores in FP8 (or FP4 for routed experts): in exact mode
# their activations are quantised to FP8 first, as the official inference code does.
FP8_LINEARS = ("wq_a", "wq_b", "wkv", "wo_b", "e_proj", "h_proj")


class Transformer:
    """V4 model (main stack + MTP blocks) over weights prepared by one backend's ops."""

    def __init__(self, cfg: ModelConfig, weights: dict, ops, dtype: torch.dtype = torch.float32, mode: str = "plain",
                 comm=None, moe_comm: str = "alltoall"):
        """comm: a `v4.dist.comm.Communicator` when this process is one rank of a multi-device run
        (weights then hold only this rank's slices: `v4.dist.shard`); None for one device."""
        if mode not in ("plain", "exact"):
            raise InputError(f"numerics mode must be 'plain' or 'exact', got {mode!r}")
        self.cfg, self.ops, self.dtype, self.mode = cfg, ops, dtype, mode
        self.comm = comm
        self.place = place = comm.place if comm is not None else None
        self.tp = comm.tp_size if comm is not None else 1
        # this rank's share of the heads, output groups, vocab rows and routed experts (all of them on one device)
        self.num_heads = place.num_heads if place else cfg.num_attention_heads
        self.num_groups = place.num_groups if place else cfg.o_groups
        self.vocab = place.vocab if place else (0, cfg.vocab_size)
        self.experts = place.experts if place else (0, cfg.n_routed_experts)
        self.ep_moe = None
        if place is not None and place.layout.ep:
            from .dist.moe import ExpertParallelMoE

            self.ep_moe = ExpertParallelMoE(ops, comm, place, cfg.n_routed_experts, moe_comm)
        self.acc = acc(dtype)
        self.device = ops.device
        self.exact = mode == "exact"
        self.hook: Callable[[str, torch.Tensor], None] | None = None
        # when a dict: every compressor's inputs of the step, {(layer, "kv" | "index"): (kv, score, ape)}
        self.compress_inputs: dict | None = None
        self._w = weights
        self.embed = self._float("embed.weight", dtype)
        self.head = self._linear("head.weight", self.acc)
        self.norm = self._float("norm.weight", self.acc)
        self.hc_head = self._hc("hc_head")
        self.blocks = [self._prepare_block(f"layers.{i}.", i) for i in range(cfg.num_hidden_layers)]
        self.mtp = []
        for j in range(cfg.num_nextn_predict_layers):
            p = f"mtp.{j}."
            blk = self._prepare_block(p, cfg.num_hidden_layers + j)
            blk.e_proj, blk.h_proj = self._linear(p + "e_proj.weight"), self._linear(p + "h_proj.weight")
            blk.enorm, blk.hnorm = self._float(p + "enorm.weight", self.acc), self._float(p + "hnorm.weight", self.acc)
            blk.norm, blk.hc_head = self._float(p + "norm.weight", self.acc), self._hc(p + "hc_head")
            self.mtp.append(blk)
        leftover = sorted(self._w)
        self._w = None
        if leftover:
            raise CheckpointError(
                f"weights not used by the model: {', '.join(leftover[:5])}{' ...' if len(leftover) > 5 else ''}"
            )
        rd = cfg.qk_rope_head_dim
        self.inv_freq = {
            SLIDING: yarn_inv_freq(rd, cfg.rope_theta, None).to(self.device, self.acc),
            "compress": yarn_inv_freq(rd, cfg.compress_rope_theta, cfg.rope_scaling).to(self.device, self.acc),
        }

    # ------------------------------------------------------------------ weight preparation
    def _take(self, name):
        try:
            return self._w.pop(name)
        except KeyError:
            raise CheckpointError(f"tensor '{name}' is missing from the weights") from None

    def _float(self, name, dtype):
        t = self._take(name)
        if isinstance(t, quant.QuantizedWeight):
            t = t.dequantize(self.acc)
        return t.to(device=self.device, dtype=dtype)

    def _linear(self, name, dtype=None):
        return self.ops.prepare_linear(self._take(name), dtype or self.dtype)

    def _hc(self, prefix):
        a = self.acc
        return (self._float(prefix + "_fn", a), self._float(prefix + "_base", a), self._float(prefix + "_scale", a))

    def _prepare_block(self, p: str, layer: int) -> SimpleNamespace:
        cfg, a = self.cfg, self.acc
        kind, m = cfg.layer_type(layer), cfg.layer_ratio(layer)
        b = SimpleNamespace(layer=layer, kind=kind, ratio=m, name=p.rstrip("."))
        b.hc_attn, b.hc_ffn = self._hc(p + "hc_attn"), self._hc(p + "hc_ffn")
        b.attn_norm, b.ffn_norm = self._float(p + "attn_norm.weight", a), self._float(p + "ffn_norm.weight", a)
        q = p + "attn."
        b.wq_a, b.q_norm = self._linear(q + "wq_a.weight"), self._float(q + "q_norm.weight", a)
        b.wq_b, b.wkv = self._linear(q + "wq_b.weight"), self._linear(q + "wkv.weight")
        b.kv_norm = self._float(q + "kv_norm.weight", a)
        b.wo_a, b.wo_b = self._linear(q + "wo_a.weight"), self._linear(q + "wo_b.weight")
        b.sink = self._float(q + "attn_sink", a)
        b.rope = "compress" if kind != SLIDING else SLIDING
        if kind != SLIDING:
            c = q + "compressor."
            b.comp = SimpleNamespace(
                wkv=self._linear(c + "wkv.weight", a), wgate=self._linear(c + "wgate.weight", a),
                ape=self._float(c + "ape", a), norm=self._float(c + "norm.weight", a),
                spec=CompressSpec(m, cfg.head_dim, kind == CSA, "fp8" if self.exact else "none",
                                  cfg.qk_rope_head_dim, cfg.rms_norm_eps))
        if kind == CSA:
            ix = q + "indexer."
            b.idx = SimpleNamespace(
                wq_b=self._linear(ix + "wq_b.weight"),
                weights_proj=self._linear(ix + "weights_proj.weight", a),
                wkv=self._linear(ix + "compressor.wkv.weight", a),
                wgate=self._linear(ix + "compressor.wgate.weight", a),
                ape=self._float(ix + "compressor.ape", a),
                norm=self._float(ix + "compressor.norm.weight", a),
                spec=CompressSpec(
                    m, cfg.index_head_dim, True, "fp4" if self.exact else "none", cfg.qk_rope_head_dim, cfg.rms_norm_eps
                ),
            )
        f = p + "ffn."
        b.gate_w = self._float(f + "gate.weight", a)
        is_hash = layer < cfg.num_hidden_layers and cfg.is_hash_layer(layer)
        b.gate_bias = None if is_hash else self._float(f + "gate.bias", a)
        b.tid2eid = self._take(f + "gate.tid2eid").to(self.device, torch.long) if is_hash else None
        # experts as one gate/up matrix [W1; W3] per expert, stacked: [E, 2I, D] and W2 [E, D, I]
        ex = [f"{f}experts.{e}." for e in range(*self.experts)]  # this rank's experts (all of them without EP)
        b.w13, b.w2 = self._experts(ex)
        b.shared = None
        if cfg.n_shared_experts:
            s13, s2 = self._experts([f + "shared_experts."])
            b.shared = (s13[0], s2[0])
        return b

    def _experts(self, prefixes):
        take = lambda k: [self._take(p + k) for p in prefixes]  # noqa: E731
        return self.ops.prepare_experts(take("w1.weight"), take("w3.weight"), take("w2.weight"), self.dtype)

    # ------------------------------------------------------------------ helpers
    def _record(self, name: str, t: torch.Tensor):
        if self.hook is not None:
            self.hook(name, t)

    def _record_heads(self, name: str, t: torch.Tensor):
        """A [T, H, d] tensor split by heads under TP: recorded whole (every TP rank has a hook then)."""
        if self.hook is not None and self.tp > 1:
            T, h, d = t.shape
            t = self.comm.tp_all_gather(t.reshape(T, h * d), [h * d] * self.tp).view(T, -1, d)
        self._record(name, t)

    def _lin(self, x, w, fp8: bool):
        return self.ops.linear(x, w, act_quant=self.exact and fp8)

    def new_cache(self, max_slots: int, max_seq_len: int, block_size: int = 64) -> KVCache:
        return KVCache(self.cfg, max_slots, max_seq_len, self.dtype, self.device, block_size)

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor, batch: StepBatch | DecodeBatch, cache: KVCache, logits: str = "all",
                mtp_ids: torch.Tensor | None = None):
        """One step, pure compute. ids: [T] packed token ids (batch layout). Returns (logits, mtp_logits or None).

        logits="all": [T, vocab]; "last": one row per sequence; "none": None (prefill chunks).
        mtp_ids: [T] the token that follows each position; when given, MTP block 0 runs too and
        its logits (for the token after that) come back in the same layout.
        The caller has checked the ids and made room in the cache (`KVCache.reserve_step`; the
        engine's runner does both).
        """
        X = self.trunk(ids, batch, cache)
        out = self.head_logits(X, batch, logits)
        mtp_out = None
        if mtp_ids is not None and self.mtp:
            mtp_out, _ = self.mtp_block(X, mtp_ids, batch, cache, logits)
        return out, mtp_out

    def trunk(self, ids: torch.Tensor, batch: StepBatch | DecodeBatch, cache: KVCache) -> torch.Tensor:
        """The main stack: [T] ids -> the last block's streams [T, hc, D] (writes the main layers' cache)."""
        ids = ids.to(self.device)
        layout = StepLayout(batch, cache)
        X = self._embed(ids).unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()  # [T, hc, D]
        for b in self.blocks:
            X = self._block(b, X, ids, layout, cache)
        return X

    def head_logits(self, X: torch.Tensor, batch: StepBatch | DecodeBatch, which="all"):
        """Logits of the main head: which = "all" | "last" | "none", or a LongTensor of rows of X."""
        return self._head(X, self.hc_head, self.norm, batch, which)

    def mtp_block(self, X: torch.Tensor, next_ids: torch.Tensor, batch: StepBatch | DecodeBatch, cache: KVCache,
                  which="all"):
        """MTP block 0 over one step's tokens: X [T, hc, D] the streams at each position (the main
        stack's, or the MTP block's own when drafting further ahead), next_ids [T] the token after
        each. Returns (logits for the token after next, as `head_logits`'s `which` picks; the block's streams
        [T, hc, D]). Writes only the MTP layer's cache."""
        layout = StepLayout(batch, cache)
        return self._mtp(self.mtp[0], X, next_ids.to(self.device), layout, cache, which)

    def _embed(self, ids):
        """[T] ids -> [T, D]. Vocab-parallel: each TP rank looks up the rows it holds, zeros elsewhere, summed."""
        if self.tp == 1:
            return self.embed[ids]
        v0, v1 = self.vocab
        mine = (ids >= v0) & (ids < v1)
        x = self.embed[(ids - v0).clamp(0, v1 - v0 - 1)] * mine.unsqueeze(1).to(self.embed.dtype)
        return self.comm.tp_all_reduce(x)  # adding zeros is exact: the same bits as one device

    def _head(self, X, hc, norm, batch, which):
        if isinstance(which, torch.Tensor):
            X = X[which]
        elif which == "none":
            return None
        elif which == "last":
            X = X[batch.last_token]
        h = self.ops.hc_head(X, *hc, self.cfg.hc_eps, self.cfg.rms_norm_eps)
        h = self.ops.rms_norm(h, norm, self.cfg.rms_norm_eps)
        logits = self.ops.linear(h.to(self.acc), self.head)  # [T, this rank's vocab rows]
        if self.tp == 1:
            return logits
        return self.comm.tp_all_gather(logits, self.place.layout.vocab_widths(self.cfg))  # [T, vocab] on every TP rank

    def _mtp(self, b, X, next_ids, layout, cache, which):
        """MTP block: embed the next token, mix with the main stack's streams, one block, own head."""
        ops, cfg = self.ops, self.cfg
        e = ops.rms_norm(self.embed[next_ids], b.enorm, cfg.rms_norm_eps)
        h = ops.rms_norm(X, b.hnorm, cfg.rms_norm_eps)
        X0 = self._lin(e, b.e_proj, True).unsqueeze(1) + self._lin(h, b.h_proj, True)
        X1 = self._block(b, X0, next_ids, layout, cache)
        return self._head(X1, b.hc_head, b.norm, layout.batch, which), X1

    def _block(self, b, X, ids, layout, cache):
        # shapes: T tokens of the step, hc = cfg.hc_mult residual streams, D = cfg.hidden_size
        ops, cfg = self.ops, self.cfg
        self._record(f"{b.name}.input", X)  # X [T, hc, D]
        # u [T, D], post [T, hc], comb [T, hc, hc]
        u, post, comb = ops.hc_pre(X, *b.hc_attn, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
        x = ops.rms_norm(u, b.attn_norm, cfg.rms_norm_eps)  # [T, D]
        y = self._attention(b, x, layout, cache)  # [T, D]
        X = ops.hc_post(y, X, post, comb)  # [T, hc, D]
        # u [T, D], post [T, hc], comb [T, hc, hc]
        u, post, comb = ops.hc_pre(X, *b.hc_ffn, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
        x = ops.rms_norm(u, b.ffn_norm, cfg.rms_norm_eps)  # [T, D]
        y = self._moe(b, x, ids)  # [T, D]
        X = ops.hc_post(y, X, post, comb)  # [T, hc, D]
        self._record(f"{b.name}.output", X)
        return X

    # ------------------------------------------------------------------ attention
    def _attention(self, b, x, layout: StepLayout, cache: KVCache):
        # shapes: x [T, hidden]; H = this rank's query heads, d = cfg.head_dim (the code's D); K = the
        # compressed entries a query attends to (index_topk on CSA, the visible entries on HCA)
        ops, cfg = self.ops, self.cfg
        T, H, D = x.shape[0], self.num_heads, cfg.head_dim  # H: this rank's query heads
        batch = layout.batch
        pos, inv_freq = batch.positions, self.inv_freq[b.rope]
        lc = cache.layers[b.layer]

        c_q = ops.rms_norm(self._lin(x, b.wq_a, True), b.q_norm, cfg.rms_norm_eps)  # [T, q_lora]
        q = self._lin(c_q, b.wq_b, True).view(T, H, D)  # [T, H, d]
        q = ops.rope(ops.rms_norm(q, None, cfg.rms_norm_eps), pos, inv_freq)  # [T, H, d]
        kv = ops.rms_norm(self._lin(x, b.wkv, True), b.kv_norm, cfg.rms_norm_eps)  # [T, d]
        kv = ops.rope(kv, pos, inv_freq)  # [T, d]: one shared key/value head
        if self.exact:
            kv = quant.kv_fake_quant_fp8(kv, cfg.qk_rope_head_dim)  # [T, d]
        self._record_heads(f"{b.name}.attn.q", q)
        self._record(f"{b.name}.attn.kv", kv)

        comp_kv, comp_idx = None, None
        if b.kind == CSA:
            topk = self._indexer(b, x, c_q, layout, cache)  # [T, K] logical entry ids (K = index_topk)
            self._record(f"{b.name}.attn.indexer_topk", topk)
        if b.kind != SLIDING:
            table = layout.tables[b.ratio]
            entries = self._compress(b.comp, x, batch, lc.pool, lc.state_kv, lc.state_score, table, inv_freq,
                                     (b.layer, "kv"))  # [E, d]: the entries whose window closed in this step
            self._record(f"{b.name}.attn.compressed", entries)
            # CSA: the indexer's picks; HCA: every complete entry the query may see
            comp_idx = layout.picked_rows(topk, b.ratio) if b.kind == CSA else layout.hca_rows[b.ratio]  # [T, K]
            comp_kv = lc.pool.view(-1, D)  # [pool rows, d]

        window_kv, window_idx = layout.window(kv, lc.ring)  # [S*W + T, d], [T, W]
        o = ops.attention(q, window_kv, window_idx, comp_kv, comp_idx, b.sink, D ** -0.5)  # [T, H, d]
        layout.write_ring(kv, lc.ring)
        self._record_heads(f"{b.name}.attn.output", o)
        o = ops.rope(o, pos, inv_freq, inverse=True)  # [T, H, d]
        # [T, H*d] -> [T, hidden]
        y = ops.grouped_out_proj(o.reshape(T, H * D), b.wo_a, b.wo_b, self.num_groups, act_quant=self.exact)
        return self.comm.tp_all_reduce(y) if self.tp > 1 else y  # wo_b is row-parallel: partial sums

    def _indexer(self, b, x, c_q, layout: StepLayout, cache: KVCache):
        """Lightning indexer of a CSA layer: top-k compressed entries per query (logical ids, -1 padded)."""
        # shapes: x [T, hidden], c_q [T, q_lora]; Hi x Di indexer heads; K = cfg.index_topk
        ops, cfg = self.ops, self.cfg
        T, Hi, Di = x.shape[0], cfg.index_n_heads, cfg.index_head_dim
        batch = layout.batch
        lc, inv_freq = cache.layers[b.layer], self.inv_freq["compress"]
        iq = ops.rope(self._lin(c_q, b.idx.wq_b, True).view(T, Hi, Di), batch.positions, inv_freq)  # [T, Hi, Di]
        if self.exact:
            iq = quant.fp4_fake_quant(quant.hadamard(iq))  # [T, Hi, Di]
        table = layout.tables[b.ratio]
        self._compress(b.idx, x, batch, lc.index_pool, lc.index_state_kv, lc.index_state_score, table, inv_freq,
                       (b.layer, "index"))
        w = self._lin(x.to(self.acc), b.idx.weights_proj, False) * (Di ** -0.5 * Hi ** -0.5)  # [T, Hi]
        topk = ops.indexer_topk(iq, w, lc.index_pool, table.table, batch.tok_slot, batch.positions, b.ratio,
                                cfg.index_topk, max_visible=layout.max_visible[b.ratio])  # [T, K]
        if self.hook is not None:
            # The scores of the picks let parity treat entries tied at the top-k cut as interchangeable.
            keys = lc.index_pool.view(-1, Di)[layout.entry_rows(topk, b.ratio).long().clamp(min=0)]  # [T, K, Di]
            # [T, K]: relu(q . key) weighted and summed over heads
            s = (torch.relu(torch.einsum("thd,tkd->thk", iq.to(self.acc), keys.to(self.acc))) * w.unsqueeze(-1)).sum(1)
            self._record(f"{b.name}.attn.indexer_scores", s.masked_fill(topk < 0, float("-inf")))
        return topk

    def _compress(self, c, x, batch, pool, state_kv, state_score, table, inv_freq, key):
        xa = x.to(self.acc)  # the compressor runs in fp32 on fp32 input, as the official code does
        kv = self.ops.linear(xa, c.wkv)
        score = self.ops.linear(xa, c.wgate)
        if self.compress_inputs is not None:  # kept for speculative decoding's rollback (cache.RowBackup)
            self.compress_inputs[key] = (kv, score, c.ape)
        if batch.graph_safe and batch.q > 1:
            # q tokens per sequence in a captured step: the state takes them in order, token j of
            # every sequence at a time (DecodeRows: one token per row); [B, c] entries each
            B = batch.row_slot.shape[0]
            kv, score = kv.view(B, batch.q, -1), score.view(B, batch.q, -1)
            return torch.cat([self.ops.compress(kv[:, j].contiguous(), score[:, j].contiguous(), c.ape, c.spec,
                                                c.norm, inv_freq, state_kv, state_score, pool, table.table,
                                                batch.rows_of(j))
                              for j in range(batch.q)])
        return self.ops.compress(kv, score, c.ape, c.spec, c.norm, inv_freq, state_kv, state_score,
                                 pool, table.table, batch.seqs)

    # ------------------------------------------------------------------ MoE
    def _moe(self, b, x, ids):
        # shapes: x [T, D]; k = cfg.num_experts_per_tok routed experts per token
        ops, cfg = self.ops, self.cfg
        weights, experts = ops.moe_gate(x, b.gate_w, b.gate_bias, b.tid2eid, ids, cfg.num_experts_per_tok,
                                        cfg.routed_scaling_factor)  # [T, k] acc dtype, [T, k] int32
        self._record(f"{b.name}.ffn.route_ids", experts)
        self._record(f"{b.name}.ffn.route_weights", weights)
        if self.ep_moe is not None:
            y = self.ep_moe(x, experts, weights, b.w13, b.w2, b.shared, cfg.swiglu_limit, self.exact)  # [T, D]
        elif self.tp > 1:  # every expert's intermediate dim is split: partial sums, added in acc dtype
            y = ops.moe_experts(x.to(self.acc), experts, weights, b.w13, b.w2, b.shared, cfg.swiglu_limit,
                                act_quant=self.exact)  # [T, D] partial sums
            y = self.comm.tp_all_reduce(y).to(x.dtype)  # [T, D]
        else:
            # [T, D]
            y = ops.moe_experts(x, experts, weights, b.w13, b.w2, b.shared, cfg.swiglu_limit, act_quant=self.exact)
        self._record(f"{b.name}.ffn.output", y)
        return y

    def dummy_step(self) -> None:
        """A data-parallel rank with no tokens this step: take part in every MoE layer's expert
        exchange with none of its own, so the other ranks' collectives line up."""
        if self.ep_moe is None:
            return
        x = torch.zeros(0, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        for b in self.blocks:
            self.ep_moe.dummy(x, self.cfg.num_experts_per_tok, b.w13, b.w2, self.cfg.swiglu_limit, self.exact)

    # ------------------------------------------------------------------ conveniences
    @torch.no_grad()
    def logits(self, ids, mtp_next_ids=None):
        """Logits at every position of one sequence from a fresh cache (one prefill)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(-1)
        if ids.numel() == 0:
            raise InputError("empty prompt: give at least one token")
        self.cfg.check_token_ids(ids.tolist())
        cache = self.new_cache(1, max(ids.numel(), 1))
        slot = cache.alloc()
        batch = StepBatch([slot], [0], [ids.numel()], self.device)
        cache.reserve_step(batch)
        out, mtp = self.forward(ids, batch, cache, "all", mtp_next_ids)
        return out if mtp_next_ids is None else (out, mtp)
