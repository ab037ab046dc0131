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

from backends.conformance import CASES
from backends.reference.ops import ReferenceOps
from v4.ops import DecodeRows, acc
from . import metrics
from . import profiles

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
            return t.double(), t.to(self.dev, self.dt)
        if role == "acc":
            return t.double(), t.to(self.dev, acc(self.dt))
        if role == "W":
            return self.ref.prepare_linear(t, torch.float64), self.ops.prepare_linear(t.float(), self.dt)
        raise ValueError(role)


# ---------------------------------------------------------------------------------------- cases
def _op_cases(op: str, seed: int, mode: str):
    """(case name, args as [(role, value)], kwargs, comparator) for each case of the op in the one
    conformance case set (backends/conformance/, read by the tests and the benches too); the
    comparator turns (truth outputs, B outputs, truth inputs) into metrics."""
    for case in CASES[op]:
        args, kwargs = case.inputs(seed, mode)
        yield case.name, args, kwargs, case.kind


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
    for op in backends.OP_NAMES:
        impl = getattr(ops, "impl", {}).get(op, backend)
        res = OpResult(op, impl)
        results.append(res)
        if impl != ops.name and backend != "reference":
            continue  # filled from reference: nothing of B's to check (listed as SKIP)
        worst_t, worst_i = None, None
        for case, args, kwargs, kind in _op_cases(op, seed, mode):
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
                worse = worst_i is None or m["mean"] < worst_i["mean"] or m["min_row"] < worst_i["min_row"]
                worst_i = m if worse else worst_i
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
    lines = [f"ops of backend {r.backend} in {r.dtype} ({r.mode}) vs reference in float64, "
             f"profile {r.profile.name}", ""]
    lines += ["  ".join(s.ljust(w[k]) for k, s in enumerate(row)).rstrip() for row in rows[:1]]
    lines.append("  ".join("-" * x for x in w))
    lines += ["  ".join(s.ljust(w[k]) for k, s in enumerate(row)).rstrip() for row in rows[1:]]
    lines += ["", f"verdict: {'PASS' if r.passed else 'FAIL'}"]
    return "\n".join(lines)
