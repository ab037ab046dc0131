"""The reference backend: the executable definition of every op of the op set.

Plain PyTorch on any torch device. Each op is written for clarity first; the few places that
chunk or loop do so to bound memory, not for speed. Precision rule: everything that the
official code computes in fp32 is computed here in `acc(dtype)` (fp32, or fp64 when the
working dtype is fp64, so an fp64 run is a real fp64 reference).

Layout conventions (design.md): packed token-major tensors `[T, ...]`; int32 index tensors
with -1 for unused slots; compressed entries live in paged pools `[num_blocks, block, dim]`
addressed through per-sequence block tables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from v4 import quant
# the op contract's types and precision rule (read from here too by code not yet switched to v4.ops)
from v4.ops import CompressSpec, DecodeRows, acc


def _sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Column-normalise, then (iters - 1) x (row, column) normalisations, each `M / (sum + eps)`."""
    if comb.device.type == "cpu" and not comb.requires_grad:  # (under autograd: the torch path below)
        # same arithmetic in numpy: the 4x4 matrices make this loop pure per-op overhead, which is
        # several times lower in numpy than in torch's dispatcher (decode runs it twice per layer)
        c = comb.numpy().copy()
        c /= c.sum(-2, keepdims=True) + eps
        for _ in range(iters - 1):
            c /= c.sum(-1, keepdims=True) + eps
            c /= c.sum(-2, keepdims=True) + eps
        return torch.from_numpy(c)
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `.to` of a tensor already in `dtype` still costs a dispatch; decode makes hundreds per token
    return x if x.dtype == dtype else x.to(dtype)


def compress_rows_on_host(compress, kv, score, ape, spec, norm_weight, inv_freq, state_kv, state_score,
                          pool, block_table, rows: DecodeRows) -> torch.Tensor:
    """A `DecodeRows` step through a list-form `compress` (which plans on the host): the layout is
    read back, and the entries come back in the DecodeRows form ([B, c], zeros where none closed)."""
    seqs = rows.as_list()
    entries = compress(kv, score, ape, spec, norm_weight, inv_freq, state_kv, state_score, pool, block_table, seqs)
    out = pool.new_zeros((len(seqs), spec.dim))
    closed = [b for b, (_, pos, _, _) in enumerate(seqs) if (pos + 1) % spec.ratio == 0]
    if closed:
        out[closed] = entries
    return out



def _chunks(window_idx: torch.Tensor, chunk: int, min_run: int = 8) -> list[tuple[int, int, bool]]:
    """Query ranges (s, e, one sequence's run?) of at most `chunk` that do not mix a prompt's run of
    tokens with decode tokens of other sequences, so a prompt's chunk can take the union form. Token
    t continues token t-1's sequence when its window's second-newest row is t-1's newest (windows
    slide by one)."""
    T = window_idx.shape[0]
    if T == 0:
        return []
    if window_idx.shape[1] < 2:
        return [(s, min(T, s + chunk), True) for s in range(0, T, chunk)]
    cont = ((window_idx[1:, 1] == window_idx[:-1, 0]) & (window_idx[1:, 1] >= 0)).tolist()
    bounds = [0] + [t + 1 for t, c in enumerate(cont) if not c] + [T]
    runs = list(zip(bounds[:-1], bounds[1:]))
    out, short = [], None  # consecutive short runs (decode tokens) are gathered together
    for s, e in runs:
        if e - s >= min_run:
            if short is not None:
                out += [(x, min(short[1], x + chunk), False) for x in range(short[0], short[1], chunk)]
                short = None
            out += [(x, min(e, x + chunk), True) for x in range(s, e, chunk)]
        else:
            short = (short[0] if short else s, e)
    if short is not None:
        out += [(x, min(short[1], x + chunk), False) for x in range(short[0], short[1], chunk)]
    return out


def topk_lowest_first(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values of each row, best first, equal values lowest index first.

    torch.topk leaves the order of ties open, and it changes with the row's width: the indexer's
    scores tie exactly wherever relu zeroes every head, and the width is the longest sequence in
    the step, so a request's picks would depend on what else shares its step. A stable sort fixes
    the rule (the CUDA kernels use the same one)."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]

class ReferenceOps:
    name = "reference"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        # cos/sin of the last (positions, inv_freq) pairs: every layer of a step rotates at the
        # same positions, so the tables are computed once per step and rope type
        self._rope_tables: list = []

    # ------------------------------------------------------------------ weights
    def prepare_linear(self, w, dtype: torch.dtype):
        """Bring a stored weight (float tensor or QuantizedWeight) into the form `linear` uses."""
        if isinstance(w, quant.QuantizedWeight):
            return w.dequantize(acc(dtype)).to(device=self.device, dtype=dtype)
        return w.to(device=self.device, dtype=dtype)

    def prepare_experts(self, w1s: list, w3s: list, w2s: list, dtype: torch.dtype):
        """Per-expert stored weights -> (W13 [E, 2I, D] with W1 rows then W3 rows, W2 [E, D, I])."""
        p = lambda w: self.prepare_linear(w, dtype)  # noqa: E731
        return (torch.stack([torch.cat([p(a), p(b)]) for a, b in zip(w1s, w3s)]), torch.stack([p(c) for c in w2s]))

    # ------------------------------------------------------------------ basic
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """`w * x / sqrt(mean(x^2) + eps)` over the last dim; weight None = unweighted."""
        a = acc(x.dtype)
        xf = _as(x, a)
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        if weight is not None:
            y = _as(weight, a) * y
        return _as(y, x.dtype)

    def rope(
        self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False
    ) -> torch.Tensor:
        """Interleaved rotary embedding on the LAST 2*len(inv_freq) dims of x.

        x: [T, ..., d]; positions: [T]. Pairs (2i, 2i+1) of the rope slice rotate by
        positions * inv_freq[i] (by the negative angle when inverse).
        """
        r = 2 * inv_freq.numel()
        a = acc(x.dtype)
        cos, sin = self._rope_table(positions, inv_freq, a)
        if inverse:
            sin = -sin
        shape = [x.shape[0]] + [1] * (x.dim() - 2) + [r // 2]
        cos, sin = cos.view(shape), sin.view(shape)
        rot = _as(x[..., -r:], a)
        even, odd = rot[..., 0::2], rot[..., 1::2]
        out = x.clone()
        out[..., -r:] = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
        return out

    def _rope_table(self, positions, inv_freq, a):
        for pos, inv, dt, cos, sin in self._rope_tables:
            if pos is positions and inv is inv_freq and dt == a:
                return cos, sin
        ang = _as(positions, a)[:, None] * _as(inv_freq, a)[None, :]  # [T, r/2]
        cos, sin = ang.cos(), ang.sin()
        # keep references to the keys so their ids cannot be reused while cached
        self._rope_tables = ([(positions, inv_freq, a, cos, sin)] + self._rope_tables)[:4]
        return cos, sin

    def linear(self, x: torch.Tensor, w: torch.Tensor, act_quant: bool = False) -> torch.Tensor:
        """y = x W^T with W prepared by `prepare_linear`; act_quant = FP8 activations (exact mode)."""
        if act_quant:
            x = quant.act_quant_fp8(x)
        return F.linear(_as(x, w.dtype), w)

    def grouped_out_proj(self, o: torch.Tensor, wo_a: torch.Tensor, wo_b: torch.Tensor, groups: int,
                         act_quant: bool = False) -> torch.Tensor:
        """o: [T, H*d]. Head group g (contiguous heads) -> wo_a[g] (rank R) -> concat -> wo_b."""
        T = o.shape[0]
        og = _as(o, wo_a.dtype).view(T, groups, -1).transpose(0, 1)  # [G, T, H*d/G]
        wa = wo_a.view(groups, -1, og.shape[-1])  # [G, R, H*d/G]
        z = torch.bmm(og, wa.transpose(1, 2)).transpose(0, 1).reshape(T, -1)
        return self.linear(z, wo_b, act_quant)

    # ------------------------------------------------------------------ mHC
    def _hc_mix(self, X: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
        a = acc(X.dtype)
        flat = _as(X.reshape(X.shape[0], -1), a)
        flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
        return flat @ _as(fn, a).t()

    def hc_pre(self, X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
               sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        """mHC entry. X: [T, n, D] -> (u [T, D], post [T, n], comb [T, n, n]) (spec §2.2)."""
        n = X.shape[1]
        a = acc(X.dtype)
        m = self._hc_mix(X, fn, norm_eps)
        base, scale = _as(base, a), _as(scale, a)
        pre = torch.sigmoid(m[:, :n] * scale[0] + base[:n]) + hc_eps
        post = 2 * torch.sigmoid(m[:, n:2 * n] * scale[1] + base[n:2 * n])
        logits = (m[:, 2 * n:] * scale[2] + base[2 * n:]).view(-1, n, n)
        comb = _sinkhorn(torch.softmax(logits, dim=-1) + hc_eps, sinkhorn_iters, hc_eps)
        u = _as(torch.bmm(pre.unsqueeze(1), _as(X, a)).squeeze(1), X.dtype)
        return u, post, comb

    def hc_post(self, y: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """X'_k = post_k * y + sum_j comb[j, k] X_j  (streams mix through comb transposed)."""
        a = acc(X.dtype)
        mixed = torch.bmm(_as(comb, a).transpose(1, 2), _as(X, a))
        return _as(torch.baddbmm(mixed, _as(post, a).unsqueeze(-1), _as(y, a).unsqueeze(1)), X.dtype)

    def hc_head(self, X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                hc_eps: float, norm_eps: float) -> torch.Tensor:
        a = acc(X.dtype)
        m = self._hc_mix(X, fn, norm_eps)
        pre = torch.sigmoid(m * _as(scale, a)[0] + _as(base, a)) + hc_eps
        return _as(torch.bmm(pre.unsqueeze(1), _as(X, a)).squeeze(1), X.dtype)

    # ------------------------------------------------------------------ compression
    def compress(self, kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, spec: CompressSpec,
                 norm_weight: torch.Tensor, inv_freq: torch.Tensor,
                 state_kv: torch.Tensor, state_score: torch.Tensor,
                 pool: torch.Tensor, block_table: torch.Tensor,
                 seqs) -> torch.Tensor:
        """Fold new tokens into per-sequence compressor state; emit every entry whose window closed.

        kv, score: [T, k*c] projections of the packed new tokens (k = 2 if overlap else 1), in acc dtype.
        ape: [m, k*c] positional bias added to score by position mod m.
        state_kv/state_score: [slots, k*m, k*c] per-sequence state. Rows [0, m) hold the current
          window's tokens so far (overlap: rows [m, 2m) hold them and rows [0, m) the previous,
          complete window, whose first channel half feeds the next entry).
        pool: [blocks, block_size, c] entry pool; block_table: [slots, max_blocks] int32.
        seqs: per batch row (slot, start_pos, n_new, token_offset), or a `DecodeRows` (one token per row).
        Returns the new entries packed in batch order [E, c] (for inspection; the pool is updated);
        for `DecodeRows` [B, c] instead: row b is the entry row b closed, zeros where none closed.
        """
        if isinstance(seqs, DecodeRows):
            return compress_rows_on_host(self.compress, kv, score, ape, spec, norm_weight, inv_freq, state_kv,
                                         state_score, pool, block_table, seqs)
        m, c = spec.ratio, spec.dim
        cur = m if spec.overlap else 0  # first state row of the current window
        emitted = []
        # Tokens whose window stays open only join their sequence's state (most decode tokens): one
        # indexed write for all of them. Sequences that close a window go through the loop below.
        self._join_open_windows(kv, score, ape, m, cur, state_kv, state_score, seqs)
        for slot, start, n, off in seqs:
            if start % m + n < m:  # (n == 0 included) done above: no window closes
                continue
            entries = self._compress_sequence(kv, score, ape, spec, norm_weight, inv_freq, state_kv, state_score,
                                              pool, block_table, slot, start, n, off)
            if entries is not None:
                emitted.append(entries)
        if not emitted:
            return pool.new_zeros((0, c))
        return torch.cat(emitted)

    @staticmethod
    def _join_open_windows(kv, score, ape, m: int, cur: int, state_kv, state_score, seqs) -> None:
        """Write the tokens of every sequence whose window stays open into its state, in one indexed write."""
        joining = [
            (slot, start % m + j, off + j) for slot, start, n, off in seqs if start % m + n < m for j in range(n)
        ]
        if joining:
            slot_t, row_t, tok_t = torch.tensor(joining, device=kv.device).unbind(1)
            state_kv[slot_t, cur + row_t] = kv[tok_t]
            state_score[slot_t, cur + row_t] = score[tok_t] + ape[row_t].to(score.dtype)

    def _compress_sequence(self, kv, score, ape, spec: CompressSpec, norm_weight, inv_freq, state_kv, state_score,
                           pool, block_table, slot: int, start: int, n: int, off: int):
        """One sequence's n new tokens from `start`: pool and store every window they close, keep the
        rest in state. Returns the closed windows' entries [nwin, c], or None when none closed."""
        m, c = spec.ratio, spec.dim
        cur = m if spec.overlap else 0
        bs = pool.shape[1]
        pos = torch.arange(start, start + n, device=kv.device)
        z_new = score[off:off + n] + ape[pos % m].to(score.dtype)
        w0 = start // m
        have = start - w0 * m  # tokens of window w0 already in state
        toks_kv = torch.cat([state_kv[slot, cur:cur + have], kv[off:off + n]])
        toks_z = torch.cat([state_score[slot, cur:cur + have], z_new])
        nwin = (have + n) // m
        entries = None
        if nwin:
            wkv = toks_kv[: nwin * m].view(nwin, m, -1)
            wz = toks_z[: nwin * m].view(nwin, m, -1)
            cand_kv, cand_z = self._window_candidates(wkv, wz, spec, state_kv, state_score, slot, w0)
            pooled = (cand_kv * torch.softmax(cand_z, dim=1)).sum(1)  # [nwin, c]
            widx = torch.arange(w0, w0 + nwin, device=kv.device)
            entries = self._finish_entries(pooled, widx * m, spec, norm_weight, inv_freq, pool.dtype)
            phys = block_table[slot, widx // bs].long() * bs + widx % bs
            pool.view(-1, c)[phys] = entries
            if spec.overlap:
                state_kv[slot, :m] = wkv[-1]
                state_score[slot, :m] = wz[-1]
        left = (have + n) - nwin * m
        state_kv[slot, cur:cur + left] = toks_kv[nwin * m:]
        state_score[slot, cur:cur + left] = toks_z[nwin * m:]
        return entries

    @staticmethod
    def _window_candidates(wkv, wz, spec: CompressSpec, state_kv, state_score, slot: int, w0: int):
        """The candidates each closed window's entry pools ([nwin, m or 2m, c] values and scores)."""
        if not spec.overlap:
            return wkv, wz
        m, c = spec.ratio, spec.dim
        # Entry w pools 2m candidates per channel: first half of window w-1, second half of w.
        prev_kv = torch.cat([state_kv[slot, None, :m, :c], wkv[:-1, :, :c]])
        prev_z = torch.cat([state_score[slot, None, :m, :c], wz[:-1, :, :c]])
        if w0 == 0:  # window -1 does not exist: its candidates get zero weight
            prev_z[0] = float("-inf")
        cand_kv = torch.cat([prev_kv, wkv[:, :, c:]], dim=1)
        cand_z = torch.cat([prev_z, wz[:, :, c:]], dim=1)
        return cand_kv, cand_z

    def _finish_entries(self, pooled, positions, spec: CompressSpec, norm_weight, inv_freq, out_dtype):
        """norm -> rope at the window's first position -> fake quant (exact mode)."""
        y = self.rms_norm(pooled.to(out_dtype), norm_weight, spec.eps)
        y = self.rope(y, positions, inv_freq)
        if spec.quant == "fp8":
            y = quant.kv_fake_quant_fp8(y, spec.rope_dim)
        elif spec.quant == "fp4":
            y = quant.fp4_fake_quant(quant.hadamard(y))
        return y

    # ------------------------------------------------------------------ indexer
    def indexer_topk(self, q: torch.Tensor, weights: torch.Tensor, k_pool: torch.Tensor,
                     block_table: torch.Tensor, tok_slot: torch.Tensor, positions: torch.Tensor,
                     ratio: int, topk: int, max_visible: int | None = None) -> torch.Tensor:
        """Top-k compressed entries per query by `sum_h w_h relu(q_h . k_s)`.

        q: [T, H, d]; weights: [T, H] (already scaled); k_pool: [blocks, block, d]; tok_slot: [T]
        cache slot of each token; positions: [T]. Entry s is visible to the query at position t
        iff s < (t + 1) // ratio. Returns int32 [T, topk] logical entry ids, best first, -1 where
        fewer exist. max_visible: the caller's host-side bound on (t + 1) // ratio, which lets a
        kernel size its work without reading positions back (a decode step captured in a CUDA
        graph passes the cache's capacity); here it is only checked.
        """
        T, d = q.shape[0], q.shape[-1]
        out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
        nvis = (positions + 1) // ratio  # [T]
        most = int(nvis.max()) if T else 0
        if max_visible is not None and most > max_visible:
            raise ValueError(f"indexer_topk: a query sees {most} entries, more than max_visible={max_visible}")
        if most == 0:
            return out
        bs = k_pool.shape[1]
        a = acc(q.dtype)
        flat = k_pool.view(-1, d)
        step = max(1, (1 << 22) // (most * d))  # queries per chunk: their keys [t, S, d] stay within 4M elements
        for s in range(0, T, step):
            e = min(T, s + step)
            S = int(nvis[s:e].max())
            if S == 0:
                continue
            ent = torch.arange(S, device=q.device)
            # each query's own sequence's keys, through its block table (rows past its visible count are masked)
            keys = flat[block_table[tok_slot[s:e, None], ent // bs].long() * bs + ent % bs].to(a)  # [t, S, d]
            scores = torch.relu(torch.einsum("thd,tsd->ths", q[s:e].to(a), keys))
            scores = (scores * weights[s:e].to(a).unsqueeze(-1)).sum(1)  # [t, S]
            scores = scores.masked_fill(ent[None, :] >= nvis[s:e, None], float("-inf"))
            k = min(topk, S)
            idx = topk_lowest_first(scores, k)
            out[s:e, :k] = torch.where(idx < nvis[s:e, None], idx, -1).to(torch.int32)
        return out

    # ------------------------------------------------------------------ attention
    def attention(self, q: torch.Tensor, window_kv: torch.Tensor, window_idx: torch.Tensor,
                  comp_kv: torch.Tensor | None, comp_idx: torch.Tensor | None,
                  sink: torch.Tensor, scale: float, chunk: int = 64) -> torch.Tensor:
        """Sparse MQA with a sink: each query attends to the rows its indices name.

        q: [T, H, d]; window_kv: [Nw, d] rows (one K=V head); window_idx: [T, Kw] int32;
        comp_kv: [Nc, d]; comp_idx: [T, Kc] int32 (None or Kc = 0 for sliding layers).
        -1 indices are ignored. o_h = sum_s e^{l_hs} v_s / (sum_s e^{l_hs} + e^{sink_h}),
        l_hs = scale * q_h . k_s; scores and softmax in acc dtype, output in q's dtype.
        """
        T, H, d = q.shape
        a = acc(q.dtype)
        out = torch.empty_like(q)
        sink = _as(sink, a).view(1, H, 1)
        for s, e, one_run in _chunks(window_idx, chunk):
            parts = [(window_idx[s:e], window_kv)]
            if comp_idx is not None and comp_idx.shape[1] > 0:
                parts.append((comp_idx[s:e], comp_kv))
            out[s:e] = self._attend_chunk(q[s:e], parts, sink, scale, a, may_share=one_run)
        return out

    def _attend_chunk(self, q, parts, sink, scale, a, may_share: bool = True):
        """One chunk of queries [t, H, d] over the rows each names in `parts` [(idx [t, K], kv [N, d])].

        Queries of one prompt name mostly the same rows (neighbouring windows, shared entries): then
        the chunk scores the union of its rows once, each query weighted by how often it names each
        row (0: masked; a row named twice counts twice, as in the gathered form), instead of
        gathering a copy of K rows per query. A chunk of decode tokens from different sequences
        shares nothing, and gathers. Both compute the same sums."""
        keys, named = [], []
        union = sum(int(torch.unique(idx).numel()) for idx, _ in parts) if may_share and q.shape[0] > 1 else None
        if union is not None and 4 * union <= q.shape[0] * sum(idx.shape[1] for idx, _ in parts):  # saves 4x the rows
            for idx, src in parts:
                rows, inv = torch.unique(idx.clamp(min=0), return_inverse=True)  # rows [U], inv [t, K]
                times = torch.zeros(idx.shape[0], rows.numel() + 1, dtype=a, device=idx.device)
                times.scatter_add_(1, inv.masked_fill(idx < 0, rows.numel()), torch.ones_like(inv, dtype=a))
                keys.append(src[rows])
                named.append(times[:, :-1])  # (-1 landed in the spare last column)
            k, times = _as(torch.cat(keys), a), torch.cat(named, 1)  # [U, d], [t, U]
            # e^{l + log n} = n e^{l}: a row named n times weighs n times; log 1 = 0 leaves the rest exact
            logits = torch.einsum("thd,ud->thu", _as(q, a), k) * scale + torch.log(times)[:, None, :]
            p = self._softmax_with_sink(logits, times > 0, sink)
            return _as(torch.einsum("thu,ud->thd", p, k), q.dtype)
        for idx, src in parts:
            keys.append(src[idx.clamp(min=0).long()])  # [t, K, d]
            named.append(idx >= 0)
        k, ok = _as(torch.cat(keys, 1), a), torch.cat(named, 1)
        logits = torch.bmm(_as(q, a), k.transpose(1, 2)) * scale  # [t, H, K]
        p = self._softmax_with_sink(logits, ok, sink)
        return _as(torch.bmm(p, k), q.dtype)

    @staticmethod
    def _softmax_with_sink(logits, ok, sink):
        """softmax over [logits (masked to `ok`), sink], the sink's column dropped: [t, H, K]."""
        logits = logits.masked_fill(~ok[:, None, :], float("-inf"))
        sink_col = sink.expand(logits.shape[0], -1, 1)
        return torch.softmax(torch.cat([logits, sink_col], -1), dim=-1)[..., :-1]

    # ------------------------------------------------------------------ MoE
    def moe_gate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 tid2eid: torch.Tensor | None, token_ids: torch.Tensor | None, topk: int, route_scale: float):
        """sqrt(softplus) scores; experts by hash table (tid2eid) or top-k of score + bias.

        Returns (weights [T, k] acc dtype, expert ids [T, k] int32). Weights are the selected raw
        scores renormalised to sum 1, times route_scale; the bias only steers selection.
        """
        a = acc(x.dtype)
        s = torch.sqrt(F.softplus(x.to(a) @ weight.to(a).t()))
        if tid2eid is not None:
            ids = tid2eid[token_ids].long()
        else:
            ids = topk_lowest_first(s + bias.to(a), topk)
        g = s.gather(1, ids)
        g = g / g.sum(-1, keepdim=True) * route_scale
        return g, ids.to(torch.int32)

    def _swiglu(self, x, w13, limit, a):
        """silu(min(x W1^T, L)) * clamp(x W3^T, -L, L) with W13 = [W1; W3] stacked by rows."""
        h1, h3 = _as(x @ w13.t(), a).chunk(2, dim=-1)
        return F.silu(h1.clamp(max=limit)) * h3.clamp(min=-limit, max=limit)

    # the grouped form pads every expert to the busiest one's token count: a few dozen torch calls
    # per layer instead of ~14 per expert, for batches that keep most experts busy
    GROUPED_MOE_ELEMENTS = 1 << 24
    GROUPED_MOE_BUSY = 0.5  # share of the experts that must be busy (the grouped form reads them all)

    def _experts_grouped(self, xin, y, flat, order, counts, width, route_w, k, w13, w2, limit, act_quant):
        """All experts in two batched matmuls over [E, width, .] buffers, rows past an expert's
        count zero (and dropped again before the sum)."""
        a = y.dtype
        expert = flat[order]  # [P] expert of each pair, grouped
        row = (
            torch.arange(order.numel(), device=y.device) - (torch.cumsum(counts, 0) - counts)[expert]
        )  # [P] row within it
        E = w13.shape[0]
        tok = order // k
        xe = torch.zeros(E, width, xin.shape[1], dtype=w13.dtype, device=y.device)
        xe[expert, row] = _as(xin[tok], w13.dtype)
        h1, h3 = _as(torch.bmm(xe, w13.transpose(1, 2)), a).chunk(2, dim=-1)  # [E, width, I] each
        rw = torch.zeros(E, width, 1, dtype=a, device=y.device)
        rw[expert, row] = _as(route_w[order], a).unsqueeze(-1)
        h = _as(F.silu(h1.clamp(max=limit)) * h3.clamp(min=-limit, max=limit) * rw, xin.dtype)
        if act_quant:
            h = quant.act_quant_fp8(h)
        out = torch.bmm(_as(h, w2.dtype), w2.transpose(1, 2))  # [E, width, D]
        y.index_add_(0, tok, _as(out[expert, row], a))

    def _experts_looped(self, xin, y, order, counts, route_w, k, w13, w2, limit, act_quant):
        """One expert at a time: for batches whose padded buffers would be large."""
        a = y.dtype
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start:start + n]
            start += n
            tok = pairs // k
            h = self._swiglu(_as(xin[tok], w13.dtype), w13[e], limit, a) * _as(route_w[pairs], a).unsqueeze(-1)
            h = _as(h, xin.dtype)
            if act_quant:
                h = quant.act_quant_fp8(h)
            y.index_add_(0, tok, _as(_as(h, w2.dtype) @ w2[e].t(), a))

    def moe_experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    w13: torch.Tensor, w2: torch.Tensor, shared: tuple | None, limit: float,
                    act_quant: bool = False) -> torch.Tensor:
        """Routed experts (clamped SwiGLU, routing weight applied before W2) plus the shared expert.

        x: [T, D]; ids/weights: [T, k]; w13: [E, 2I, D] (W1 rows, then W3 rows); w2: [E, D, I];
        shared: (w13 [2I, D], w2 [D, I]) or None. Output in x's dtype, summed in acc dtype.
        """
        a = acc(x.dtype)
        k = ids.shape[1]
        xin = quant.act_quant_fp8(x) if act_quant else x
        y = torch.zeros(x.shape[0], w2.shape[1], dtype=a, device=x.device)
        flat = ids.reshape(-1).long()
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=w13.shape[0])
        route_w = weights.reshape(-1)
        if flat.numel():
            width, used = int(counts.max()), int((counts > 0).sum())
            E = w13.shape[0]
            # grouped when most experts are busy (it reads every expert's weights) and the buffers are small
            if (
                used >= self.GROUPED_MOE_BUSY * E
                and E * width * max(w13.shape[1], w2.shape[1]) <= self.GROUPED_MOE_ELEMENTS
            ):
                self._experts_grouped(xin, y, flat, order, counts, width, route_w, k, w13, w2, limit, act_quant)
            else:
                self._experts_looped(xin, y, order, counts.tolist(), route_w, k, w13, w2, limit, act_quant)
        if shared is not None:
            s13, s2 = shared
            h = _as(self._swiglu(_as(xin, s13.dtype), s13, limit, a), x.dtype)
            if act_quant:
                h = quant.act_quant_fp8(h)
            y += _as(_as(h, s2.dtype) @ s2.t(), a)
        return _as(y, x.dtype)
