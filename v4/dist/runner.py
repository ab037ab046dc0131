"""The model runner of one tensor-parallel group.

The group's leader (TP rank 0) uses `TPRunner` inside its `LLM`: each step it sends the
group a `StepPlan` (cache journal + packed step), then runs the same forward as the others.
Every other rank of the group runs `follow`: receive the plan, replay the journal on its own
cache, run the forward (its heads, its vocab rows, its expert share). Collectives inside the
forward keep the ranks together; the logits the leader samples from are whole (gathered).

Decode graphs are off in multi-device runs (each replay would need the plan's layout first).
"""

from __future__ import annotations

import logging

import torch

from ..batch import StepBatch
from ..engine.runner import ModelRunner
from .step_plan import DUMMY, IDLE, RUN, StepPlan, replay

log = logging.getLogger("dsv4")


class TPRunner(ModelRunner):
    def __init__(self, model, rt):
        if rt.decode_graphs == "on":
            log.warning("runtime.decode_graphs is on, but decode graphs are off in multi-device runs (a replay would "
                        "need the step plan's layout first); decoding eagerly")
        super().__init__(model, rt, graphs="off")
        self.comm = model.comm
        self.cache.journal = []
        self.ran = False  # whether this tick's plan went out (LLM.step calls run only when it placed work)

    def _send(self, plan: StepPlan) -> None:
        plan.cache_ops, self.cache.journal = self.cache.journal, []
        if self.comm.tp_size > 1:
            self.comm.broadcast_objects(plan, src=self.comm.place.tp_group[0], tp_only=True)
        self.ran = True

    @torch.no_grad()
    def run(self, step, logits: str = "last") -> torch.Tensor:
        ids = [t for s in step for t in s.token_ids()]
        seqs = [(s.seq.slot, s.start, s.num_tokens) for s in step]
        self._send(StepPlan(RUN, seqs=seqs, ids=ids, logits=logits, record=self.model.hook is not None))
        return super().run(step, logits)

    def finish_tick(self, others_need_experts: bool) -> None:
        """End of an engine tick: if the group ran nothing, tell it so, and with expert parallel
        take part in the MoE exchanges anyway."""
        if not self.ran:
            self._send(StepPlan(DUMMY if others_need_experts else IDLE))
            if others_need_experts:
                self.model.dummy_step()
        self.ran = False


@torch.no_grad()
def follow(model, cache, comm) -> str:
    """One tick on a TP rank other than the leader: receive the plan and do the same step."""
    plan: StepPlan = comm.broadcast_objects(None, src=comm.place.tp_group[0], tp_only=True)
    replay(cache, plan.cache_ops)
    if plan.kind == DUMMY:
        model.dummy_step()
    elif plan.kind == RUN:
        slots, starts, lens = zip(*plan.seqs)
        batch = StepBatch(list(slots), list(starts), list(lens), model.device)
        for slot, start, n in plan.seqs:
            cache.seq_len[slot] = start + n
        model.hook = (lambda name, t: None) if plan.record else None
        try:
            model.forward(torch.tensor(plan.ids, device=model.device), batch, cache, logits=plan.logits)
        finally:
            model.hook = None
    return plan.kind
