"""Expert-parallel MoE: tokens go to the ranks that hold their experts and come back weighted.

Each EP rank holds a contiguous range of routed experts (`RankPlacement.experts`). Routing runs
replicated (same gate, same bits on every rank of a TP group), then:

1. Share: the ranks of one TP group hold the same tokens, so each takes its own near-equal
   slice of the rows (none are sent twice); without TP a rank sends all of its tokens.
2. Dispatch: each (token, slot) pair goes to the rank of its expert. `alltoall` sends exactly
   those rows with `all_to_all_single` and uneven splits (counts first); `allgather` gathers
   every rank's rows (padded to the largest share) and lets each rank pick the pairs of its
   experts: more bytes, but only all-gather and reduce-scatter, the path that needs no counts.
3. Compute: the backend's `moe_experts` over the received pairs, one expert per row (k = 1),
   with the pair's routing weight applied before W2 as always.
4. Combine: the weighted rows go back (all-to-all, or reduce-scatter) in float32 (float64 for
   float64 runs) and are summed per token with the shared expert, then cast once, as the
   single-device MoE does; a TP group all-reduces its shares back into whole tokens.

A communicator with MC2's call shape (the Ascend one: `moe_distribute_dispatch` / `_combine`)
takes steps 2-4 itself while `mc2_applies` (few tokens per rank); the numbers are the same.

Hash-routed layers dispatch the same way: only their gate differs.
A DP group with no tokens still calls `exchange` with none (`dummy`), so every rank takes part
in every layer's collectives.
"""

from __future__ import annotations

import torch

from ..ops import acc
from .comm import Communicator
from .parallel import RankPlacement, split_range


class ExpertParallelMoE:
    def __init__(self, ops, comm: Communicator, place: RankPlacement, num_experts: int, method: str = "alltoall"):
        if method not in ("alltoall", "allgather"):
            raise ValueError(f"runtime.moe_comm must be alltoall or allgather, got {method!r}")
        self.ops, self.comm, self.place, self.method = ops, comm, place, method
        self.per_rank = num_experts // place.layout.ep_size
        self.first = place.experts[0]

    def __call__(self, x, ids, weights, w13, w2, shared, limit, act_quant):
        """x [T, D] (the same on every rank of the TP group), ids / weights [T, k] -> [T, D] in x's dtype."""
        T = x.shape[0]
        t0, t1 = split_range(T, self.comm.tp_size, self.comm.tp_rank)
        a = acc(x.dtype)
        y = torch.zeros(T, x.shape[1], dtype=a, device=x.device)
        y[t0:t1] = self.exchange(x[t0:t1], ids[t0:t1], weights[t0:t1], w13, w2, limit, act_quant)
        if shared is not None:  # replicated: each rank adds it for its own share
            y[t0:t1] += self.ops.moe_experts(x[t0:t1].to(a), ids[t0:t1, :0], weights[t0:t1, :0], w13, w2, shared,
                                             limit, act_quant)
        return self.comm.tp_all_reduce(y).to(x.dtype)

    def dummy(self, x_like: torch.Tensor, k: int, w13, w2, limit, act_quant) -> None:
        """This rank has no tokens this step but the other ranks' may need its experts."""
        empty = x_like.new_zeros(0, x_like.shape[-1])
        self.exchange(empty, torch.zeros(0, k, dtype=torch.int32, device=x_like.device),
                      torch.zeros(0, k, dtype=acc(x_like.dtype), device=x_like.device), w13, w2, limit, act_quant)

    # ------------------------------------------------------------------ one layer's exchange
    def exchange(self, x, ids, weights, w13, w2, limit, act_quant) -> torch.Tensor:
        """This rank's tokens x [t, D] -> the sum of their routed experts' weighted outputs [t, D] (acc dtype)."""
        if self.method == "allgather":
            return self._by_gather(x, ids, weights, w13, w2, limit, act_quant)
        if hasattr(self.comm, "moe_distribute_dispatch") and self.comm.mc2_applies(x.shape[0]):
            return self._by_mc2(x, ids, weights, w13, w2, limit, act_quant)
        return self._by_all_to_all(x, ids, weights, w13, w2, limit, act_quant)

    def _compute(self, rows, expert, weight, w13, w2, limit, act_quant):
        """rows [n, D] acc dtype, expert [n] global ids of this rank's experts -> weighted outputs [n, D] acc."""
        local = (expert - self.first).to(torch.int32).unsqueeze(1)
        return self.ops.moe_experts(rows, local, weight.unsqueeze(1), w13, w2, None, limit, act_quant)

    def _by_all_to_all(self, x, ids, weights, w13, w2, limit, act_quant):
        k, a = ids.shape[1], acc(x.dtype)
        flat = ids.reshape(-1).long()
        dest = flat // self.per_rank
        # pairs by expert id: grouped by destination rank too (experts are contiguous per rank), and
        # each token's k contributions come back in the order one device adds them (ascending expert)
        order = flat.argsort(stable=True)
        send = torch.bincount(dest, minlength=self.comm.ep_size).to(torch.int64)
        recv = self.comm.ep_exchange_counts(send)  # on x's device: NCCL and HCCL take no host tensors
        send_l, recv_l = send.tolist(), recv.tolist()
        rows = self.comm.ep_all_to_all(x[order // k], send_l, recv_l)
        # expert id and routing weight ride together in one acc-dtype tensor (ids are small integers: exact)
        meta = torch.stack([flat[order].to(a), weights.reshape(-1)[order].to(a)], dim=1)
        meta = self.comm.ep_all_to_all(meta, send_l, recv_l)
        out = self._compute(rows.to(a), meta[:, 0].long(), meta[:, 1], w13, w2, limit, act_quant)
        back = self.comm.ep_all_to_all(out, recv_l, send_l)  # [t*k, D] in `order`
        return torch.zeros(x.shape[0], x.shape[1], dtype=a, device=x.device).index_add_(0, order // k, back)

    def _by_mc2(self, x, ids, weights, w13, w2, limit, act_quant):
        """MC2's shape: dispatch hands back this rank's rows grouped by local expert, with their routing
        weights; the weights go in before W2 as in `_compute`, so the combine's scales are ones (exact)
        and it only sums each token's pairs in the acc dtype."""
        a = acc(x.dtype)
        d = self.comm.moe_distribute_dispatch(x, ids, self.per_rank * self.comm.ep_size, expert_scales=weights.to(a))
        local = torch.arange(self.per_rank, device=x.device).repeat_interleave(d.expert_token_nums)
        out = self._compute(d.expand_x.to(a), local + self.first, d.expand_scales, w13, w2, limit, act_quant)
        return self.comm.moe_distribute_combine(out, d.assist_info_for_combine, d.ep_recv_counts,
                                                torch.ones_like(weights, dtype=a))

    def _by_gather(self, x, ids, weights, w13, w2, limit, act_quant):
        k, a, n = ids.shape[1], acc(x.dtype), self.comm.ep_max(x.shape[0])
        pad = n - x.shape[0]
        xs = torch.cat([x.to(a), x.new_zeros(pad, x.shape[1], dtype=a)])
        ids_p = torch.cat([ids.long(), ids.new_full((pad, k), -1).long()])  # -1: a padding row, routed nowhere
        w_p = torch.cat([weights.to(a), weights.new_zeros(pad, k, dtype=a)])
        X = self.comm.ep_all_gather(xs)  # [ep*n, D]
        I, W = self.comm.ep_all_gather(ids_p), self.comm.ep_all_gather(w_p)  # [ep*n, k]
        e0 = self.first
        mine = (I >= e0) & (I < e0 + self.per_rank)
        tok, slot = mine.nonzero(as_tuple=True)
        out = self._compute(X[tok], I[tok, slot], W[tok, slot], w13, w2, limit, act_quant)
        Y = torch.zeros_like(X).index_add_(0, tok, out)
        return self.comm.ep_reduce_scatter(Y)[:x.shape[0]]
