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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from v4 import quant


def acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class CompressSpec:
    """Static description of one compressor instance."""

    ratio: int  # m: tokens per entry
    dim: int  # c: entry width
    overlap: bool  # CSA-style: entry w pools windows w-1 (first half) and w (second half)
    quant: str  # "none" | "fp8" (main, nope dims) | "fp4" (indexer: Hadamard + FP4)
    rope_dim: int
    eps: float


class ReferenceOps:
    name = "reference"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    # ------------------------------------------------------------------ weights
    def prepare_linear(self, w, dtype: torch.dtype):
        """Bring a stored weight (float tensor or QuantizedWeight) into the form `linear` uses."""
        if isinstance(w, quant.QuantizedWeight):
            return w.dequantize(acc(dtype)).to(device=self.device, dtype=dtype)
        return w.to(device=self.device, dtype=dtype)

    # ------------------------------------------------------------------ basic
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """`w * x / sqrt(mean(x^2) + eps)` over the last dim; weight None = unweighted."""
        a = acc(x.dtype)
        xf = x.to(a)
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        if weight is not None:
            y = weight.to(a) * y
        return y.to(x.dtype)

    def rope(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Interleaved rotary embedding on the LAST 2*len(inv_freq) dims of x.

        x: [T, ..., d]; positions: [T]. Pairs (2i, 2i+1) of the rope slice rotate by
        positions * inv_freq[i] (by the negative angle when inverse).
        """
        r = 2 * inv_freq.numel()
        a = acc(x.dtype)
        ang = positions.to(a)[:, None] * inv_freq.to(a)[None, :]  # [T, r/2]
        if inverse:
            ang = -ang
        shape = [x.shape[0]] + [1] * (x.dim() - 2) + [r // 2]
        cos, sin = ang.cos().view(shape), ang.sin().view(shape)
        nope, rot = x[..., :-r], x[..., -r:].to(a)
        even, odd = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
        return torch.cat([nope, out.to(x.dtype)], dim=-1)

    def linear(self, x: torch.Tensor, w: torch.Tensor, act_quant: bool = False) -> torch.Tensor:
        """y = x W^T with W prepared by `prepare_linear`; act_quant = FP8 activations (exact mode)."""
        if act_quant:
            x = quant.act_quant_fp8(x)
        return F.linear(x.to(w.dtype), w)

    def grouped_out_proj(self, o: torch.Tensor, wo_a: torch.Tensor, wo_b: torch.Tensor, groups: int,
                         act_quant: bool = False) -> torch.Tensor:
        """o: [T, H*d]. Head group g (contiguous heads) -> wo_a[g] (rank R) -> concat -> wo_b."""
        T = o.shape[0]
        og = o.view(T, groups, -1)
        wa = wo_a.view(groups, -1, og.shape[-1])  # [G, R, H*d/G]
        z = torch.einsum("tgi,gri->tgr", og.to(wa.dtype), wa).reshape(T, -1)
        return self.linear(z, wo_b, act_quant)

    # ------------------------------------------------------------------ mHC
    def _hc_mix(self, X: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
        a = acc(X.dtype)
        flat = X.reshape(X.shape[0], -1).to(a)
        flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
        return flat @ fn.to(a).t()

    def hc_pre(self, X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
               sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        """mHC entry. X: [T, n, D] -> (u [T, D], post [T, n], comb [T, n, n]) (spec §2.2)."""
        n = X.shape[1]
        a = acc(X.dtype)
        m = self._hc_mix(X, fn, norm_eps)
        base, scale = base.to(a), scale.to(a)
        pre = torch.sigmoid(m[:, :n] * scale[0] + base[:n]) + hc_eps
        post = 2 * torch.sigmoid(m[:, n:2 * n] * scale[1] + base[n:2 * n])
        logits = (m[:, 2 * n:] * scale[2] + base[2 * n:]).view(-1, n, n)
        comb = torch.softmax(logits, dim=-1) + hc_eps
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
        for _ in range(sinkhorn_iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
            comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
        u = (pre.unsqueeze(-1) * X.to(a)).sum(1).to(X.dtype)
        return u, post, comb

    def hc_post(self, y: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """X'_k = post_k * y + sum_j comb[j, k] X_j  (streams mix through comb transposed)."""
        a = acc(X.dtype)
        mixed = torch.einsum("tjk,tjd->tkd", comb.to(a), X.to(a))
        return (post.to(a).unsqueeze(-1) * y.to(a).unsqueeze(1) + mixed).to(X.dtype)

    def hc_head(self, X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                hc_eps: float, norm_eps: float) -> torch.Tensor:
        a = acc(X.dtype)
        m = self._hc_mix(X, fn, norm_eps)
        pre = torch.sigmoid(m * scale.to(a)[0] + base.to(a)) + hc_eps
        return (pre.unsqueeze(-1) * X.to(a)).sum(1).to(X.dtype)

    # ------------------------------------------------------------------ compression
    def compress(self, kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, spec: CompressSpec,
                 norm_weight: torch.Tensor, inv_freq: torch.Tensor,
                 state_kv: torch.Tensor, state_score: torch.Tensor,
                 pool: torch.Tensor, block_table: torch.Tensor,
                 seqs: list) -> torch.Tensor:
        """Fold new tokens into per-sequence compressor state; emit every entry whose window closed.

        kv, score: [T, k*c] projections of the packed new tokens (k = 2 if overlap else 1), in acc dtype.
        ape: [m, k*c] positional bias added to score by position mod m.
        state_kv/state_score: [slots, k*m, k*c] per-sequence state. Rows [0, m) hold the current
          window's tokens so far (overlap: rows [m, 2m) hold them and rows [0, m) the previous,
          complete window, whose first channel half feeds the next entry).
        pool: [blocks, block_size, c] entry pool; block_table: [slots, max_blocks] int32.
        seqs: per batch row (slot, start_pos, n_new, token_offset).
        Returns the new entries packed in batch order [E, c] (for inspection; the pool is updated).
        """
        m, c = spec.ratio, spec.dim
        cur = m if spec.overlap else 0  # first state row of the current window
        bs = pool.shape[1]
        emitted = []
        for slot, start, n, off in seqs:
            if n == 0:
                continue
            pos = torch.arange(start, start + n, device=kv.device)
            z_new = score[off:off + n] + ape[pos % m].to(score.dtype)
            w0 = start // m
            have = start - w0 * m  # tokens of window w0 already in state
            toks_kv = torch.cat([state_kv[slot, cur:cur + have], kv[off:off + n]])
            toks_z = torch.cat([state_score[slot, cur:cur + have], z_new])
            nwin = (have + n) // m
            if nwin:
                wkv = toks_kv[: nwin * m].view(nwin, m, -1)
                wz = toks_z[: nwin * m].view(nwin, m, -1)
                if spec.overlap:
                    # Entry w pools 2m candidates per channel: first half of window w-1, second half of w.
                    prev_kv = torch.cat([state_kv[slot, None, :m, :c], wkv[:-1, :, :c]])
                    prev_z = torch.cat([state_score[slot, None, :m, :c], wz[:-1, :, :c]])
                    if w0 == 0:  # window -1 does not exist: its candidates get zero weight
                        prev_z[0] = float("-inf")
                    cand_kv = torch.cat([prev_kv, wkv[:, :, c:]], dim=1)
                    cand_z = torch.cat([prev_z, wz[:, :, c:]], dim=1)
                else:
                    cand_kv, cand_z = wkv, wz
                pooled = (cand_kv * torch.softmax(cand_z, dim=1)).sum(1)  # [nwin, c]
                widx = torch.arange(w0, w0 + nwin, device=kv.device)
                entries = self._finish_entries(pooled, widx * m, spec, norm_weight, inv_freq, pool.dtype)
                phys = block_table[slot, widx // bs].long() * bs + widx % bs
                pool.view(-1, c)[phys] = entries
                emitted.append(entries)
                if spec.overlap:
                    state_kv[slot, :m] = wkv[-1]
                    state_score[slot, :m] = wz[-1]
            left = (have + n) - nwin * m
            state_kv[slot, cur:cur + left] = toks_kv[nwin * m:]
            state_score[slot, cur:cur + left] = toks_z[nwin * m:]
        if not emitted:
            return pool.new_zeros((0, c))
        return torch.cat(emitted)

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
                     ratio: int, topk: int) -> torch.Tensor:
        """Top-k compressed entries per query by `sum_h w_h relu(q_h . k_s)`.

        q: [T, H, d]; weights: [T, H] (already scaled); k_pool: [blocks, block, d]; tok_slot: [T]
        cache slot of each token; positions: [T]. Entry s is visible to the query at position t
        iff s < (t + 1) // ratio. Returns int32 [T, topk] logical entry ids, -1 where fewer exist.
        """
        T = q.shape[0]
        out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
        if T == 0:
            return out
        nvis = (positions + 1) // ratio  # [T]
        bs = k_pool.shape[1]
        a = acc(q.dtype)
        flat = k_pool.view(-1, k_pool.shape[-1])
        for slot in tok_slot.unique().tolist():
            rows = (tok_slot == slot).nonzero().squeeze(1)
            n_ent = int(nvis[rows].max())
            if n_ent == 0:
                continue
            ent = torch.arange(n_ent, device=q.device)
            keys = flat[block_table[slot, ent // bs].long() * bs + ent % bs].to(a)  # [S, d]
            scores = torch.relu(torch.einsum("thd,sd->ths", q[rows].to(a), keys))
            scores = (scores * weights[rows].to(a).unsqueeze(-1)).sum(1)  # [t, S]
            scores = scores.masked_fill(ent[None, :] >= nvis[rows, None], float("-inf"))
            k = min(topk, n_ent)
            idx = scores.topk(k, dim=-1).indices
            idx = torch.where(idx < nvis[rows, None], idx, torch.full_like(idx, -1))
            out[rows, :k] = idx.to(torch.int32)
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
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            idx_parts, kv_parts = [window_idx[s:e]], [window_kv]
            if comp_idx is not None and comp_idx.shape[1] > 0:
                idx_parts.append(comp_idx[s:e])
                kv_parts.append(comp_kv)
            keys, valid = [], []
            for idx, src in zip(idx_parts, kv_parts):
                keys.append(src[idx.clamp(min=0).long()])  # [t, K, d]
                valid.append(idx >= 0)
            k = torch.cat(keys, 1).to(a)
            ok = torch.cat(valid, 1)
            logits = torch.einsum("thd,tkd->thk", q[s:e].to(a), k) * scale
            logits = logits.masked_fill(~ok[:, None, :], float("-inf"))
            sink_col = sink.to(a).view(1, H, 1).expand(e - s, H, 1)
            p = torch.softmax(torch.cat([logits, sink_col], -1), dim=-1)[..., :-1]
            out[s:e] = torch.einsum("thk,tkd->thd", p, k).to(q.dtype)
        return out

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
            ids = (s + bias.to(a)).topk(topk, dim=-1).indices
        g = s.gather(1, ids)
        g = g / g.sum(-1, keepdim=True) * route_scale
        return g, ids.to(torch.int32)

    def _swiglu(self, x, w1, w3, limit, a):
        h1 = (x @ w1.t()).to(a).clamp(max=limit)
        h3 = (x @ w3.t()).to(a).clamp(min=-limit, max=limit)
        return F.silu(h1) * h3

    def moe_experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                    shared: tuple | None, limit: float, act_quant: bool = False) -> torch.Tensor:
        """Routed experts (clamped SwiGLU, routing weight applied before W2) plus the shared expert.

        x: [T, D]; ids/weights: [T, k]; w1, w3: [E, I, D]; w2: [E, D, I]; shared: (w1, w2, w3) or None.
        """
        a = acc(x.dtype)
        xin = quant.act_quant_fp8(x) if act_quant else x
        y = torch.zeros(x.shape[0], w2.shape[1], dtype=a, device=x.device)
        flat_ids = ids.long().view(-1)
        for e in flat_ids.unique().tolist():
            tok, kk = (ids.long() == e).nonzero(as_tuple=True)
            xe = xin[tok].to(w1.dtype)
            h = self._swiglu(xe, w1[e], w3[e], limit, a) * weights[tok, kk].to(a).unsqueeze(-1)
            h = h.to(x.dtype)
            if act_quant:
                h = quant.act_quant_fp8(h)
            y.index_add_(0, tok, (h.to(w2.dtype) @ w2[e].t()).to(a))
        if shared is not None:
            s1, s2, s3 = shared
            h = self._swiglu(xin.to(s1.dtype), s1, s3, limit, a).to(x.dtype)
            if act_quant:
                h = quant.act_quant_fp8(h)
            y = y + (h.to(s2.dtype) @ s2.t()).to(a)
        return y.to(x.dtype)
