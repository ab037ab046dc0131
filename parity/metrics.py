"""Agreement metrics between a bench tensor A (the baseline) and a device tensor B.

Everything is computed in fp64 on CPU, whatever the dtypes recorded, so the metric itself adds no
error. Conventions follow MindStudio Probe (spec/ascend.md §5.1) where it defines one, so an
Ascend user reads the same numbers msprobe prints:

- cosine similarity of the flattened tensors;
- max abs err = max |B - A|;
- max rel err = max RE with RE = |B - A| / (|A| + REL_EPS): msprobe's |N - B| / |B| with the
  bench in the denominator; REL_EPS only keeps 0/0 finite (an exact zero in A with a nonzero B
  stays a huge relative error, as in msprobe);
- "one thousandth" / "five thousandths" ratios: share of elements with RE < 0.001 / < 0.005.

Added for language models (design.md "Parity"): KL(p_A || p_B), top-1 and top-k agreement of the
logits, greedy-token agreement and the first diverging step, and an order-free set overlap for
top-k index tensors that treats entries tied at the top-k cut as interchangeable.
"""

from __future__ import annotations

import math

import torch

REL_EPS = 1e-12
TOPK = 5  # k of the logits' top-k agreement (vLLM's check_logprobs_close uses the same small k)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64).reshape(-1)


def tensor_metrics(a: torch.Tensor, b: torch.Tensor) -> dict:
    """MindStudio Probe metrics of B against A (same shape), plus what the verdict needs.

    Returns n, cosine, max_abs, max_rel, share_1e3 (RE < 0.001), share_5e3 (RE < 0.005),
    scale = max |A| and nmax = max_abs / scale (the max error on the tensor's own scale, which
    does not depend on how large a model's activations happen to be), and nonfinite = number of
    elements finite on one side only (or NaN on one side), which msprobe flags as an error.
    """
    x, y = _f64(a), _f64(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    # Elements that are the same non-finite value on both sides (e.g. -inf padding) agree exactly.
    same_nf = (~torch.isfinite(x)) & (x == y)
    one_sided = (torch.isfinite(x) != torch.isfinite(y)) | (torch.isnan(x) != torch.isnan(y))
    ok = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[ok], y[ok]
    n_all = int(ok.numel())
    out = {"n": n_all, "nonfinite": int(one_sided.sum())}
    if x.numel() == 0:
        out.update(cosine=1.0, max_abs=0.0, max_rel=0.0, share_1e3=1.0, share_5e3=1.0, scale=0.0, nmax=0.0)
        if out["nonfinite"]:
            out.update(cosine=0.0, share_1e3=0.0, share_5e3=0.0, nmax=math.inf, max_abs=math.inf, max_rel=math.inf)
        return out
    d = (y - x).abs()
    na, nb = x.norm(), y.norm()
    if na == 0 and nb == 0 or bool((d == 0).all()):
        cos = 1.0  # identical tensors: exactly 1, not 1 - (rounding of the dot product)
    elif na == 0 or nb == 0:
        cos = 0.0
    else:
        cos = float((x @ y) / (na * nb))
    rel = d / (x.abs() + REL_EPS)
    scale = float(x.abs().max())
    max_abs = float(d.max())
    # Shares count over every element, with same non-finite values as agreeing, one-sided ones as not.
    good_nf = int(same_nf.sum())
    denom = x.numel() + good_nf + out["nonfinite"]
    out.update(
        cosine=min(max(cos, -1.0), 1.0),
        max_abs=max_abs,
        max_rel=float(rel.max()),
        share_1e3=(int((rel < 1e-3).sum()) + good_nf) / denom,
        share_5e3=(int((rel < 5e-3).sum()) + good_nf) / denom,
        scale=scale,
        nmax=(max_abs / scale) if scale > 0 else (0.0 if max_abs == 0 else math.inf),
    )
    return out


def logits_metrics(a: torch.Tensor, b: torch.Tensor, k: int = TOPK) -> dict:
    """Tensor metrics of logits [P, V] plus KL(p_A || p_B) (mean over positions, fp64 softmax),
    top-1 agreement (share of positions with the same argmax) and top-k agreement (mean of
    |topk_A ∩ topk_B| / k)."""
    m = tensor_metrics(a, b)
    x, y = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    if x.shape[0] == 0:
        return {**m, "kl": 0.0, "top1": 1.0, "topk": 1.0, "k": k}
    la, lb = x.log_softmax(-1), y.log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1)
    top1 = (x.argmax(-1) == y.argmax(-1)).double().mean()
    k = min(k, x.shape[-1])
    ta, tb = x.topk(k, -1).indices, y.topk(k, -1).indices
    inter = (ta[:, :, None] == tb[:, None, :]).any(-1).double().sum(-1) / k
    return {
        **m,
        "kl": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1": float(top1),
        "topk": float(inter.mean()),
        "k": k,
    }


def greedy_metrics(a_ids: torch.Tensor, b_ids: torch.Tensor, a_logits: torch.Tensor | None = None,
                   b_logits: torch.Tensor | None = None, k: int = 2) -> dict:
    """Greedy continuations: share of equal tokens, first diverging step (None if none) and, at
    that step, whether the divergence is a near tie in vLLM's sense (each side's token is in the
    other side's top-k at that step; the logits that chose step j are row j of *_logits)."""
    a, b = a_ids.detach().cpu().long().view(-1), b_ids.detach().cpu().long().view(-1)
    n = min(a.numel(), b.numel())
    a, b = a[:n], b[:n]
    diff = (a != b).nonzero()
    first = int(diff[0]) if diff.numel() else None
    out = {"n": n, "agree": float((a == b).double().mean()) if n else 1.0, "first_divergence": first,
           "benign": None, "k": k}
    if first is not None and a_logits is not None and b_logits is not None:
        ta = a_logits[first].topk(min(k, a_logits.shape[-1])).indices
        tb = b_logits[first].topk(min(k, b_logits.shape[-1])).indices
        out["benign"] = bool((ta == b[first]).any() and (tb == a[first]).any())
    return out


def _member(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [R, K], y [R, K'] int64 -> bool [R, K]: x[r, i] >= 0 and x[r, i] occurs in row r of y."""
    if y.shape[1] == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    ys = y.sort(-1).values.contiguous()
    pos = torch.searchsorted(ys, x.contiguous()).clamp(max=ys.shape[1] - 1)
    return (ys.gather(1, pos) == x) & (x >= 0)


def differing_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bool [R]: rows whose sets of valid ids differ (ties included: a swapped pick changes what
    the token computes next, whether or not the swap was legitimate)."""
    x = a.detach().cpu().long().reshape(-1, a.shape[-1])
    y = b.detach().cpu().long().reshape(-1, b.shape[-1])
    return ((x >= 0) & ~_member(x, y)).any(1) | ((y >= 0) & ~_member(y, x)).any(1)


def set_overlap(a: torch.Tensor, b: torch.Tensor, a_scores: torch.Tensor | None = None,
                b_scores: torch.Tensor | None = None, tie_rtol: float = 0.0, tie_atol: float = 0.0) -> dict:
    """Order-free overlap of index rows ([..., K], -1 = unused slot, ignored).

    Per row: |A ∩ B| / max(|A|, |B|). With scores (the score of each pick, aligned with the ids),
    entries tied at the top-k cut are interchangeable, since devices break ties differently: an
    entry of A \\ B whose A-score is at A's cut (the row's lowest finite score, within the tie
    tolerance) can pair with an entry of B \\ A at B's cut, provided the two cuts agree within the
    tolerance. Each pair counts as matched. Pairing (rather than excusing any entry at the cut on
    its own) keeps a dropped pick (|B| < |A|) and a swap of the lowest pick for a clearly
    lower-scored entry from passing as ties.

    Returns mean (over rows where either side has an entry), min_row, rows, rows_differ (rows
    not fully matched) and ties (pairs excused as ties).
    """
    x = a.detach().cpu().long().reshape(-1, a.shape[-1] if a.dim() else 1)
    y = b.detach().cpu().long().reshape(-1, b.shape[-1] if b.dim() else 1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"row count mismatch: {x.shape[0]} vs {y.shape[0]}")
    in_b, in_a = _member(x, y), _member(y, x)
    na, nb = (x >= 0).sum(1), (y >= 0).sum(1)
    matched = in_b.sum(1)
    ties = torch.zeros_like(matched)
    if a_scores is not None and b_scores is not None and x.shape[0]:
        sa = a_scores.detach().cpu().double().reshape(x.shape)
        sb = b_scores.detach().cpu().double().reshape(y.shape)

        def cut_ties(ids, s, member):
            fin = torch.isfinite(s) & (ids >= 0)
            cut = torch.where(fin, s, torch.full_like(s, math.inf)).min(1).values
            tol = tie_rtol * cut.abs() + tie_atol
            at_cut = fin & ~member & ((s - cut[:, None]).abs() <= tol[:, None])
            return cut, at_cut.sum(1)

        cut_a, t_a = cut_ties(x, sa, in_b)
        cut_b, t_b = cut_ties(y, sb, in_a)
        both = torch.isfinite(cut_a) & torch.isfinite(cut_b)
        ca, cb = torch.where(both, cut_a, 0), torch.where(both, cut_b, 0)
        close = both & ((ca - cb).abs() <= tie_rtol * torch.maximum(ca.abs(), cb.abs()) + tie_atol)
        ties = torch.where(close, torch.minimum(t_a, t_b), torch.zeros_like(t_a))
        matched = matched + ties
    denom = torch.maximum(na, nb)
    used = denom > 0
    if not bool(used.any()):
        return {"mean": 1.0, "min_row": 1.0, "rows": int(x.shape[0]), "rows_differ": 0, "ties": 0}
    row = matched[used].double() / denom[used].double()
    return {"mean": float(row.mean()), "min_row": float(row.min()), "rows": int(x.shape[0]),
            "rows_differ": int((row < 1).sum()), "ties": int(ties.sum())}
