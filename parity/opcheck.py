"""`dsv4 parity ops`: every op of the op set on fresh random inputs at boundary shapes, backend B
in its dtype against `reference` in float64 (the ground truth), with the same metrics and
profiles as the model-level comparison.

Inputs are drawn in float64 and handed to each side in the dtype the model would hand them
(`D` = the working dtype, `acc` = float32, or float64 in a float64 run, `W` = a weight brought
into the backend's form by its own `prepare_linear`), so an op's error includes the rounding of
its inputs to the working dtype, as in a real run.

Boundary shapes: token counts 1, 3, 4, 5, 127, 128, 129; compressor windows that close exactly
at the step's last token, one token after, and a step that starts mid-window; an empty
compressed pool; an indexer top-k larger than the pool; -1 indices in every index input;
several sequences in one packed call; the compressor's decode form (`DecodeRows`, one token per
sequence, the layout a captured decode step passes). Index outputs (indexer top-k, MoE expert ids) are scored
by set overlap; a pick counts as matched when its true (float64) score ties the true cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from backends.reference.ops import ReferenceOps
from v4.ops import CompressSpec, DecodeRows, acc
from . import metrics
from . import profiles

LENGTHS = (1, 3, 4, 5, 127, 128, 129)
H, HD, ROPE, DM, NHC = 4, 128, 64, 64, 4  # heads, head dim, rope dims, hidden, mHC streams


@dataclass
class OpResult:
    op: str
    implemented_by: str
    cases: int = 0
    tensor: dict | None = None  # worst tensor metrics over cases and outputs
    index: dict | None = None  # worst set overlap
    failed: list = field(default_factory=list)
    worst_case: str = ""

    @property
    def passed(self) -> bool:
        return not self.failed


@dataclass
class OpsReport:
    backend: str
    dtype: str
    mode: str
    profile: profiles.Profile
    results: list

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)


class _Sides:
    """Casts float64 inputs for the truth (reference, float64) and for backend B (its dtype)."""

    def __init__(self, ops, dtype: torch.dtype, ref: ReferenceOps):
        self.ops, self.dt, self.ref = ops, dtype, ref
        self.dev = getattr(ops, "device", torch.device("cpu"))

    def pair(self, role: str, t):
        """role D / acc / W / raw -> (truth input, B input)."""
        if t is None or role == "raw":
            return t, (t.to(self.dev) if isinstance(t, torch.Tensor) else t)
        if role == "D":
            return t, t.to(self.dev, self.dt)
        if role == "acc":
            return t, t.to(self.dev, acc(self.dt))
        if role == "W":
            return self.ref.prepare_linear(t, torch.float64), self.ops.prepare_linear(t.float(), self.dt)
        raise ValueError(role)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * std


# ---------------------------------------------------------------------------------------- cases
# Each case builder yields (case name, args as [(role, value)], kwargs, comparator name); the
# comparator turns (truth outputs, B outputs, truth inputs) into metrics.

def _cases_rms_norm(g, mode):
    for T in LENGTHS:
        yield f"T={T}", [("D", _randn(g, T, DM) * 3), ("acc", 1 + _randn(g, DM, std=0.1)), ("raw", 1e-6)], {}, "tensor"
    yield "T=5,no weight", [("D", _randn(g, 5, H, HD)), ("raw", None), ("raw", 1e-6)], {}, "tensor"


def _inv_freq():
    from v4.config import yarn_inv_freq

    return yarn_inv_freq(ROPE, 160000.0, {"factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1})


def _cases_rope(g, mode):
    for T in LENGTHS:
        for inverse in (False, True):
            pos = torch.arange(T) + int(torch.randint(0, 5000, (1,), generator=g))
            yield (f"T={T},{'inverse' if inverse else 'forward'}",
                   [("D", _randn(g, T, H, HD)), ("raw", pos), ("acc", _inv_freq())], {"inverse": inverse}, "tensor")


def _cases_linear(g, mode):
    for T in LENGTHS:
        yield f"T={T}", [("D", _randn(g, T, DM)), ("W", _randn(g, 96, DM, std=DM ** -0.5))], {"act_quant": mode == "exact"}, "tensor"


def _cases_grouped_out_proj(g, mode):
    G, R = 2, 16
    for T in LENGTHS:
        yield (f"T={T}", [("D", _randn(g, T, H * HD)), ("W", _randn(g, G * R, H * HD // G, std=(H * HD // G) ** -0.5)),
                          ("W", _randn(g, DM, G * R, std=(G * R) ** -0.5)), ("raw", G)], {"act_quant": mode == "exact"}, "tensor")


def _hc_params(g, rows):
    return [("acc", _randn(g, rows, NHC * DM, std=(NHC * DM) ** -0.5)), ("acc", _randn(g, rows, std=0.1))]


def _cases_hc_pre(g, mode):
    for T in LENGTHS:
        fn, base = _hc_params(g, (2 + NHC) * NHC)
        yield (f"T={T}", [("D", _randn(g, T, NHC, DM)), fn, base, ("acc", 1 + _randn(g, 3, std=0.1)),
                          ("raw", 20), ("raw", 1e-6), ("raw", 1e-6)], {}, "tensor")


def _cases_hc_post(g, mode):
    for T in LENGTHS:
        comb = torch.softmax(_randn(g, T, NHC, NHC), -1)
        yield (f"T={T}", [("D", _randn(g, T, DM)), ("D", _randn(g, T, NHC, DM)), ("acc", 2 * torch.sigmoid(_randn(g, T, NHC))),
                          ("acc", comb)], {}, "tensor")


def _cases_hc_head(g, mode):
    for T in LENGTHS:
        fn, base = _hc_params(g, NHC)
        yield (f"T={T}", [("D", _randn(g, T, NHC, DM)), fn, base, ("acc", 1 + _randn(g, 1, std=0.1)),
                          ("raw", 1e-6), ("raw", 1e-6)], {}, "tensor")


def _cases_compress(g, mode):
    """Per case: a list of sequences (start, n) in one packed call, with random partial-window
    state for sequences that start mid-window."""
    bs = 16  # pool block size: 129 tokens at ratio 4 = 32 entries span 2 blocks
    plans = [[(0, T)] for T in LENGTHS] + [
        [(3, 1)],  # the window closes at this step's only token
        [(4, 1)],  # one token after a close: nothing emitted
        [(6, 7)],  # starts mid-window, closes one, leaves a partial one
        [(0, 1), (15, 1), (2, 129), (0, 5)],  # several sequences in one packed call
    ]
    quant = {"overlap": "fp4" if mode == "exact" else "none", "plain": "fp8" if mode == "exact" else "none"}
    for m, overlap in ((4, True), (16, False), (128, False)):
        for seqs in plans:
            if m == 128 and max(s + n for s, n in seqs) < 100:
                continue  # ratio 128 only matters where a window can close
            k = 2 if overlap else 1
            c = HD
            slots = len(seqs)
            T = sum(n for _, n in seqs)
            max_e = max((s + n) // m for s, n in seqs) + 1
            nb = -(-max_e // bs)
            table = torch.arange(slots * nb, dtype=torch.int32).view(slots, nb).flip(1).contiguous()  # non-trivial paging
            state_kv, state_score = torch.zeros(slots, k * m, k * c, dtype=torch.float64), torch.zeros(slots, k * m, k * c, dtype=torch.float64)
            for slot, (s, _) in enumerate(seqs):
                state_kv[slot] = _randn(g, k * m, k * c)
                state_score[slot] = _randn(g, k * m, k * c)
            packed, off = [], 0
            for slot, (s, n) in enumerate(seqs):
                packed.append((slot, s, n, off))
                off += n
            spec = CompressSpec(m, c, overlap, quant["overlap" if overlap else "plain"], ROPE, 1e-6)
            name = f"m={m},seqs={[(s, n) for s, n in seqs]}"
            yield (name, [("acc", _randn(g, T, k * c)), ("acc", _randn(g, T, k * c)), ("acc", _randn(g, m, k * c, std=0.1)),
                          ("raw", spec), ("acc", 1 + _randn(g, c, std=0.1)), ("acc", _inv_freq()), ("acc", state_kv),
                          ("acc", state_score), ("D", torch.zeros(slots * nb, bs, c, dtype=torch.float64)), ("raw", table),
                          ("raw", packed)], {}, "compress")
        # decode form (DecodeRows, what a captured decode step passes): one token per sequence, the
        # first window closing, a sequence's first token, a later window closing, mid-window
        k = 2 if overlap else 1
        pos = [m - 1, 0, 5 * m + m - 1, 3 * m + 1]
        slots = len(pos)
        nb = -(-(max(pos) // m + 1) // bs)
        table = torch.arange(slots * nb, dtype=torch.int32).view(slots, nb).flip(1).contiguous()
        spec = CompressSpec(m, HD, overlap, quant["overlap" if overlap else "plain"], ROPE, 1e-6)
        yield (f"m={m},decode rows at {pos}",
               [("acc", _randn(g, slots, k * HD)), ("acc", _randn(g, slots, k * HD)), ("acc", _randn(g, m, k * HD, std=0.1)),
                ("raw", spec), ("acc", 1 + _randn(g, HD, std=0.1)), ("acc", _inv_freq()),
                ("acc", _randn(g, slots, k * m, k * HD)), ("acc", _randn(g, slots, k * m, k * HD)),
                ("D", torch.zeros(slots * nb, bs, HD, dtype=torch.float64)), ("raw", table),
                ("rows", DecodeRows(torch.tensor([2, 0, 3, 1]), torch.tensor([pos[2], pos[0], pos[3], pos[1]])))],
               {}, "compress")


def _cases_indexer_topk(g, mode):
    Hi, Di, bs = 8, 128, 16
    for T, start, topk, m in [(1, 0, 4, 4), (3, 0, 4, 4), (4, 0, 4, 4), (5, 0, 4, 4), (5, 0, 8, 4),
                              (127, 0, 8, 4), (128, 0, 8, 4), (129, 0, 8, 4), (1, 128, 16, 4), (3, 1, 4, 4),
                              (129, 0, 4, 128), (17, 0, 2, 16)]:
        # one sequence, positions start .. start+T-1; pool filled for every entry that may be visible
        n_ent = (start + T) // m
        nb = max(1, -(-n_ent // bs))
        table = torch.arange(nb, dtype=torch.int32).flip(0).view(1, nb).contiguous()
        pos = torch.arange(start, start + T)
        name = f"T={T},start={start},topk={topk},ratio={m},entries={n_ent}" + (" (empty pool)" if n_ent == 0 else "")
        yield (name, [("D", _randn(g, T, Hi, Di)), ("acc", _randn(g, T, Hi, std=(Di * Hi) ** -0.5)), ("D", _randn(g, nb, bs, Di)),
                      ("raw", table), ("raw", torch.zeros(T, dtype=torch.long)), ("raw", pos), ("raw", m), ("raw", topk)],
               {}, "indexer")
    # two sequences packed in one call
    T1, T2 = 5, 129
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    yield ("two sequences T=5,129", [("D", _randn(g, T1 + T2, Hi, Di)), ("acc", _randn(g, T1 + T2, Hi, std=(Di * Hi) ** -0.5)),
                                     ("D", _randn(g, 4, bs, Di)), ("raw", table),
                                     ("raw", torch.cat([torch.zeros(T1, dtype=torch.long), torch.ones(T2, dtype=torch.long)])),
                                     ("raw", torch.cat([torch.arange(T1), torch.arange(T2)])), ("raw", 4), ("raw", 8)], {}, "indexer")


def _cases_attention(g, mode):
    W = 16
    for T in LENGTHS:
        for comp in ("none", "some", "empty"):
            pos = torch.arange(T)
            p = pos[:, None] - torch.arange(W)[None, :]
            widx = torch.where(p >= 0, p, -1).to(torch.int32)  # the window just closed / is still filling
            Nc = 40
            if comp == "none":
                cidx, ckv = None, None
            elif comp == "empty":
                cidx, ckv = torch.full((T, 4), -1, dtype=torch.int32), _randn(g, Nc, HD)
            else:
                cidx = torch.randint(0, Nc, (T, 8), generator=g, dtype=torch.int32)
                cidx[torch.rand(T, 8, generator=g) < 0.3] = -1
                ckv = _randn(g, Nc, HD)
            yield (f"T={T},compressed={comp}", [("D", _randn(g, T, H, HD)), ("D", _randn(g, T, HD)), ("raw", widx),
                                                ("D", ckv), ("raw", cidx), ("acc", _randn(g, H)), ("raw", HD ** -0.5)], {}, "tensor")


def _cases_moe_gate(g, mode):
    E, k, V = 8, 2, 512
    for T in LENGTHS:
        for hashed in (False, True):
            ids = torch.randint(0, V, (T,), generator=g)
            tid2eid = torch.argsort(torch.rand(V, E, generator=g), 1)[:, :k].contiguous() if hashed else None
            yield (f"T={T},{'hash' if hashed else 'bias top-k'}",
                   [("D", _randn(g, T, DM)), ("acc", _randn(g, E, DM, std=DM ** -0.5)), ("acc", None if hashed else _randn(g, E, std=0.1)),
                    ("raw", tid2eid), ("raw", ids), ("raw", k), ("raw", 1.5)], {}, "gate")


def _cases_moe_experts(g, mode):
    E, k, I = 8, 2, 64
    for T in LENGTHS:
        for shared in (True, False):
            ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
            w = torch.softmax(_randn(g, T, k), -1) * 1.5
            # per-expert stored weights (W1, W3 [I, D], W2 [D, I]), brought into each backend's
            # form by its own prepare_experts, as the model does
            routed = ([_randn(g, I, DM, std=DM ** -0.5) for _ in range(E)], [_randn(g, I, DM, std=DM ** -0.5) for _ in range(E)],
                      [_randn(g, DM, I, std=I ** -0.5) for _ in range(E)])
            sh = ([_randn(g, I, DM, std=DM ** -0.5)], [_randn(g, I, DM, std=DM ** -0.5)], [_randn(g, DM, I, std=I ** -0.5)]) if shared else None
            yield (f"T={T},{'shared' if shared else 'no shared'}",
                   [("D", _randn(g, T, DM) * 2), ("raw", ids), ("acc", w), ("experts", routed), ("shared", sh),
                    ("raw", 10.0)], {"act_quant": mode == "exact"}, "tensor")


CASES = {
    "rms_norm": _cases_rms_norm, "rope": _cases_rope, "hc_pre": _cases_hc_pre, "hc_post": _cases_hc_post,
    "hc_head": _cases_hc_head, "compress": _cases_compress, "indexer_topk": _cases_indexer_topk,
    "attention": _cases_attention, "moe_gate": _cases_moe_gate, "moe_experts": _cases_moe_experts,
    "linear": _cases_linear, "grouped_out_proj": _cases_grouped_out_proj,
}


# ---------------------------------------------------------------------------------------- running
def _prepare(sides: _Sides, args):
    """Inputs for the truth and for B. `experts` expands to two arguments (W13, W2), `shared` to
    one (the shared expert's (W13, W2) or None), each from the side's own prepare_experts."""
    truth, mine = [], []
    for role, v in args:
        if role == "experts":
            w1s, w3s, w2s = v
            truth += list(sides.ref.prepare_experts(w1s, w3s, w2s, torch.float64))
            mine += list(sides.ops.prepare_experts([x.float() for x in w1s], [x.float() for x in w3s],
                                                   [x.float() for x in w2s], sides.dt))
        elif role == "shared":
            if v is None:
                truth.append(None)
                mine.append(None)
            else:
                t13, t2 = sides.ref.prepare_experts(*v, torch.float64)
                m13, m2 = sides.ops.prepare_experts(*[[x.float() for x in part] for part in v], sides.dt)
                truth.append((t13[0], t2[0]))
                mine.append((m13[0], m2[0]))
        elif role == "rows":  # DecodeRows: the layout lives on each side's device
            truth.append(v)
            mine.append(DecodeRows(v.slots.to(sides.dev), v.positions.to(sides.dev)))
        elif role == "raw" and isinstance(v, torch.Tensor):
            truth.append(v.clone())
            mine.append(v.clone().to(sides.dev))
        else:
            a, b = sides.pair(role, v)
            truth.append(a.clone() if isinstance(a, torch.Tensor) else a)
            mine.append(b.clone() if isinstance(b, torch.Tensor) and b is v else b)
    return truth, mine


def _outputs(x) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _indexer_true_scores(truth_args, ids):
    """float64 score of each pick (-inf for -1), from the truth inputs."""
    q, w, pool, table, tok_slot, _pos, _m, _k = truth_args
    bs, d = pool.shape[1], pool.shape[2]
    j = ids.long().clamp(min=0)
    phys = table[tok_slot[:, None], j // bs].long() * bs + j % bs
    keys = pool.reshape(-1, d)[phys]
    s = (torch.relu(torch.einsum("thd,tkd->thk", q, keys)) * w.unsqueeze(-1)).sum(1)
    return s.masked_fill(ids < 0, float("-inf"))


def _gate_true_scores(truth_args, ids):
    x, weight, bias, tid2eid, *_ = truth_args
    s = torch.sqrt(torch.nn.functional.softplus(x @ weight.t()))
    sel = s + bias if bias is not None else s
    return sel.gather(1, ids.long())


def _compare_case(kind, truth_out, mine_out, truth_args, mine_args, prof):
    """-> (list of tensor metrics, list of index metrics)."""
    tens, idx = [], []
    if kind == "tensor":
        for a, b in zip(_outputs(truth_out), _outputs(mine_out)):
            tens.append(metrics.tensor_metrics(a, b))
    elif kind == "compress":
        tens.append(metrics.tensor_metrics(truth_out, mine_out))
        for k in (6, 7, 8):  # state_kv, state_score, pool after the call
            tens.append(metrics.tensor_metrics(truth_args[k], mine_args[k]))
    elif kind == "indexer":
        a, b = truth_out.cpu(), mine_out.cpu()
        idx.append(metrics.set_overlap(a, b, _indexer_true_scores(truth_args, a), _indexer_true_scores(truth_args, b),
                                 tie_rtol=prof.tie_rtol, tie_atol=1e-12))
    elif kind == "gate":
        (wa, ia), (wb, ib) = truth_out, (mine_out[0].cpu(), mine_out[1].cpu())
        idx.append(metrics.set_overlap(ia, ib, _gate_true_scores(truth_args, ia), _gate_true_scores(truth_args, ib),
                                 tie_rtol=prof.tie_rtol, tie_atol=1e-12))
        if torch.equal(ia.long().sort(-1).values, ib.long().sort(-1).values):
            oa, ob = ia.long().argsort(-1), ib.long().argsort(-1)
            tens.append(metrics.tensor_metrics(wa.gather(1, oa), wb.gather(1, ob)))
    return tens, idx


def run(backend: str = "reference", dtype: str = "float32", mode: str = "plain", device: str | None = None,
        seed: int = 0, profile: str | None = None) -> OpsReport:
    import backends
    from v4.runtime import DTYPES

    ops = backends.get_ops(backend, device, True, mode, dtype)  # fallback only to name what B lacks
    dt = DTYPES[dtype]
    prof = profiles.get(profile) if profile else profiles.default_for("float64", dtype, mode)
    ref = ReferenceOps("cpu")
    sides = _Sides(ops, dt, ref)
    results = []
    for k, op in enumerate(backends.OP_NAMES):
        impl = getattr(ops, "impl", {}).get(op, backend)
        res = OpResult(op, impl)
        results.append(res)
        if impl != ops.name and backend != "reference":
            continue  # filled from reference: nothing of B's to check (listed as SKIP)
        g = _g(seed * 1000 + k)
        worst_t, worst_i = None, None
        for case, args, kwargs, kind in CASES[op](g, mode):
            truth_args, mine_args = _prepare(sides, args)
            with torch.no_grad():
                truth_out = getattr(ref, op)(*truth_args, **kwargs)
                mine_out = getattr(ops, op)(*mine_args, **kwargs)
            tens, idx = _compare_case(kind, truth_out, mine_out, truth_args, mine_args, prof)
            res.cases += 1
            for m in tens:
                m["max_pos"] = _max_pos(op, truth_args)
                f = profiles.judge("tensor", m, prof)
                if worst_t is None or m["cosine"] < worst_t["cosine"] or m["nmax"] > worst_t["nmax"]:
                    worst_t = _merge_worst(worst_t, m)
                if f and not res.failed:
                    res.failed, res.worst_case = f, case
            for m in idx:
                f = profiles.judge("index", m, prof)
                worst_i = m if worst_i is None or m["mean"] < worst_i["mean"] or m["min_row"] < worst_i["min_row"] else worst_i
                if f and not res.failed:
                    res.failed, res.worst_case = f, case
        res.tensor, res.index = worst_t, worst_i
    return OpsReport(backend, dtype, mode, prof, results)


def _max_pos(op: str, args) -> int:
    """Largest token position a case covers (the profiles' rope allowance grows with it)."""
    if op == "rope":
        return int(args[1].max())
    if op == "compress":
        if isinstance(args[10], DecodeRows):
            return int(args[10].positions.max()) + 1
        return max(s + n for _, s, n, _ in args[10])
    if op == "indexer_topk":
        return int(args[5].max())
    return 0


def _merge_worst(w, m):
    if w is None:
        return dict(m)
    out = dict(w)
    for k in ("cosine", "share_1e3", "share_5e3"):
        out[k] = min(w[k], m[k])
    for k in ("max_abs", "max_rel", "nmax", "nonfinite"):
        out[k] = max(w[k], m[k])
    return out


def render(r: OpsReport) -> str:
    from .report import _cos, _g as g

    head = ["op", "by", "cases", "cosine", "max abs", "max rel", "<0.1%", "<0.5%", "index overlap", "verdict"]
    rows = [head]
    for x in r.results:
        t, i = x.tensor, x.index
        if x.cases == 0:
            verdict = "SKIP (not implemented by this backend)"
        else:
            verdict = "PASS" if x.passed else f"FAIL {','.join(x.failed)} ({x.worst_case})"
        rows.append([x.op, x.implemented_by, str(x.cases),
                     _cos(t["cosine"]) if t else "-", g(t["max_abs"]) if t else "-", g(t["max_rel"]) if t else "-",
                     f"{t['share_1e3']:.4f}" if t else "-", f"{t['share_5e3']:.4f}" if t else "-",
                     f"{i['mean']:.4f} worst row {i['min_row']:.2f}" if i else "-", verdict])
    w = [max(len(row[k]) for row in rows) for k in range(len(head))]
    lines = [f"ops of backend {r.backend} in {r.dtype} ({r.mode}) vs reference in float64, profile {r.profile.name}", ""]
    lines += ["  ".join(s.ljust(w[k]) for k, s in enumerate(row)).rstrip() for row in rows[:1]]
    lines.append("  ".join("-" * x for x in w))
    lines += ["  ".join(s.ljust(w[k]) for k, s in enumerate(row)).rstrip() for row in rows[1:]]
    lines += ["", f"verdict: {'PASS' if r.passed else 'FAIL'}"]
    return "\n".join(lines)
