"""One request as the engine tracks it: its tokens, where it stands, and how it samples."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # lost its cache; waits to recompute prompt + output so far
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens
    ABORT = "abort"


class Sequence:
    """prompt + output token ids, the sampling parameters, the cache slot, and how many of the
    tokens the cache already holds (`num_computed`). Every step computes tokens until
    `num_computed` catches up with `num_tokens`; then the last position's logits give the next token."""

    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams):
        self.id = seq_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.slot: int | None = None
        self.num_computed = 0
        # speculative decoding: tokens the MTP block proposes to follow output_ids (not output yet),
        # and for sampled drafts the distribution each was drawn from (for the rejection sampler)
        self.draft_ids: list[int] = []
        self.draft_probs: list[torch.Tensor | None] = []
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.text = ""  # detokenised output, cut before a stop string (when the engine has a tokenizer)
        self.emitted_chars = 0  # how much of `text` the step outputs have carried so far
        self.prefix_offset = self.read_offset = 0  # incremental detokenisation: output_ids[prefix:read] is decoded
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def token_ids(self, start: int, n: int) -> list[int]:
        """Tokens [start, start + n) of prompt followed by output."""
        P = len(self.prompt_ids)
        if start + n <= P:
            return self.prompt_ids[start:start + n]
        if start >= P:
            return self.output_ids[start - P:start - P + n]
        return self.prompt_ids[start:] + self.output_ids[:start + n - P]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self):
        return (
            f"Sequence(id={self.id}, {self.status.value}, prompt={len(self.prompt_ids)}, out={len(self.output_ids)}, "
            f"computed={self.num_computed}, slot={self.slot})"
        )


@dataclass
class TokenLogprobs:
    """The chosen token's logprob and the top-N alternatives (id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """What one step adds to one request: only what is new, so a server can stream it."""

    request_id: int
    new_token_ids: list[int]
    new_text: str
    logprobs: list[TokenLogprobs] | None
    finished: bool
    finish_reason: str | None
    queue_s: float | None = None  # on a request's first token: seconds from add_request to first scheduled
