"""Speculative decoding's two pure steps for one request: draft a token, and verify k drafts losslessly.

Verification is the rejection sampler of Leviathan et al. (arXiv 2211.17192), as in vLLM's
`rejection_sampler.py` (serving.md §3.3): with p the target's and q the draft's shaped distributions
at a position, the draft d is accepted with probability min(1, p(d) / q(d)); on the first rejection a
token is drawn from normalise(max(0, p - q)) and the step ends; when every draft is accepted a bonus
token is drawn from p at the last position. The emitted tokens are then distributed exactly as
tokens drawn one by one from p. Greedy requests accept while the draft is the target's argmax.

"Shaped" means what `sampler.shape_logits` does (temperature, top-k, top-p, min-p) after the ids
banned at that position (EOS and stop ids before min_tokens) are set to -inf, so a banned token is
never drafted nor emitted. Probabilities are computed in float64; random numbers come from the
request's own CPU generator:

- `propose`: sampled, non-argmax requests draw one `torch.multinomial`; greedy and argmax drafts draw nothing;
- `verify`: greedy requests draw nothing; sampled requests draw `torch.rand(k)` (k = number of drafts,
  always all k, whatever is accepted) and then one `torch.multinomial` (the recovered or bonus token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampler import shape_logits
from .sampling_params import SamplingParams

_NEG_INF = float("-inf")


def _masked(logits: torch.Tensor, banned: Sequence[Sequence[int]] | None) -> torch.Tensor:
    """logits [n, V] -> float64 copy with banned[i] set to -inf in row i (banned None: nothing banned)."""
    x = logits.to(torch.float64, copy=True)
    for i, ids in enumerate(banned or ()):
        if len(ids):
            x[i, list(ids)] = _NEG_INF
    return x


def shaped_probs(logits: torch.Tensor, params: SamplingParams,
                 banned: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """logits [n, V] -> float64 probabilities [n, V]: softmax(shape_logits(row with banned[i] at -inf))."""
    return shape_logits(_masked(logits, banned), params).softmax(-1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from probs [V] (weights need not sum to 1), on CPU with the request's generator."""
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def propose(draft_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
            banned: Sequence[int] = (), argmax: bool = False) -> tuple[int, torch.Tensor | None]:
    """A draft token from the draft model's logits [V] at one position, with banned ids excluded.

    Returns (token, probs): greedy requests -> (argmax, None); sampled requests -> a sample from the
    shaped draft distribution q [V] (float64) and q itself; with argmax=True, the argmax of q and the
    one-hot distribution of that token, which keeps verification lossless (acceptance becomes p(d)).
    """
    if params.greedy:
        return int(_masked(draft_logits[None], [banned])[0].argmax()), None
    q = shaped_probs(draft_logits[None], params, [banned])[0]
    if argmax:
        token = int(q.argmax())
        return token, torch.zeros_like(q).index_fill_(0, torch.tensor([token], device=q.device), 1.0)
    return _draw(q, generator), q


def verify(target_logits: torch.Tensor, drafts: Sequence[int],
           draft_probs: Sequence[torch.Tensor] | torch.Tensor | None, params: SamplingParams,
           generator: torch.Generator | None, banned: Sequence[Sequence[int]] | None = None) -> list[int]:
    """The tokens to emit after k drafts: the accepted drafts, then one recovered or bonus token.

    target_logits [k+1, V]: row i is the target's logits for the token at draft position i (row k:
    the bonus position). drafts: k ids. draft_probs: the k draft distributions [V] that `propose`
    returned (a list or a [k, V] tensor; None: one-hot drafts, ignored for greedy requests).
    banned[i]: ids suppressed at position i (None: none). Returns j + 1 ids, j = accepted drafts.
    """
    drafts, k = [int(d) for d in drafts], len(drafts)
    assert target_logits.shape[0] == k + 1, (tuple(target_logits.shape), k)
    if params.greedy:
        return _verify_greedy(_masked(target_logits, banned).argmax(-1).tolist(), drafts)
    p = shaped_probs(target_logits, params, banned)
    q = _draft_matrix(draft_probs, drafts, p)
    j = _accepted(p[:k], q, drafts, generator)
    if j == k:
        return drafts + [_draw(p[k], generator)]
    residual = (p[j] - q[j]).clamp_min(0)
    return drafts[:j] + [_draw(residual if residual.sum() > 0 else p[j], generator)]


def _verify_greedy(target_argmax: list[int], drafts: list[int]) -> list[int]:
    """Drafts up to the first one that is not the target argmax, then the argmax there (or the bonus)."""
    out = []
    for d, t in zip(drafts, target_argmax):
        out.append(t)
        if d != t:
            return out
    return out + [target_argmax[len(drafts)]]


def _draft_matrix(draft_probs, drafts: list[int], like: torch.Tensor) -> torch.Tensor:
    """The draft distributions as a float64 [k, V] matrix on like's device (one-hot rows when None)."""
    k, V = len(drafts), like.shape[-1]
    if draft_probs is None:
        q = torch.zeros(k, V, dtype=like.dtype, device=like.device)
        return q.scatter_(1, torch.tensor(drafts, device=like.device).view(k, 1), 1.0)
    if isinstance(draft_probs, torch.Tensor):
        return draft_probs.to(like).view(k, V)
    return torch.stack([r.to(like) for r in draft_probs]) if k else like.new_zeros(0, V)


def _accepted(p: torch.Tensor, q: torch.Tensor, drafts: list[int], generator: torch.Generator | None) -> int:
    """How many leading drafts pass u_i < p_i(d_i) / q_i(d_i), with u ~ U[0, 1)^k from the generator."""
    k = len(drafts)
    u = torch.rand(k, generator=generator, dtype=torch.float64)
    if k == 0:
        return 0
    idx = torch.tensor(drafts, device=p.device).view(k, 1)
    pd, qd = p.gather(1, idx).view(k).cpu(), q.gather(1, idx).view(k).cpu()
    ok = (u * qd < pd).tolist()  # u < p/q without dividing (q(d) = 0 accepts whenever p(d) > 0)
    return ok.index(False) if False in ok else k
