"""The engine of a multi-device run: rank 0's front and every other rank's loop.

Rank 0 hosts `DistributedLLM`, which offers what `v4.engine.LLM` offers (add_request, abort,
step, has_unfinished, generate, ...), so `dsv4 serve`, `dsv4 generate` and `parity record` drive
it unchanged. Each call of `step` is one tick of the whole deployment, in lockstep:

1. every rank answers a monitored barrier (a rank that died or hangs is named here, within
   `runtime.dist_timeout_s`);
2. rank 0 broadcasts a `Tick` on the CPU gloo side group: new requests (each assigned to a
   data-parallel group, the least loaded), aborts, or a new engine to build;
3. the leader of each DP group (its TP rank 0) adds its requests to its own `LLM`, whose
   scheduler places the group's step and whose `TPRunner` sends the group the step plan; a
   group with nothing to run still joins the MoE exchanges under expert parallel (a dummy step);
4. rank 0 gathers every leader's `GroupReport` (new outputs, queue lengths, counters).

So every DP group owns its requests and its KV cache (vLLM's DP engine cores), and rank 0 runs
the scheduler of its own group and the HTTP front end. While idle, rank 0 still ticks (the
serving loop calls `step` every half second: `heartbeat`), so a dead rank is noticed then too.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace

from ..engine.llm import LLM, Completion, EngineStats
from ..engine.runner import ModelRunner
from ..engine.sampling_params import SamplingParams
from ..errors import InputError
from .comm import RankLost, lost_ranks_in
from .runner import TPRunner, follow


@dataclass
class Tick:
    new: list = field(default_factory=list)  # [(global id, dp group, prompt ids, SamplingParams)]
    aborts: list = field(default_factory=list)  # [(global id, dp group)]
    engine: tuple | None = None  # (RuntimeConfig, logits mode): build a fresh engine (and cache) first
    stop: bool = False


@dataclass
class GroupReport:
    outputs: list  # RequestOutput with global ids
    waiting: int
    running: int
    kv_cache_usage: float
    prompt_tokens: int
    generation_tokens: int
    num_preemptions: int
    prefill_tokens: int
    decode_tokens: int


class GroupEngine:
    """A DP group leader's engine: an LLM over a TPRunner, and the map of its requests' ids."""

    def __init__(self, model, rt, tokenizer, logits: str):
        self.model = model
        self.llm = LLM(model, rt, tokenizer, logits=logits, runner=TPRunner(model, rt))
        self.group = model.place.dp_rank
        self.to_global: dict[int, int] = {}
        self.to_local: dict[int, int] = {}

    def tick(self, tick: Tick) -> GroupReport:
        llm = self.llm
        for gid, group, prompt, params in tick.new:
            if group == self.group:
                lid = llm.add_request(prompt, params)  # rank 0 validated it against the same limits
                self.to_global[lid], self.to_local[gid] = gid, lid
        for gid, group in tick.aborts:
            if group == self.group and gid in self.to_local:
                llm.abort(self.to_local[gid])
        outputs = llm.step() if llm.has_unfinished() else []
        self.llm.runner.finish_tick(others_need_experts=self.model.ep_moe is not None)
        for i, out in enumerate(outputs):
            gid = self.to_global[out.request_id]
            if out.finished:
                del self.to_global[out.request_id], self.to_local[gid]
            outputs[i] = replace(out, request_id=gid)
        s = llm.stats
        return GroupReport(outputs, llm.num_waiting, llm.num_running, llm.kv_cache_usage(), s.prompt_tokens,
                           s.generation_tokens, s.num_preemptions, s.prefill_tokens, s.decode_tokens)


def _lost_message(e: RankLost) -> str:
    ranks = lost_ranks_in(str(e))
    if ranks:
        return (f"rank {ranks} did not answer within the timeout (it died or hangs); the deployment cannot go on: "
                "check that rank's log, then restart every rank")
    return str(e)


class DistributedLLM:
    """Rank 0's engine over every rank (see the module docstring). `assign="first"` puts every
    request on DP group 0 (parity record: its logits and hooks are the ones rank 0 sees)."""

    heartbeat = True  # the serving loop ticks while idle, so the other ranks know rank 0 lives

    def __init__(self, model, rt, tokenizer, comm, logits: str = "last", assign: str = "least_loaded", dead_ranks=None):
        self.model, self.runtime, self.tokenizer, self.comm = model, rt, tokenizer, comm
        self.dead_ranks = dead_ranks  # () -> ["1 (exit code -9)", ...]: the spawned ranks that have exited
        self.layout = comm.place.layout
        self.assign = assign
        self.local: GroupEngine | None = None  # DP group 0's engine: run_tick builds it
        self.cache = None
        self._tick(Tick(engine=(rt, logits)))
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._new: list = []
        self._aborts: list = []
        self._group_of: dict[int, int] = {}  # unfinished request -> its DP group
        self.assigned: list[int] = []  # the DP group of every request so far, in arrival order
        self._reports: list[GroupReport] = []

    # ------------------------------------------------------------------ LLM's interface
    @property
    def runner(self) -> ModelRunner:
        return self.local.llm.runner

    @property
    def graph_mode(self) -> str:
        return "off"

    @property
    def last_step(self):
        return self.local.llm.last_step

    def add_request(self, prompt_ids, params: SamplingParams | None = None) -> int:
        prompt_ids, params = self.local.llm.validate(prompt_ids, params)
        gid = next(self._ids)
        group = 0 if self.assign == "first" else self._least_loaded()
        self._new.append((gid, group, prompt_ids, params))
        self._group_of[gid] = group
        self.assigned.append(group)
        return gid

    def abort(self, request_id: int) -> bool:
        group = self._group_of.get(request_id)
        if group is None:
            return False
        self._aborts.append((request_id, group))
        return True

    def has_unfinished(self) -> bool:
        return bool(self._group_of)

    def sequence(self, request_id: int) -> "_GroupZeroSequence":
        """A request of DP group 0 (whose state lives in this process), as a view that follows it
        from the tick that hands it to the group's engine on."""
        return _GroupZeroSequence(self.local, request_id)

    def kv_cache_usage(self) -> float:
        return max((r.kv_cache_usage for r in self._reports), default=0.0)

    @property
    def num_waiting(self) -> int:
        return sum(r.waiting for r in self._reports) + len(self._new)

    @property
    def num_running(self) -> int:
        return sum(r.running for r in self._reports)

    def step(self) -> list:
        tick = Tick(self._new, self._aborts)
        self._new, self._aborts = [], []
        local = self.local.llm.stats
        steps, decode_steps, t0 = local.steps, local.decode_steps, time.perf_counter()
        self._reports = self._tick(tick)
        # the whole tick's wall time (barrier, plans, gathers included) counts as the kind of step
        # DP group 0 ran in it; the tokens are every group's
        wall = time.perf_counter() - t0
        if local.decode_steps > decode_steps:
            self.stats.decode_s += wall
        elif local.steps > steps:
            self.stats.prefill_s += wall
        outputs = [o for r in self._reports for o in r.outputs]
        for out in outputs:
            if out.finished:
                self._group_of.pop(out.request_id, None)
        s = self.stats
        s.prompt_tokens = sum(r.prompt_tokens for r in self._reports)
        s.generation_tokens = sum(r.generation_tokens for r in self._reports)
        s.num_preemptions = sum(r.num_preemptions for r in self._reports)
        s.prefill_tokens = sum(r.prefill_tokens for r in self._reports)
        s.decode_tokens = sum(r.decode_tokens for r in self._reports)
        s.steps, s.decode_steps = local.steps, local.decode_steps
        return outputs

    def generate(self, prompts: list[list[int]], params=None, progress: bool = False) -> list[Completion]:
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets; give one, or one per prompt")
        for i, (p, sp) in enumerate(zip(prompts, plist)):  # all or nothing: check every prompt first
            try:
                self.local.llm.validate(p, sp)
            except InputError as e:
                raise InputError(f"prompt {i}: {e}" if len(prompts) > 1 else str(e)) from None
        gids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        got = {g: {"ids": [], "text": "", "lps": [], "reason": None} for g in gids}
        from tqdm.auto import tqdm

        bar = tqdm(total=len(gids), desc="requests", unit="req", disable=not progress)
        while self.has_unfinished():
            for out in self.step():
                r = got[out.request_id]
                r["ids"] += out.new_token_ids
                r["text"] += out.new_text
                r["lps"] += out.logprobs or []
                r["reason"] = out.finish_reason or r["reason"]
                bar.update(1 if out.finished else 0)
        bar.close()
        return [Completion(g, list(p), got[g]["ids"], got[g]["text"], got[g]["reason"],
                           got[g]["lps"] if sp.logprobs is not None else None)
                for g, p, sp in zip(gids, prompts, plist)]

    def close(self) -> None:
        """Tell every other rank to leave its loop (they exit); rank 0's engine is unusable after."""
        try:
            run_tick(self.comm, Tick(stop=True), self)
        except (RankLost, RuntimeError):
            pass

    # ------------------------------------------------------------------ the tick
    def _least_loaded(self) -> int:
        load = [0] * self.layout.dp
        for g in self._group_of.values():
            load[g] += 1
        return load.index(min(load))

    def _tick(self, tick: Tick) -> list:
        try:
            _, report = run_tick(self.comm, tick, self)
            return [r for r in self.comm.gather_objects(report) if r is not None]
        except (RankLost, RuntimeError) as e:
            dead = self.dead_ranks() if self.dead_ranks is not None else []
            if dead:
                raise RankLost(f"rank {', '.join(dead)} exited; the deployment cannot go on: check that rank's log, "
                               "then restart") from None
            lost = self.comm.name_lost_ranks()
            if lost:
                raise RankLost(f"rank {lost} did not answer within {self.comm.timeout_s:g} s (it died or hangs); the "
                               "deployment cannot go on: check that rank's log, then restart every rank") from None
            raise RankLost(_lost_message(e) if isinstance(e, RankLost) else
                           f"a collective failed ({str(e).splitlines()[0]}); check the other ranks' logs, then restart") from None


class _GroupZeroSequence:
    def __init__(self, engine: GroupEngine, gid: int):
        self._engine, self._gid, self._seq = engine, gid, None

    def __getattr__(self, name):
        if self._seq is None and self._gid in self._engine.to_local:
            self._seq = self._engine.llm.sequence(self._engine.to_local[self._gid])
        if self._seq is None:  # not yet handed over: nothing computed
            if name == "num_computed":
                return 0
            raise AttributeError(f"request {self._gid} has not reached DP group 0's engine yet")
        return getattr(self._seq, name)


class RankState:
    """What a rank other than 0 keeps between ticks: its engine (DP leaders) or its cache (the others)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.local: GroupEngine | None = None
        self.cache = None


def run_tick(comm, tick: Tick | None, state) -> tuple[bool, GroupReport | None]:
    """One tick on any rank; rank 0 passes the tick and its DistributedLLM as `state`, the others
    None and their RankState. Returns (go on, this rank's report: leaders only)."""
    comm.check_alive()
    tick = comm.broadcast_objects(tick)
    if tick.stop:
        return False, None
    model = state.model
    if tick.engine is not None:
        rt, logits = tick.engine
        state.local, state.cache = None, None  # free the last engine's cache first
        if model.place.is_tp_leader:
            state.local = GroupEngine(model, rt, state.tokenizer, logits)
        else:
            state.cache = ModelRunner(model, rt, graphs="off").cache
        return True, None
    if model.place.is_tp_leader:
        return True, state.local.tick(tick)
    follow(model, state.cache, comm)
    return True, None


def worker_loop(model, tokenizer, comm) -> int:
    """Every rank but 0: tick until rank 0 says stop. Returns the process's exit code."""
    state = RankState(model, tokenizer)
    while True:
        try:
            go_on, report = run_tick(comm, None, state)
            if not go_on:
                return 0
            comm.gather_objects(report)
        except (RankLost, RuntimeError) as e:  # RuntimeError: a collective inside the forward failed
            comm.name_lost_ranks()  # let rank 0 see that this rank still runs, so it names the lost one
            why = _lost_message(e) if isinstance(e, RankLost) else f"a collective failed: {str(e).splitlines()[0]}"
            print(f"dsv4: error: rank {comm.rank}: {why}; this rank stops (rank 0's log names the lost rank)", flush=True)
            return 1
