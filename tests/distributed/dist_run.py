"""Rank 0 of a multi-device test run, in its own process (it spawns the other ranks):
`python tests/distributed/dist_run.py OUT.pt --dtype float64 [dsv4 multi-device flags]`.

Runs PROMPTS through `DistributedLLM` (greedy, GREEDY tokens each) and saves, with torch.save:
- "logits": {prompt index: [prompt length, vocab] logits of its prefill}, for the prompts that ran
  on data-parallel group 0 (the group whose steps this process sees);
- "greedy": {prompt index: generated ids}, for every prompt, whichever group ran it;
- "groups": how many prompts each DP group ran (least-loaded assignment).
The tests compare these with the one-process model (tests/distributed/test_dist.py)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

PROMPTS = [[5, 17, 99, 3, 250, 41, 7, 300, 12, 64, 128, 9, 33, 77, 401, 2, 18, 19, 20, 21, 22, 23],
           [260, 261, 8],
           [11] * 37 + [400, 401, 402]]
GREEDY = 6


def main(argv=None) -> int:
    from v4.cli import _add_engine_args, _overrides
    from v4.dist.launch import LoadArgs, start
    from v4.engine import SamplingParams
    from v4.runtime import resolve

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--dtype", default="float64")
    p.add_argument("--config", default="tiny")
    p.add_argument("--checkpoint")
    p.add_argument("--runtime")
    p.add_argument("--mode")
    p.add_argument("--backend", default="reference")
    p.add_argument("--device")
    p.add_argument("--ascend-weights")
    p.add_argument("--cuda-graphs")
    p.add_argument("--seed-weights", type=int, default=0)
    _add_engine_args(p)
    a = p.parse_args(argv)
    if a.checkpoint:
        a.config = None
    over = _overrides(a)
    _, rt = resolve(a.checkpoint, a.config, a.runtime, over)
    ctx = start(LoadArgs(a.checkpoint, a.config, a.runtime, over, a.seed_weights), rt, progress=False)
    llm = ctx.engine(dataclasses.replace(rt, max_num_seqs=len(PROMPTS)), logits="all")
    try:
        params = SamplingParams(temperature=0.0, max_tokens=GREEDY, ignore_eos=True)
        gids = [llm.add_request(pr, params) for pr in PROMPTS]
        index = {g: i for i, g in enumerate(gids)}
        logits, greedy = {}, {i: [] for i in range(len(PROMPTS))}
        while llm.has_unfinished():
            outs = llm.step()
            rec = llm.last_step
            if rec is not None:
                for (lid, start_pos, n), off in zip(rec.scheduled, rec.offsets):
                    gid = llm.local.to_global.get(lid)
                    if gid is not None and start_pos == 0:
                        logits[index[gid]] = rec.logits[off:off + n].clone()
            for o in outs:
                greedy[index[o.request_id]] += o.new_token_ids
        groups = {g: llm.assigned.count(g) for g in range(rt.data_parallel_size)}
        torch.save({"logits": logits, "greedy": greedy, "groups": groups}, a.out)
    finally:
        ctx.close(llm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
