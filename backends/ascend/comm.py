"""The Ascend backend's communicator: HCCL on NPUs, gloo when the backend runs emulated on CPU.

It is the plain `Communicator` (HCCL's world-size rule included) plus the call shape of MC2,
vllm-ascend's fused expert-parallel exchange (serving.md §4.3): `moe_distribute_dispatch`
sends each (token, slot) pair to the rank of its expert and hands back what this rank received
grouped by local expert; `moe_distribute_combine` sends the expert outputs back and sums them per
token with `expert_scales`. `ExpertParallelMoE` takes this path while `mc2_applies`: at most
`_MC2_TOKENS_PER_RANK_LIMIT` tokens on every EP rank (vllm-ascend's capacity); above that it
falls back to the inherited all-to-all, as vllm-ascend does.

What runs where (the process group's backend is `v4.dist.comm.process_group_backend(ops.device)`:
HCCL for `npu:N`, whose `import torch_npu` the backend's make_ops has done; gloo for the CPU):
- emulated (process group on gloo, the Ascend ops on CPU): dispatch and combine are written here
  with `all_to_all_single` (uneven splits), following the documented outputs (`expand_x`,
  `expert_token_nums`, `ep_recv_counts`, `assist_info_for_combine`, `expand_scales`). This is
  NOT MC2: the real op's internal layout, padding of `expand_x` and accumulation order are not in
  our spec, and nothing here ran on an NPU;
- on NPUs (HCCL): MC2 is not taken. serving.md §4.3 names the dispatch's arguments (written out in
  `_npu_dispatch`, untested) but not the combine's, nor what the real `assist_info_for_combine`
  holds, so our emulated combine cannot follow a real dispatch; `mc2_applies` is False there and
  the MoE uses `all_to_all_single` over HCCL.

`import torch_npu` happens only inside the NPU branch: importing this module needs torch alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from v4.dist.comm import Communicator
from v4.ops import acc

_MC2_TOKENS_PER_RANK_LIMIT = 512  # vllm-ascend: MC2 while tokens per rank <= this, else all-to-all


@dataclass(frozen=True)
class AssistInfo:
    """What the emulated combine needs to put rows back (the real op's content is not in our spec).

    expand_idx [n] int64: row i of expand_x is row expand_idx[i] of the rank-ordered receive buffer;
    send_order [t*k] int64: the (token * k + slot) pair each sent row came from, in send order;
    send_counts: rows sent to each rank."""

    expand_idx: torch.Tensor
    send_order: torch.Tensor
    send_counts: list


class Mc2Dispatch(NamedTuple):
    """The dispatch's outputs, in the order serving.md §4.3 lists them. The emulation has no
    quantised communication and no TP split: dynamic_scale and tp_recv_counts are None."""

    expand_x: torch.Tensor  # [n, D] x's dtype: received rows, grouped by local expert (then by source rank)
    dynamic_scale: torch.Tensor | None
    assist_info_for_combine: AssistInfo
    expert_token_nums: torch.Tensor  # [local experts] int64: rows per local expert
    ep_recv_counts: torch.Tensor  # [ep] int64: rows received from each rank
    tp_recv_counts: torch.Tensor | None
    expand_scales: torch.Tensor | None  # [n] acc dtype: expert_scales of each received row


class AscendCommunicator(Communicator):
    @property
    def emulated(self) -> bool:
        """The Ascend backend emulated on CPU runs its process group on gloo; real NPUs on HCCL."""
        return self.backend != "hccl"

    def mc2_applies(self, tokens: int) -> bool:
        """Whether this layer's exchange takes the MC2 shape. Every EP rank must answer the same (the
        two paths run different collectives), so the limit applies to the largest share of any rank."""
        return self.emulated and self.ep_max(tokens) <= _MC2_TOKENS_PER_RANK_LIMIT

    # ------------------------------------------------------------------ MC2 call shape
    def moe_distribute_dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, moe_expert_num: int,
                                expert_scales: torch.Tensor | None = None) -> Mc2Dispatch:
        """x [t, D], expert_ids [t, k] global expert ids (experts in contiguous ranges of
        moe_expert_num / ep per rank), expert_scales [t, k] -> what this rank's experts receive."""
        if not self.emulated:
            return self._npu_dispatch(x, expert_ids, moe_expert_num, expert_scales)
        ep, dev = self.ep_size, x.device
        if moe_expert_num % ep:
            raise ValueError(f"moe_distribute_dispatch: moe_expert_num={moe_expert_num} is not divisible by the "
                             f"EP size {ep}")
        per_rank = moe_expert_num // ep
        k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1).long()
        if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < moe_expert_num):
            raise ValueError(f"moe_distribute_dispatch: expert ids must lie in [0, {moe_expert_num})")
        # pairs by global expert: grouped by destination rank, and by local expert within each rank
        order = flat.argsort(stable=True)
        per_expert = torch.bincount(flat, minlength=moe_expert_num).to(torch.int64)  # [ep * per_rank]
        from_rank = torch.empty_like(per_expert)  # [source rank, local expert] rows sent here
        dist.all_to_all_single(from_rank, per_expert, group=self.ep_group)
        from_rank = from_rank.view(ep, per_rank)
        send = per_expert.view(ep, per_rank).sum(1).tolist()
        ep_recv_counts = from_rank.sum(1)
        recv = ep_recv_counts.tolist()
        got = self.ep_all_to_all(x[order // k], send, recv)  # rank-ordered, each rank's rows by local expert
        # regroup expert-major: a stable sort on the local expert keeps source rank, then token order
        local = torch.repeat_interleave(torch.arange(per_rank, device=dev).repeat(ep), from_rank.reshape(-1))
        expand_idx = local.argsort(stable=True)
        scales = None
        if expert_scales is not None:
            scales = self.ep_all_to_all(expert_scales.reshape(-1)[order], send, recv)[expand_idx]
        return Mc2Dispatch(got[expand_idx], None, AssistInfo(expand_idx, order, send), from_rank.sum(0),
                           ep_recv_counts, None, scales)

    def moe_distribute_combine(self, expand_x: torch.Tensor, assist_info_for_combine: AssistInfo,
                               ep_recv_counts: torch.Tensor, expert_scales: torch.Tensor) -> torch.Tensor:
        """expand_x [n, D] (the experts' outputs, rows as dispatch gave them), expert_scales [t, k] ->
        [t, D] in the accumulation dtype: sum over k of expert_scales[t, k] * that pair's row."""
        if not self.emulated:
            # serving.md §4.3 does not name npu_moe_distribute_combine's arguments, and mc2_applies
            # keeps NPUs off this path: nothing to call here without guessing them
            raise NotImplementedError("MC2 combine on an NPU is not wired: its arguments are not in our spec; "
                                      "the MoE uses all_to_all_single over HCCL there")
        info = assist_info_for_combine
        t, k = expert_scales.shape
        a = acc(expand_x.dtype)
        ranked = torch.empty_like(expand_x)
        ranked[info.expand_idx] = expand_x  # back to the rank-ordered receive layout
        back = self.ep_all_to_all(ranked, ep_recv_counts.tolist(), info.send_counts)  # [t*k, D] in send order
        w = expert_scales.reshape(-1)[info.send_order].to(a).unsqueeze(1)
        # per token, pairs are added in ascending expert id: the order of the single-device moe_experts
        return torch.zeros(t, expand_x.shape[1], dtype=a, device=expand_x.device).index_add_(
            0, info.send_order // k, back.to(a) * w)

    # ------------------------------------------------------------------ NPU (untested: no NPU here)
    def _hccl_comm_name(self) -> str:
        """MC2 takes the HCCL communicator's name, from the group's NPU backend (serving.md §4.3)."""
        return self.ep_group._get_backend(torch.device("npu")).get_hccl_comm_name(self.rank)

    def _npu_dispatch(self, x, expert_ids, moe_expert_num, expert_scales):
        """The dispatch with the argument names serving.md §4.3 documents. Not reached while
        mc2_applies is False on NPUs (the combine is not wired); kept as the starting point."""
        import torch_npu

        fn = getattr(torch_npu, "npu_moe_distribute_dispatch_v2", None) or torch_npu.npu_moe_distribute_dispatch
        kw = dict(x=x, expert_ids=expert_ids, expert_shard_type=0, shared_expert_rank_num=0,
                  moe_expert_num=moe_expert_num, global_bs=self.ep_max(x.shape[0]) * self.ep_size, scales=None,
                  quant_mode=0, group_ep=self._hccl_comm_name(), ep_world_size=self.ep_size, ep_rank_id=self.rank)
        if expert_scales is not None:
            kw["expert_scales"] = expert_scales
        return Mc2Dispatch(*fn(**kw)[:7])
