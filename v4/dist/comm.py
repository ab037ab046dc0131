"""The thin communicator every collective of a multi-device run goes through.

It sits on torch.distributed and nothing else. The process group's backend comes from the
backend that computes (`process_group_backend` below): gloo for CPU tensors, NCCL for
`cuda:N`, HCCL for `npu:N` (registered by `import torch_npu`, which only the Ascend backend
imports). The model calls four things: `tp_all_reduce`, `tp_all_gather`, `ep_all_to_all` and
the all-gather / reduce-scatter pair of the alternative MoE path; the engine calls the object
channels (`broadcast_objects`, `gather_objects`), which always run on a CPU gloo side group so
that the same step plan travels the same way under NCCL and HCCL.

Two rules of the libraries live here:
- torch 2.13 renamed `all_gather_into_tensor` / `reduce_scatter_tensor` to `all_gather_single` /
  `reduce_scatter_single` (the old names warn); `_gather_fn` / `_scatter_fn` pick what exists;
- HCCL does not do all-gather or reduce-scatter into one tensor at world sizes 3, 5, 6 and 7
  (serving.md §4.4): `check_gather_size` refuses them with a sentence before any call.
"""

from __future__ import annotations

import datetime
import logging
import re

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .parallel import RankPlacement

log = logging.getLogger("dsv4")

HCCL_NO_GATHER_SIZES = (3, 5, 6, 7)


def process_group_backend(device: torch.device) -> str:
    """The torch.distributed backend for tensors on `device`."""
    return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}.get(torch.device(device).type, "gloo")


def check_gather_size(backend: str, size: int, what: str = "the MoE all-gather / reduce-scatter path") -> None:
    if backend == "hccl" and size in HCCL_NO_GATHER_SIZES:
        raise ConfigError(f"HCCL cannot all-gather or reduce-scatter into one tensor across {size} ranks, which "
                          f"{what} needs; use a group size other than 3, 5, 6 or 7, or runtime.moe_comm: alltoall")


def check_layout(backend: str, layout, moe_comm: str) -> None:
    """Refuse a layout (a `ParallelConfig`) whose collectives the process group cannot run. Under
    HCCL the all-gather MoE path gathers and reduce-scatters into one tensor across the EP group,
    which HCCL refuses at 3, 5, 6 and 7 ranks. The TP gathers (`tp_all_gather`: logits, attention
    heads) use `dist.all_gather` into a list, not into one tensor; the documented HCCL limit names
    only the one-tensor forms, so they are allowed at any size (not checked on an NPU here)."""
    if layout.ep and moe_comm == "allgather":
        check_gather_size(backend, layout.ep_size, "the all-gather MoE path (runtime.moe_comm: allgather)")


def _gather_fn():
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _scatter_fn():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def lost_ranks_in(message: str) -> str | None:
    """The ranks a failed monitored barrier names ("2" or "1, 3"), or None."""
    m = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", message)
    return m.group(1).strip() if m else None


class RankLost(RuntimeError):
    """A peer rank died, hung past the timeout, or left the group."""


class Communicator:
    """This rank's groups and collectives. Build it on every rank in the same order (group creation
    is itself collective): `Communicator(place, backend, timeout_s)` after `dist.init_process_group`."""

    def __init__(self, place: RankPlacement, backend: str, timeout_s: float = 60.0):
        lay = place.layout
        self.place, self.backend, self.timeout_s = place, backend, timeout_s
        self.rank, self.world_size = place.rank, lay.world_size
        timeout = datetime.timedelta(seconds=timeout_s)
        self.tp_group = self.tp_cpu_group = None
        for dp in range(lay.dp):  # every rank creates every group, in the same order
            ranks = list(range(dp * lay.tp, (dp + 1) * lay.tp))
            g = dist.new_group(ranks, timeout=timeout)  # (new_group does not inherit the world's timeout)
            c = dist.new_group(ranks, backend="gloo", timeout=timeout)
            if place.dp_rank == dp:
                self.tp_group, self.tp_cpu_group = g, c
        self.cpu_group = dist.new_group(backend="gloo", timeout=timeout)  # step plans, outputs, liveness
        self.health_group = dist.new_group(backend="gloo", timeout=timeout)  # only after a failure: who is gone
        self.ep_group = dist.group.WORLD if lay.ep else None
        self.tp_size, self.tp_rank, self.ep_size = lay.tp, place.tp_rank, lay.ep_size

    def check_layout(self, moe_comm: str) -> None:
        """At start-up, before any weight is read (`launch._join`): see `check_layout`."""
        check_layout(self.backend, self.place.layout, moe_comm)

    # ------------------------------------------------------------------ tensor parallel
    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group, in place. Every rank gets the same bits (the model relies on it:
        routing and the indexer's top-k run replicated)."""
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def tp_all_gather(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate each TP rank's x [T, sizes[r]] along the last dim -> [T, sum(sizes)]. Pieces may
        differ in width (a vocab that does not divide): they travel padded to the widest."""
        if self.tp_size == 1:
            return x
        width = max(sizes)
        padded = torch.zeros(x.shape[0], width, dtype=x.dtype, device=x.device)
        padded[:, :x.shape[1]] = x
        parts = [torch.empty_like(padded) for _ in range(self.tp_size)]
        dist.all_gather(parts, padded, group=self.tp_group)
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)

    # ------------------------------------------------------------------ expert parallel
    def ep_all_to_all(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows [sum(send_counts), ...] sent in rank order -> rows [sum(recv_counts), ...] received in rank order."""
        out = torch.empty((sum(recv_counts),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=self.ep_group)
        return out

    def ep_exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """send_counts [ep] int64 -> how many rows each rank will send here, [ep] int64."""
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts, group=self.ep_group)
        return recv

    def ep_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, ...] with the same n on every EP rank -> [ep * n, ...] in rank order."""
        check_gather_size(self.backend, self.ep_size)
        out = torch.empty((self.ep_size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        _gather_fn()(out, x.contiguous(), group=self.ep_group)
        return out

    def ep_reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """x [ep * n, ...] -> the sum over ranks of rows [rank * n, (rank + 1) * n)."""
        check_gather_size(self.backend, self.ep_size)
        out = torch.empty((x.shape[0] // self.ep_size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        _scatter_fn()(out, x.contiguous(), group=self.ep_group)
        return out

    def ep_max(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(t)

    # ------------------------------------------------------------------ objects (CPU side group)
    def broadcast_objects(self, obj, src: int = 0, tp_only: bool = False):
        """rank `src`'s object on every rank of the world (or of this TP group, src = its leader)."""
        group = self.tp_cpu_group if tp_only else self.cpu_group
        box = [obj]
        self._guard(lambda: dist.broadcast_object_list(box, src=src, group=group), "receiving the step plan")
        return box[0]

    def gather_objects(self, obj, dst: int = 0) -> list | None:
        """Every rank's object, in rank order, on `dst` (None elsewhere)."""
        out = [None] * self.world_size if self.rank == dst else None
        self._guard(lambda: dist.gather_object(obj, out, dst=dst, group=self.cpu_group), "collecting step outputs")
        return out

    def check_alive(self) -> None:
        """Rank 0 only: every rank answers within the timeout, or RankLost names the ones that did not."""
        self._guard(lambda: dist.monitored_barrier(group=self.cpu_group, timeout=datetime.timedelta(seconds=self.timeout_s),
                                                   wait_all_ranks=True), "checking the other ranks")

    def name_lost_ranks(self) -> str | None:
        """After a failed collective, on every rank that still runs: meet on a group used for
        nothing else, so that rank 0 learns which ranks did not come (died, or hang) and can name
        them. Returns "2" / "1, 3" on rank 0 (None if everyone came), None elsewhere."""
        try:
            dist.monitored_barrier(group=self.health_group, timeout=datetime.timedelta(seconds=self.timeout_s),
                                   wait_all_ranks=True)
        except RuntimeError as e:
            return lost_ranks_in(str(e)) if self.rank == 0 else None
        return None

    def _guard(self, fn, doing: str) -> None:
        try:
            fn()
        except RuntimeError as e:  # gloo: a closed connection or a timeout
            raise RankLost(f"rank {self.rank} lost contact with the other ranks while {doing} "
                           f"(timeout {self.timeout_s:g} s): {str(e).splitlines()[0]}") from None
