"""What a tensor-parallel group's leader tells the other ranks of its group, once per engine tick.

The leader runs the scheduler and owns the host-side truth of the cache (which slot, which pool
blocks); the others hold the same cache tensors for their own heads and only follow:
- `cache_ops`: the leader cache's alloc / release / reserve calls since the last plan, in order
  (`KVCache.journal`). Replayed in order they give every rank the same slots and block tables;
  a slot that comes out different means the ranks diverged, and the follower stops with that.
- `kind`: "run" (a model step over `seqs` / `ids`), "dummy" (no tokens here, but the MoE layers'
  expert exchange still runs: other data-parallel groups may need this rank's experts) or
  "idle" (nothing at all this tick).
"""

from __future__ import annotations

from dataclasses import dataclass, field

RUN, DUMMY, IDLE = "run", "dummy", "idle"


@dataclass
class StepPlan:
    kind: str
    cache_ops: list = field(default_factory=list)
    seqs: list = field(default_factory=list)  # [(slot, start, num_tokens)] in batch order
    ids: list = field(default_factory=list)  # the packed token ids of the step
    logits: str = "last"
    record: bool = False  # parity hooks are attached on the leader: head-split tensors are gathered


def replay(cache, ops: list) -> None:
    """Apply a leader's cache journal to this rank's cache."""
    for op in ops:
        if op[0] == "alloc":
            got = cache.alloc()
            if got != op[1]:
                raise RuntimeError(f"cache slots diverged from the leader's (it took slot {op[1]}, this rank {got}); "
                                   "the ranks are out of step")
        elif op[0] == "release":
            cache.release(op[1])
        elif op[0] == "reserve":
            cache.reserve(op[1], op[2])
        else:  # pragma: no cover - the leader only journals these three
            raise RuntimeError(f"unknown cache operation {op!r} in a step plan")
