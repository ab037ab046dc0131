"""Score bundle B against bundle A, hook point by hook point, and name where agreement breaks.

Rows, in forward order: every hook point of every block (as the model emitted them), then the
logits, then the greedy continuation. A row is judged on its metrics pooled over all prompts;
its per-prompt metrics name the worst prompt. The first failing row in forward order is the
"first break": the place a user should look first, since everything after it sees
already-different inputs.

`indexer_scores` hooks are not rows of their own: their order follows the picks, so they only
serve to recognise picks tied at the top-k cut in the `indexer_topk` overlap.

Masking of diverged tokens: a discrete decision (the indexer's top-k picks, the MoE's expert
choice) that differs for a token is judged once, at its own index row (set overlap against the
profile; ties at the top-k cut are legitimate). From there on that token computes on different
inputs by construction, so every later hook of the same prompt (token rows of tensor and index
hooks; compressed entries whose window holds the token) is compared without it, and the row
says how many token rows it masked. Without this, one legitimate tie flip at 4K context shows
up as a large error at the next `attn.output` and would be named as the first break. Logits and
the greedy continuation are never masked: they are the answer the user sees. `mask=False`
(`dsv4 parity compare --no-mask`) compares every token everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from v4.config import CSA_RATIO

from . import metrics
from . import profiles
from .bundle import Bundle, check_comparable

INDEX_HOOKS = (".attn.indexer_topk", ".ffn.route_ids")
# Which value of a metric is the worse one (for merging noise floors).
_WORST_MIN = ("cosine", "share_1e3", "share_5e3", "top1", "topk", "mean", "min_row", "agree")
_WORST_MAX = ("max_abs", "max_rel", "nmax", "nonfinite", "kl", "kl_max", "rows_differ", "non_benign", "diverged")
AUX_HOOKS = (".attn.indexer_scores",)


@dataclass
class Row:
    name: str
    kind: str  # tensor | index | logits | greedy
    layer: int | None
    metrics: dict  # worst over prompts
    worst_prompt: int | None
    failed: list = field(default_factory=list)
    per_prompt: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed


@dataclass
class Comparison:
    a: dict  # summary of A's metadata
    b: dict
    profile: profiles.Profile
    rows: list
    notes: list
    floor_used: bool = False

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def first_break(self) -> Row | None:
        return next((r for r in self.rows if not r.passed), None)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


def hook_kind(name: str) -> str:
    return "index" if name.endswith(INDEX_HOOKS) else "tensor"


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit() else None


def _sorted_routes(ids: torch.Tensor, w: torch.Tensor):
    """Route weights in expert-id order: the order of the top-k carries no meaning."""
    order = ids.long().argsort(-1)
    return w.gather(-1, order)


def _hook_pair(A: Bundle, B: Bundle, i: int, name: str):
    """(a, b, a_scores, b_scores) of one prompt, aligned for comparison: route weights in
    expert-id order (the order of the top-k carries no meaning), indexer picks with their scores."""
    a, b = A.hook(i, name), B.hook(i, name)
    sa = sb = None
    if name.endswith(".attn.indexer_topk"):
        sname = name.replace(".indexer_topk", ".indexer_scores")
        if sname in A.hooks and sname in B.hooks:
            sa, sb = A.hook(i, sname), B.hook(i, sname)
    elif name.endswith(".ffn.route_weights"):
        rname = name.replace(".route_weights", ".route_ids")
        if rname in A.hooks and rname in B.hooks and A.hook(i, rname).shape == a.shape == B.hook(i, rname).shape:
            a, b = _sorted_routes(A.hook(i, rname), a), _sorted_routes(B.hook(i, rname), b)
    return a, b, sa, sb


def _entry_mask(tok_mask: torch.Tensor, n_entries: int, ratio: int, overlap: bool) -> torch.Tensor:
    """Compressed entries whose source tokens include a masked token: entry j pools tokens
    [j*m, (j+1)*m), and with the overlapping (CSA) compressor also [(j-1)*m, j*m)."""
    S = tok_mask.numel()
    j = torch.arange(n_entries)
    lo = (j - 1 if overlap else j).clamp(min=0) * ratio
    hi = ((j + 1) * ratio).clamp(max=S)
    csum = torch.cat([torch.zeros(1, dtype=torch.long), tok_mask.long().cumsum(0)])
    return (csum[hi] - csum[lo]) > 0


def _apply_mask(name: str, pair, tok_mask: torch.Tensor, cfg: dict):
    """Drop masked rows from one prompt's (a, b, sa, sb). Returns (pair, rows dropped)."""
    a, b, sa, sb = pair
    if not bool(tok_mask.any()) or a.shape != b.shape or a.dim() == 0:
        return pair, 0
    S = tok_mask.numel()
    if name.endswith(".attn.compressed"):
        layer = _layer(name)
        ratio = int(cfg["compress_ratios"][layer])
        keep = ~_entry_mask(tok_mask, a.shape[0], ratio, ratio == CSA_RATIO)
    elif a.shape[0] == S:
        keep = ~tok_mask
    else:
        return pair, 0
    pick = lambda t: None if t is None else t[keep]  # noqa: E731
    return (a[keep], b[keep], pick(sa), pick(sb)), int((~keep).sum())


def _metrics(kind: str, a, b, sa, sb, prof: profiles.Profile) -> dict:
    if a.shape != b.shape:
        return {"shape_mismatch": True, "shape_a": list(a.shape), "shape_b": list(b.shape)}
    if kind == "index":
        return metrics.set_overlap(a, b, sa, sb, tie_rtol=prof.tie_rtol if sa is not None else 0.0)
    if kind == "logits":
        return metrics.logits_metrics(a, b)
    return metrics.tensor_metrics(a, b)


def _pooled(kind: str, pairs: list, prof: profiles.Profile) -> dict:
    """Metrics over every prompt at once (rows / elements of all prompts concatenated)."""
    bad = next((p for p in pairs if p[0].shape != p[1].shape), None)
    if bad is not None:
        return _metrics(kind, bad[0], bad[1], None, None, prof)
    if kind == "tensor":
        a = torch.cat([p[0].reshape(-1) for p in pairs])
        b = torch.cat([p[1].reshape(-1) for p in pairs])
        return metrics.tensor_metrics(a, b)
    pairs = [p for p in pairs if p[0].numel()] or pairs[:1]  # index rows are [S, K]: cat along S
    a = torch.cat([p[0] for p in pairs])
    b = torch.cat([p[1] for p in pairs])
    sa = sb = None
    if all(p[2] is not None for p in pairs):
        sa, sb = torch.cat([p[2] for p in pairs]), torch.cat([p[3] for p in pairs])
    return _metrics(kind, a, b, sa, sb, prof)


def _worst_prompt(kind: str, per: list) -> int | None:
    if not per:
        return None
    for i, m in enumerate(per):
        if m.get("shape_mismatch"):
            return i
    if kind in ("tensor", "logits"):
        return min(range(len(per)), key=lambda i: (per[i]["cosine"], -per[i]["nmax"]))
    if kind == "index":
        return min(range(len(per)), key=lambda i: (per[i]["mean"], per[i]["min_row"]))
    divs = [i for i, m in enumerate(per) if m["first_divergence"] is not None]
    if not divs:
        return None
    return min(divs, key=lambda i: (bool(per[i]["benign"]), per[i]["first_divergence"]))


def _greedy_pooled(per: list) -> dict:
    n = sum(m["n"] for m in per)
    divs = [m for m in per if m["first_divergence"] is not None]
    return {"n": n, "prompts": len(per), "agree": sum(m["agree"] * m["n"] for m in per) / max(n, 1),
            "first_divergence": min((m["first_divergence"] for m in divs), default=None),
            "diverged": len(divs), "non_benign": sum(1 for m in divs if not m["benign"]),
            "k": per[0]["k"] if per else None}


def compare(A: Bundle, B: Bundle, profile: profiles.Profile | str | None = None, floor: "Comparison | None" = None,
            mask: bool = True) -> Comparison:
    """B scored against A. Raises NotComparable (exit 2) when they cannot be compared. `floor`:
    a comparison of B (or A) against a second recording of itself, for the noise floor.

    Each row is judged on its metrics pooled over all prompts (elements / rows / positions of
    every prompt together, as msprobe scores a whole dump): one routing flip on a 3-token prompt
    is a local event, not a broken layer. The per-prompt metrics stay in the row (and the
    report) and name the worst prompt."""
    notes = check_comparable(A, B)
    if profile is None:
        prof = profiles.default_for(A.meta["dtype"], B.meta["dtype"], B.meta["mode"])
    elif isinstance(profile, str):
        prof = profiles.get(profile)
    else:
        prof = profile
    hooks = [h for h in A.hooks if h in B.hooks and not h.endswith(AUX_HOOKS)]
    n = A.num_prompts
    cfg = A.meta["model"]["config"]
    tok_masks = [torch.zeros(A.t(i, "input_ids").numel(), dtype=torch.bool) for i in range(n)]
    max_pos = max((m.numel() - 1 for m in tok_masks), default=0)  # for the profiles' rope allowance
    rows = []
    for name in hooks:
        kind = hook_kind(name)
        raw = [_hook_pair(A, B, i, name) for i in range(n)]
        pairs, masked = raw, 0
        if mask:
            cut = [_apply_mask(name, p, tok_masks[i], cfg) for i, p in enumerate(raw)]
            pairs, masked = [c[0] for c in cut], sum(c[1] for c in cut)
        per = [_metrics(kind, *p, prof) for p in pairs]
        pooled = _pooled(kind, pairs, prof)
        pooled["masked"] = masked
        pooled["max_pos"] = max_pos
        rows.append(Row(name, kind, _layer(name), pooled, _worst_prompt(kind, per), per_prompt=per))
        if mask and kind == "index":
            for i, (a, b, _, _) in enumerate(raw):
                if a.shape == b.shape and a.dim() == 2 and a.shape[0] == tok_masks[i].numel():
                    tok_masks[i] |= metrics.differing_rows(a, b)
    pairs = [(A.t(i, "logits"), B.t(i, "logits"), None, None) for i in range(n)]
    per = [_metrics("logits", *p, prof) for p in pairs]
    pooled = _pooled("logits", pairs, prof)
    pooled["max_pos"] = max_pos
    rows.append(Row("logits", "logits", None, pooled, _worst_prompt("logits", per), per_prompt=per))
    per = [
        metrics.greedy_metrics(
            A.t(i, "greedy_ids"),
            B.t(i, "greedy_ids"),
            A.t(i, "greedy_logits"),
            B.t(i, "greedy_logits"),
            k=max(prof.greedy_topk, 1),
        )
        for i in range(n)
    ]
    rows.append(Row("greedy", "greedy", None, _greedy_pooled(per), _worst_prompt("greedy", per), per_prompt=per))
    fl = {r.name: r.metrics for r in floor.rows} if floor is not None else {}
    for r in rows:
        r.failed = profiles.judge(r.kind, r.metrics, prof, fl.get(r.name))
    return Comparison(summary(A), summary(B), prof, rows, notes, floor_used=floor is not None)


def summary(b: Bundle) -> dict:
    m = b.meta
    return {"path": b.path, "backend": m["backend"]["name"], "device": m["backend"].get("device"),
            "device_name": m["backend"].get("device_name"), "dtype": m["dtype"], "mode": m["mode"],
            "model": m["model"].get("name"), "suite": m.get("suite"), "prompts": b.num_prompts,
            "weights": m["weights"], "versions": m.get("versions", {}), "created": m.get("created")}


def merge_floors(*comps: "Comparison | None") -> "Comparison | None":
    """Per row, the worse of several floor comparisons (e.g. A vs A' and B vs B')."""
    comps = [c for c in comps if c is not None]
    if not comps:
        return None
    rows = []
    for r in comps[0].rows:
        ms = [r.metrics] + [x.metrics for c in comps[1:] for x in c.rows if x.name == r.name]
        m = dict(ms[0])
        for k in _WORST_MIN:
            if k in m:
                m[k] = min(x[k] for x in ms)
        for k in _WORST_MAX:
            if k in m:
                m[k] = max(x[k] for x in ms)
        if r.kind == "greedy":
            divs = [x["first_divergence"] for x in ms if x["first_divergence"] is not None]
            m["first_divergence"] = min(divs) if divs else None
        rows.append(Row(r.name, r.kind, r.layer, m, None))
    return Comparison(comps[0].a, comps[0].b, comps[0].profile, rows, [])
