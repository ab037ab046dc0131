"""AsyncEngine: the engine's step loop on a thread of its own, fed from asyncio.

`LLM` is single-threaded, so exactly one thread touches it: the engine thread (`EngineThread`,
which should also have built the model: see there). HTTP handlers
post commands (add, abort) to a queue and await the answer; the thread runs commands between
steps, runs a step whenever requests are unfinished, and hands each step's outputs to the
requests' asyncio queues in one callback per step. When a step raises, the engine is dead:
every open request gets the error, `/health` says 503, and new requests are refused.

    engine = AsyncEngine(llm, max_waiting=256); engine.start(asyncio.get_running_loop())
    stream = await engine.add(prompt_ids, params)     # InputError / QueueFull / EngineDead
    async for out in stream: ...                      # RequestOutput, the last one finished
    engine.abort(stream.request_id)                   # a client went away
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass

from ..engine import LLM, RequestOutput, SamplingParams
from ..errors import DSV4Error

log = logging.getLogger("dsv4")


class QueueFull(DSV4Error):
    """The bounded waiting queue is full (HTTP 503)."""


class EngineDead(DSV4Error):
    """The step loop has died (HTTP 503 / 500 for requests in flight)."""


class RequestStream:
    """One request's outputs, in step order. `arrival` is when the HTTP request came in (TTFT's start)."""

    def __init__(self, arrival: float):
        self.arrival = arrival
        self.request_id: int | None = None
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:  # on the event loop
        self._queue.put_nowait(item)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item


class EngineThread:
    """One daemon thread for all of the engine's torch work: building the model, then the step loop.

    Why the same thread: with GNU OpenMP (torch's CPU wheels), every thread that runs parallel torch
    ops owns an OpenMP team, and once the teams' threads outnumber the cores libgomp throttles its
    spin-waits, so every parallel region pays a futex sleep and wake. Measured on 2 cores (small,
    32 prompts of 128 tokens, 64 out, 16 at once, in process): built on the main thread and stepped
    on another, 64 output tok/s; built and stepped on one thread, 81; a 16 x 4096 RMSNorm took
    0.25 ms instead of 0.035 ms.
    """

    def __init__(self, name: str = "dsv4-engine"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> concurrent.futures.Future:
        """Run fn(*args) on the thread, after the jobs before it."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - the submitter gets it from the future
                future.set_exception(e)


@dataclass
class EngineSnapshot:
    """What the metrics read after every step (plain values: written by the engine thread only)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    # speculative decoding (zeros when it is off): v4.engine.spec_decode.SpecStats
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple = ()


class AsyncEngine:
    def __init__(self, llm: LLM, max_waiting: int = 256, on_step=None, worker: EngineThread | None = None):
        """on_step(snapshot, outputs_by_stream): called on the engine thread after every step (metrics).
        worker: the thread that built `llm` (default: a new one)."""
        self.llm, self.max_waiting, self.on_step = llm, max_waiting, on_step
        self._worker = worker
        self.snapshot = EngineSnapshot()
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, RequestStream] = {}
        self._stop = threading.Event()
        self._running: concurrent.futures.Future | None = None  # the step loop, on the worker
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ front (event loop side)
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._running = (self._worker or EngineThread()).submit(self._run)

    @property
    def alive(self) -> bool:
        return self.error is None and self._running is not None and not self._running.done()

    async def add(self, prompt_ids: list[int], params: SamplingParams, arrival: float | None = None) -> RequestStream:
        """Queue a request. Raises InputError (refused: it can never run), QueueFull or EngineDead."""
        if not self.alive:
            raise EngineDead(self._dead_message())
        stream = RequestStream(time.monotonic() if arrival is None else arrival)
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("add", prompt_ids, params, stream, done))
        answer = asyncio.wrap_future(done)
        try:
            while not answer.done():  # the loop may die between our check and its next look at the queue
                await asyncio.wait([answer], timeout=1.0)
                if not answer.done() and not self.alive:
                    raise EngineDead(self._dead_message())
        except asyncio.CancelledError:  # the client left while we waited: drop the request once it exists
            done.add_done_callback(lambda f: f.exception() is None and self.abort(f.result()))
            raise
        stream.request_id = answer.result()
        return stream

    def abort(self, request_id: int | None) -> None:
        if request_id is not None and self._running is not None:
            self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        if self._running is not None:
            concurrent.futures.wait([self._running], timeout)

    def _dead_message(self) -> str:
        why = f"{type(self.error).__name__}: {self.error}" if self.error else "it has been shut down"
        return f"the engine loop is not running ({why}); restart the server"

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._do_commands(block=not self.llm.has_unfinished())
                # a multi-device engine ticks while idle too (every half second): its other ranks
                # wait on rank 0's ticks, and a dead one is noticed without a request to show it
                if self.llm.has_unfinished() or getattr(self.llm, "heartbeat", False):
                    self._step()
        except BaseException as e:  # noqa: BLE001 - any failure kills the loop; every client hears why
            log.exception("engine loop died")
            self.error = e
            self._fail_all(EngineDead(self._dead_message()))
        else:
            self._fail_all(EngineDead("the server is shutting down; retry on another replica"))

    def _do_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._do(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _do(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, prompt_ids, params, stream, done = cmd
            try:
                if self.llm.num_waiting >= self.max_waiting:
                    raise QueueFull(
                        f"the waiting queue is full ({self.max_waiting} requests, --max-waiting); retry later"
                    )
                rid = self.llm.add_request(prompt_ids, params)
            except Exception as e:  # noqa: BLE001 - the caller gets it (a 4xx/5xx), the loop goes on
                done.set_exception(e)
                return
            self._streams[rid] = stream
            done.set_result(rid)
        elif cmd[0] == "abort":
            self.llm.abort(cmd[1])

    def _step(self) -> None:
        outputs = self.llm.step()
        by_stream = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_stream.append((stream, out))
        self._update_snapshot()
        if self.on_step is not None:
            self.on_step(self.snapshot, by_stream)
        if by_stream:
            self._loop.call_soon_threadsafe(_deliver, by_stream)

    def _update_snapshot(self) -> None:
        llm, s = self.llm, self.snapshot
        s.running, s.waiting = llm.num_running, llm.num_waiting
        s.kv_cache_usage = llm.kv_cache_usage()
        s.prompt_tokens, s.generation_tokens = llm.stats.prompt_tokens, llm.stats.generation_tokens
        s.num_preemptions = llm.stats.num_preemptions
        drafter = getattr(llm, "drafter", None)
        if drafter is not None:
            st = drafter.stats
            s.spec_num_drafts, s.spec_num_draft_tokens = st.num_drafts, st.num_draft_tokens
            s.spec_num_accepted_tokens, s.spec_accepted_per_pos = st.num_accepted_tokens, tuple(st.accepted_per_pos)

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = list(self._streams.values()), {}
        while True:  # requests still in the command queue are refused too
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add" and not cmd[4].done():
                cmd[4].set_exception(error)
        if streams and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver, [(s, error) for s in streams])


def _deliver(items) -> None:
    for stream, item in items:
        stream.put(item)
