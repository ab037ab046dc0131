"""Continuous batching under one token budget per step (vLLM v1's rule).

There is no prefill or decode phase. Every sequence has `num_computed` tokens in the cache and
`num_tokens` (prompt + output) it should have; each step hands out tokens so that the first
catches up with the second, within `max_num_batched_tokens` tokens and `max_num_seqs`
sequences. A decode is a sequence one token behind; a prompt longer than what is left of the
budget (or than `prefill_chunk`) is chunked across steps. So one packed step mixes decode tokens
and prompt chunks.

Order within a step: running sequences first (in admission order), then waiting ones first come
first served. When a running sequence cannot get its blocks, the most recently admitted running
sequence is preempted: its slot and blocks are freed and it goes back to the front of the queue,
to recompute its prompt and output so far (RECOMPUTE, as vLLM). Waiting sequences never preempt.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (= seq.num_computed)
    num_tokens: int  # drafts included
    num_drafts: int = 0  # speculative decoding: the last num_drafts tokens are seq.draft_ids[:num_drafts]

    @property
    def samples(self) -> bool:
        """This step brings the sequence up to date: its last position's logits give the next token."""
        return self.start + self.num_tokens == self.seq.num_tokens + self.num_drafts

    def token_ids(self) -> list[int]:
        """The step's tokens of this sequence: its own, then the drafts it verifies."""
        own = self.num_tokens - self.num_drafts
        return self.seq.token_ids(self.start, own) + self.seq.draft_ids[:self.num_drafts]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, prefill_chunk: int = 0):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the tail is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _share(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_uncomputed, budget)
        if self.prefill_chunk and seq.num_uncomputed > 1:
            n = min(n, self.prefill_chunk)
        return n

    def _drafts(self, seq: Sequence, n: int, budget: int) -> int:
        """How many of a decoding sequence's drafts this step verifies: all that fit in the budget
        and in the cache, else none (a draft never costs another sequence its place)."""
        if n != 1 or seq.num_uncomputed != 1 or not seq.draft_ids:
            return 0
        nd = min(len(seq.draft_ids), budget - 1)
        return nd if nd > 0 and self.blocks.can_allocate(seq, seq.num_computed + 1 + nd) else 0

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        preemptions = self.num_preemptions
        out: list[ScheduledSeq] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._share(seq, budget)
            while not self.blocks.can_allocate(seq, seq.num_computed + n):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                nd = self._drafts(seq, n, budget)
                self.blocks.allocate(seq, seq.num_computed + n + nd)
                out.append(ScheduledSeq(seq, seq.num_computed, n + nd, nd))
                budget -= n + nd
                i += 1
                continue
            break  # seq itself was preempted: nothing after it is running any more
        # as vLLM: no admissions in a step that had to preempt (memory is short; do not thrash)
        while (
            self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
            and preemptions == self.num_preemptions
        ):
            seq = self.waiting[0]
            n = self._share(seq, budget)
            if not self.blocks.can_allocate(seq, seq.num_computed + n):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, seq.num_computed + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, seq.num_computed, n))
            budget -= n
        return out

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.draft_ids, seq.draft_probs = [], []  # the MTP block's cache went with the slot: drafts start afresh
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out of the queues and give its memory back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
