"""One process per device: spawned here on one node, or started by torchrun on several.

- One node: `dsv4 serve|generate|parity record ... -tp N [-dp K] [--enable-expert-parallel]`.
  The command's own process becomes rank 0 and starts ranks 1..N*K-1 as child processes
  (`python -m v4.dist.launch --worker ...`), which meet it over TCP on 127.0.0.1 only.
- Several nodes: `torchrun --nnodes M --nproc-per-node P ... -m v4 serve ...` starts every
  process itself; each reads RANK / WORLD_SIZE / LOCAL_RANK (env://), rank 0 serves, the
  others run `worker_loop` and exit when rank 0 stops.

Each rank then picks its device (cuda:LOCAL_RANK, npu:LOCAL_RANK, or the CPU), joins the
process group of its backend (gloo / NCCL / HCCL: `comm.process_group_backend`), reads only its
slices of the weights (`v4.dist.shard`) and reports what it holds; rank 0 prints the layout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .comm import Communicator, process_group_backend
from .parallel import ParallelConfig
from .shard import rank_slice, shard_weights

log = logging.getLogger("dsv4")


def layout_of(rt) -> ParallelConfig:
    return ParallelConfig(rt.tensor_parallel_size, rt.data_parallel_size, rt.enable_expert_parallel)


@dataclass
class LoadArgs:
    """What every rank needs to build its part of the model (JSON-able: it crosses processes)."""

    checkpoint: str | None
    config: str | None
    runtime_file: str | None
    overrides: dict = field(default_factory=dict)
    seed: int = 0


@dataclass
class RankContext:
    rank: int
    world_size: int
    loaded: object  # v4.runtime.Loaded of this rank
    comm: Communicator
    children: list = field(default_factory=list)  # [(rank, Popen)] when this process spawned them

    def dead_ranks(self) -> list[str]:
        return [f"{r} (exit code {p.returncode})" for r, p in self.children if p.poll() is not None]

    def follow(self) -> int:
        """A rank other than 0 started by torchrun: run rank 0's ticks until it stops."""
        from .engine import worker_loop

        code = worker_loop(self.loaded.model, self.loaded.tokenizer, self.comm)
        _leave()
        return code

    def engine(self, rt, logits: str = "last", assign: str = "least_loaded"):
        """Rank 0's DistributedLLM over every rank, with runtime `rt` (its cache sizes) on all of them."""
        from .engine import DistributedLLM

        return DistributedLLM(self.loaded.model, rt, self.loaded.tokenizer, self.comm, logits, assign,
                              dead_ranks=self.dead_ranks)

    def close(self, llm=None) -> None:
        """Rank 0 at the end: tell the others to stop, wait for the spawned ones, leave the group."""
        if llm is None:
            from .engine import Tick, run_tick

            try:
                run_tick(self.comm, Tick(stop=True), None)
            except Exception:  # noqa: BLE001 - a dead rank cannot be told; its children are reaped below
                pass
        else:
            llm.close()
        self.shutdown_children()
        _leave()

    def shutdown_children(self, timeout: float = 10.0) -> None:
        for _, p in self.children:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()


_LISTENERS: list = []


def _local_store(address: str, rank: int, world: int, timeout) -> dist.TCPStore:
    """The rendezvous of one node's ranks. Rank 0 hands TCPStore a socket bound to 127.0.0.1: given
    just the address, the store would listen on every interface."""
    host, port = address.rsplit(":", 1)
    listen = None
    if rank == 0:
        listen = socket.socket()
        listen.bind((host, int(port)))
        listen.listen()
    store = dist.TCPStore(host, int(port), world, rank == 0, timeout=timeout,
                          master_listen_fd=None if listen is None else listen.fileno())
    _LISTENERS.append(listen)  # the socket object must outlive the store that listens on its fd
    return store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun (or another env:// launcher) started this process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return None


def start(args: LoadArgs, rt, progress: bool = True) -> RankContext:
    """Join (or create) the deployment and build this rank's model. On one node without torchrun,
    this process is rank 0 and spawns the others."""
    lay = layout_of(rt)
    lay.check(_config(args), "runtime (tensor_parallel_size / data_parallel_size / enable_expert_parallel)")
    env = torchrun_env()
    children = []
    if env is None:
        port = _free_port()
        init = f"127.0.0.1:{port}"
        rank, world, local = 0, lay.world_size, 0
        for r in range(1, world):
            spec = json.dumps({"args": args.__dict__, "rank": r, "world": world, "init": init})
            children.append((r, subprocess.Popen([sys.executable, "-m", "v4.dist.launch", "--worker", spec])))
    else:
        rank, world, local = env
        init = "env://"
        if world != lay.world_size:
            raise ConfigError(f"torchrun started {world} processes but the layout {lay.describe()} needs "
                              f"{lay.world_size} (tensor_parallel_size x data_parallel_size); make them agree")
    try:
        return _join(args, rt, lay, rank, world, local, init, children, progress)
    except BaseException:
        for _, p in children:
            p.kill()
        raise


def _join(args, rt, lay, rank, world, local, init, children, progress) -> RankContext:
    from ..model import Transformer
    from ..runtime import DTYPES, Loaded
    from ..tokenizer import load_tokenizer

    ops = _rank_ops(rt, local, world)
    backend = process_group_backend(ops.device)
    _init_group(backend, init, rank, world, datetime.timedelta(seconds=rt.dist_timeout_s))
    cfg = _config(args)
    lay.check(cfg)
    place = lay.rank(cfg, rank)
    comm = getattr(ops, "communicator_class", Communicator)(place, backend, rt.dist_timeout_s)
    comm.check_layout(rt.moe_comm)  # HCCL's gather sizes, before any weight is read
    cfg, tensors, report = _rank_weights(args, cfg, place, ops.device, progress and rank == 0)
    model = Transformer(cfg, tensors, ops, DTYPES[rt.dtype], rt.mode, comm=comm, moe_comm=rt.moe_comm)
    _startup_report(comm, lay, backend, f"{place.describe()}; weights {report['bytes_read'] / 2**20:.1f} MiB of "
                    f"{report['bytes_total'] / 2**20:.1f} MiB ({_share(report):.1%}) on {ops.device}")
    return RankContext(rank, world, Loaded(model, cfg, rt, load_tokenizer(cfg, args.checkpoint), args.checkpoint),
                       comm, children)


def _rank_ops(rt, local: int, world: int):
    """The backend's ops on this rank's device: cuda/npu:LOCAL_RANK, or the CPU (its cores shared)."""
    import backends

    ops = backends.get_ops(rt.backend, rt.device, rt.allow_fallback, rt.mode, rt.dtype, rt.backend_options)
    if ops.device.type in ("cuda", "npu") and ops.device.index != local:  # one device per rank, by local rank
        ops = backends.get_ops(rt.backend, f"{ops.device.type}:{local}", rt.allow_fallback, rt.mode, rt.dtype,
                               rt.backend_options)
    if ops.device.type == "cpu" and torchrun_env() is None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share this node's cores
    if ops.device.type in ("cuda", "npu"):  # NCCL / HCCL bind a communicator to the current device
        getattr(torch, ops.device.type).set_device(ops.device)
    return ops


def _init_group(backend: str, init: str, rank: int, world: int, timeout) -> None:
    if init == "env://":
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, store=_local_store(init, rank, world, timeout), rank=rank, world_size=world,
                                timeout=timeout)


def _rank_weights(args, cfg, place, device, progress: bool):
    """(config, this rank's tensors, {bytes_read, bytes_total}): its slices of the checkpoint, or of the
    seeded random weights."""
    from ..runtime import random_weights

    if args.checkpoint is not None:
        from .. import weights

        report: dict = {}
        cfg, tensors = weights.load_checkpoint(args.checkpoint, cfg, progress=progress, device=device,
                                               select=lambda n: rank_slice(n, cfg, place), report=report)
        return cfg, tensors, report
    full = random_weights(cfg, args.seed)
    tensors = shard_weights(full, cfg, place)
    return cfg, tensors, {"bytes_read": _nbytes(tensors.values()), "bytes_total": _nbytes(full.values())}


def _startup_report(comm, lay, backend: str, line: str) -> None:
    """Rank 0 prints the layout and every rank's line (what it holds, what it read)."""
    lines = comm.gather_objects(line)
    if comm.rank == 0:
        print(f"dsv4: {lay.describe()} over {lay.world_size} ranks ({backend}); KV cache replicated within each TP "
              "group, one per DP group", file=sys.stderr)
        for text in lines:
            print(f"  {text}", file=sys.stderr)


def _config(args: LoadArgs):
    from ..runtime import resolve

    cfg, _ = resolve(args.checkpoint, args.config, args.runtime_file, args.overrides)
    return cfg


def _nbytes(tensors) -> int:
    from ..quant import QuantizedWeight

    parts = [p for t in tensors for p in ((t.data, t.scale) if isinstance(t, QuantizedWeight) else (t,))]
    return sum(p.numel() * p.element_size() for p in parts)


def _share(report: dict) -> float:
    return report.get("bytes_read", 0) / max(1, report.get("bytes_total", 1))


def run_rank(args: LoadArgs, rank: int, world: int, init: str) -> int:
    """A spawned rank's whole life: join, follow rank 0 until it stops, leave."""
    from ..runtime import resolve
    from .engine import worker_loop

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    _, rt = resolve(args.checkpoint, args.config, args.runtime_file, args.overrides)
    ctx = _join(args, rt, layout_of(rt), rank, world, rank, init, [], progress=False)
    code = worker_loop(ctx.loaded.model, ctx.loaded.tokenizer, ctx.comm)
    _leave()
    return code


def _leave() -> None:
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a broken group cannot be torn down cleanly; the process ends anyway
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m v4.dist.launch", description="internal: one spawned rank")
    p.add_argument("--worker", required=True, help="JSON: {args, rank, world, init}")
    a = p.parse_args(argv)
    spec = json.loads(a.worker)
    return run_rank(LoadArgs(**spec["args"]), spec["rank"], spec["world"], spec["init"])


if __name__ == "__main__":
    sys.exit(main())
