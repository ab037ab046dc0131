"""Next tokens from the last position's logits, each request with its own parameters and generator.

Logprobs are those of the model's distribution (log_softmax of the raw logits, vLLM's default
"raw_logprobs"), not of the temperature / top-k / top-p-shaped one the token was drawn from.
"""

from __future__ import annotations

import torch

from ..ops import acc
from .sampling_params import SamplingParams
from .sequence import Sequence, TokenLogprobs


def shape_logits(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied to logits [..., V] (fp32 or fp64): the
    distribution a token is drawn from is softmax of the result (cut tokens are -inf)."""
    x = x / p.temperature
    if p.top_k > 0:
        kth = x.topk(min(p.top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1:
        sx, si = x.sort(-1, descending=True)
        probs = sx.softmax(-1)
        # drop a token once the mass strictly before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= p.top_p
        x = torch.full_like(x, float("-inf")).scatter(-1, si, sx.masked_fill(drop, float("-inf")))
    if p.min_p > 0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < p.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return x


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B], every row with the same parameters and generator."""
    if p.greedy:
        return logits.argmax(-1)
    probs = shape_logits(logits.to(acc(logits.dtype)), p).softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(logits.device)


class Sampler:
    def __init__(self, eos_token_id: int):
        self.eos = eos_token_id

    def suppressed(self, seq: Sequence, ahead: int = 0) -> list[int]:
        """Tokens that may not come yet as output token number len(output_ids) + ahead: EOS (unless
        ignored) and the stop ids, before min_tokens. (ahead > 0: a speculative draft's position.)"""
        p = seq.params
        if len(seq.output_ids) + ahead >= p.min_tokens:
            return []
        return list(p.stop_token_ids) + ([] if p.ignore_eos else [self.eos])

    def pick(self, row: torch.Tensor, seq: Sequence, banned: list[int]) -> int:
        """One token from one row of logits [V], with `banned` ids excluded."""
        x = row.to(acc(row.dtype))
        if banned:
            x = x.index_fill(0, torch.tensor(banned, device=x.device), float("-inf"))
        return int(x.argmax() if seq.params.greedy else sample(x[None], seq.params, seq.generator)[0])

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits [B, V]: row b is the last position of seqs[b]. Returns a token and logprobs per row."""
        logits = logits.to(acc(logits.dtype))
        tokens = torch.empty(len(seqs), dtype=torch.long)
        greedy = [b for b, s in enumerate(seqs) if s.params.greedy and not self.suppressed(s)]
        greedy_rows = set(greedy)
        if greedy:
            tokens[greedy] = logits[greedy].argmax(-1).cpu()
        for b, seq in enumerate(seqs):
            if b not in greedy_rows:
                tokens[b] = self.pick(logits[b], seq, self.suppressed(seq))
        out = tokens.tolist()
        return out, [self.token_logprobs(logits[b], t, s.params.logprobs) for b, (t, s) in enumerate(zip(out, seqs))]

    @staticmethod
    def token_logprobs(row: torch.Tensor, token: int, top_n: int | None) -> TokenLogprobs | None:
        if top_n is None:
            return None
        lp = torch.log_softmax(row, -1)
        top = lp.topk(top_n) if top_n else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top_n else []
        return TokenLogprobs(token, float(lp[token]), pairs)
