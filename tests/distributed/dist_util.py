"""Helpers for tests that run several torch.distributed ranks on this machine (gloo, 127.0.0.1).

`spawn(fn, world, *args)` starts `world` processes (the "spawn" start method), each with one
thread, joins them into a gloo group over TCP on 127.0.0.1 only (the rendezvous store and gloo's
own connections), calls `fn(rank, world, *args)` and returns every rank's result in rank
order. The first rank that raises fails the test with its traceback; a rank that neither answers
nor fails within `timeout` seconds fails it too. `fn` must be importable (module level).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist

from v4.dist.launch import _local_store

GROUP_TIMEOUT_S = 30  # a collective that waits longer than this fails on its own


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, args: tuple, out) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's pairs on the loopback interface only
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    try:
        # the launcher's rendezvous: rank 0's store listens on 127.0.0.1 only
        store = _local_store(f"127.0.0.1:{port}", rank, world, timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        try:
            out.put((rank, True, fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        out.put((rank, False, traceback.format_exc()))


def spawn(fn, world: int = 2, *args, timeout: float = 60.0) -> list:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, out), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, ok, value = out.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                missing = sorted(set(range(world)) - set(results))
                raise TimeoutError(f"ranks {missing} gave no result within {timeout:g} s") from None
            if not ok:
                raise AssertionError(f"rank {rank} of {world} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]
