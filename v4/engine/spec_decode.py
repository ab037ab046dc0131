"""MTP speculative decoding (serving.md §3): V4's MTP block drafts k tokens per decoding sequence,
and the main model verifies them in its next packed step.

One engine step with speculative decoding on:
1. the scheduler gives a decoding sequence 1 + k tokens: its newest token and its k drafts,
   packed with the other sequences' prompt chunks and plain decode tokens;
2. `RowBackup` saves the cache rows the drafts are about to write, and the main stack runs the
   step, keeping its output streams;
3. the rejection sampler accepts j of the drafts and adds one token (`rejection_sampler.verify`);
   the rows the k - j rejected drafts wrote are put back, so no cache keeps a trace of them;
4. `propose`: the MTP block runs over every token the step committed (prompt chunks included),
   so that its own window cache holds MTP(h_t, x_t+1) for every position t the main stack holds;
   from each decoding sequence's last position it drafts the next k tokens: the first from the
   main stack's streams, each further one from the MTP block's own streams and the draft before
   (the rows those extra positions write in the MTP cache are put back straight away).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..batch import StepBatch
from ..cache import RowBackup
from ..config import SpeculativeConfig
from ..errors import ConfigError
from ..model import Transformer
from .rejection_sampler import propose, verify
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler import ScheduledSeq
from .sequence import Sequence, TokenLogprobs


@dataclass
class SpecStats:
    """Counters since start-up, vLLM's metric names in brackets."""

    num_drafts: int = 0  # [vllm:spec_decode_num_drafts_total] verifications of one sequence's drafts
    num_draft_tokens: int = 0  # [vllm:spec_decode_num_draft_tokens_total]
    num_accepted_tokens: int = 0  # [vllm:spec_decode_num_accepted_tokens_total]
    accepted_per_pos: list[int] = field(default_factory=list)  # [vllm:spec_decode_num_accepted_tokens_per_pos]

    def mean_acceptance_length(self) -> float | None:
        """Tokens a verification emits on average: 1 + accepted drafts per verification."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None

    def acceptance_rate_per_pos(self) -> list[float]:
        return [n / self.num_drafts if self.num_drafts else 0.0 for n in self.accepted_per_pos]


@dataclass
class Verified:
    """What one step gave one sampling sequence: tokens to append (with logprobs) and how many of the
    step's tokens it keeps in the cache."""

    tokens: list[int]
    logprobs: list[TokenLogprobs | None]


class MTPDrafter:
    def __init__(self, model: Transformer, runner: ModelRunner, sampler: Sampler, spec: SpeculativeConfig):
        cfg = model.cfg
        if not model.mtp:
            raise ConfigError("runtime.speculative_config asks for MTP drafts, but this model has no MTP block "
                              "(num_nextn_predict_layers is 0); drop --speculative-config")
        mtp_layer = cfg.num_hidden_layers
        if cfg.layer_ratio(mtp_layer) != 0:
            raise ConfigError(
                f"runtime.speculative_config: the MTP block is a compressed layer (compress_ratios[{mtp_layer}] "
                f"= {cfg.layer_ratio(mtp_layer)}); speculative decoding needs a sliding-window MTP block, as V4's"
            )
        most = RowBackup.max_tokens_per_step(cfg) - 1
        if spec.num_speculative_tokens > most:
            raise ConfigError(f"runtime.speculative_config: num_speculative_tokens={spec.num_speculative_tokens} needs "
                              f"{spec.num_speculative_tokens + 1} tokens per sequence and step, more than this model's "
                              f"smallest window or compression ratio allows ({most + 1}); use at most {most}")
        self.model, self.runner, self.sampler, self.spec = model, runner, sampler, spec
        self.cache = runner.cache
        self.k = spec.num_speculative_tokens
        self.main_layers = range(cfg.num_hidden_layers)
        self.mtp_layers = range(mtp_layer, mtp_layer + 1)
        self.stats = SpecStats(accepted_per_pos=[0] * self.k)
        self._X: torch.Tensor | None = None  # the last step's main-stack streams [T, hc, D]

    # ------------------------------------------------------------------ verification
    def run(self, step: list[ScheduledSeq], logits_mode: str) -> tuple[torch.Tensor, dict[int, Verified], list[int]]:
        """Run the main model on `step` and verify every sampling sequence's drafts.
        Returns (the logits computed: per token if logits_mode is "all", else the verified rows;
        {batch row: Verified} for the sequences that sample; tokens each sequence keeps in the cache)."""
        pairs = [(s.seq.slot, s.start + s.num_tokens - s.num_drafts + i) for s in step for i in range(s.num_drafts)]
        layout = [(s.seq.slot, s.start, s.num_tokens) for s in step]
        backup = RowBackup(self.cache, pairs, self.main_layers, layout) if pairs else None
        offsets, rows = [0], []  # rows: the head_logits rows, the last num_drafts + 1 tokens of each sampling sequence
        for s in step:
            if s.samples:
                end = offsets[-1] + s.num_tokens
                rows.extend(range(end - s.num_drafts - 1, end))
            offsets.append(offsets[-1] + s.num_tokens)
        which = "all" if logits_mode == "all" else "none" if not rows else torch.tensor(rows, device=self.model.device)
        logits, self._X, inputs = self.runner.run_trunk(step, which)
        picked = logits[rows] if logits_mode == "all" and rows else logits
        verified, kept, rejected, at = {}, [], [], 0
        for b, s in enumerate(step):
            if not s.samples:
                kept.append(s.num_tokens)
                continue
            verified[b] = self._verify_one(s, picked[at:at + s.num_drafts + 1])
            at += s.num_drafts + 1
            accepted = len(verified[b].tokens) - 1
            rejected.extend([i >= accepted for i in range(s.num_drafts)])
            kept.append(s.num_tokens - s.num_drafts + accepted)
        if backup is not None:
            backup.restore(rejected, inputs)
        return logits, verified, kept

    def _verify_one(self, s: ScheduledSeq, rows: torch.Tensor) -> Verified:
        """rows [num_drafts + 1, V]: the target's logits for the token after each of the sequence's last
        num_drafts + 1 step tokens."""
        seq, nd = s.seq, s.num_drafts
        banned = [self.sampler.suppressed(seq, ahead=i) for i in range(nd + 1)]
        if nd == 0:
            tokens = [self.sampler.pick(rows[0], seq, banned[0])]
        else:
            tokens = verify(rows, seq.draft_ids[:nd], self._draft_probs(seq, nd), seq.params, seq.generator, banned)
            st = self.stats
            st.num_drafts += 1
            st.num_draft_tokens += nd
            st.num_accepted_tokens += len(tokens) - 1
            for i in range(len(tokens) - 1):
                st.accepted_per_pos[i] += 1
        seq.draft_ids, seq.draft_probs = [], []
        lps = [Sampler.token_logprobs(rows[i], t, seq.params.logprobs) for i, t in enumerate(tokens)]
        return Verified(tokens, lps)

    @staticmethod
    def _draft_probs(seq: Sequence, nd: int):
        probs = seq.draft_probs[:nd]
        return None if any(p is None for p in probs) else probs

    # ------------------------------------------------------------------ drafting
    @torch.no_grad()
    def propose(self, step: list[ScheduledSeq], kept: list[int]) -> None:
        """After the step's tokens are appended: run the MTP block over what the step kept, and draft
        for every sequence that is now one token behind (its newest token is the first input)."""
        X, self._X = self._X, None
        live = [(b, s) for b, s in enumerate(step) if kept[b] and not s.seq.is_finished]
        if not live:
            return
        offsets = [0]
        for s in step:
            offsets.append(offsets[-1] + s.num_tokens)
        rows = torch.tensor([offsets[b] + i for b, _ in live for i in range(kept[b])], device=X.device)
        batch = StepBatch([s.seq.slot for _, s in live], [s.start for _, s in live], [kept[b] for b, _ in live],
                          self.model.device)
        next_ids = torch.tensor([t for b, s in live for t in s.seq.token_ids(s.start + 1, kept[b])])
        drafting = [i for i, (_, s) in enumerate(live) if s.seq.num_uncomputed == 1 and self._room(s.seq) > 0]
        which = batch.last_token[drafting] if drafting else "none"
        hook, self.model.hook = self.model.hook, None  # parity hooks record the main stack only
        try:
            logits, X1 = self.model.mtp_block(X[rows], next_ids, batch, self.cache, which)
            if drafting:
                self._draft([live[i][1].seq for i in drafting], logits, X1[batch.last_token[drafting]])
        finally:
            self.model.hook = hook

    def _room(self, seq: Sequence) -> int:
        """Drafts worth making: k, but none past max_tokens (a step emits at most drafts + 1 tokens)."""
        return min(self.k, seq.params.max_tokens - len(seq.output_ids) - 1)

    def _draft(self, seqs: list[Sequence], logits: torch.Tensor, X: torch.Tensor) -> None:
        """Draft 1 from `logits` [B, V] (the MTP block at each sequence's last kept position); drafts
        2..k from the block run again one position further on its own streams X [B, hc, D]."""
        argmax = self.spec.draft_sampling == "argmax"
        want = [self._room(s) for s in seqs]
        ahead = [(s.slot, s.num_computed + i) for s, n in zip(seqs, want) for i in range(n - 1)]
        backup = RowBackup(self.cache, ahead, self.mtp_layers) if ahead else None
        active = list(range(len(seqs)))
        for i in range(max(want)):
            for r, b in enumerate(active):
                s = seqs[b]
                tok, q = propose(logits[r], s.params, s.generator, self.sampler.suppressed(s, ahead=i), argmax)
                s.draft_ids.append(tok)
                s.draft_probs.append(q)
            keep = [r for r, b in enumerate(active) if want[b] > i + 1]
            if not keep:
                break
            active = [active[r] for r in keep]
            batch = StepBatch([seqs[b].slot for b in active], [seqs[b].num_computed + i for b in active],
                              [1] * len(active), self.model.device)
            ids = torch.tensor([seqs[b].draft_ids[-1] for b in active])
            logits, X = self.model.mtp_block(X[keep], ids, batch, self.cache, "all")
        if backup is not None:
            backup.restore([True] * len(ahead))
