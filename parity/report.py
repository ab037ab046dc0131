"""Verdict table (terminal), report.json, report.md and per_layer.png (when matplotlib is there)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .compare import Comparison, Row

HEAD = ("hook", "cosine", "max abs", "max rel", "<0.1%", "<0.5%", "extra", "verdict")


def _g(x, digits=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    return f"{x:.{digits}e}" if x != 0 else "0"


def _cos(x) -> str:
    # Near 1 the interesting digits are in 1 - cos: "1-3.2e-09" reads better than 0.9999999968.
    if x is None:
        return "-"
    if x == 1.0:
        return "1"
    if x > 0.9999:
        return f"1-{1 - x:.1e}"
    return f"{x:.6f}"


def _extra(r: Row) -> str:
    m = r.metrics
    if m.get("shape_mismatch"):
        return f"shape {m['shape_a']} vs {m['shape_b']}"
    masked = f", {m['masked']} masked" if m.get("masked") else ""
    if r.kind == "index":
        s = f"overlap {m['mean']:.4f} worst row {m['min_row']:.2f}"
        if m.get("ties"):
            s += f" ({m['ties']} ties)"
        return s + masked
    if r.kind == "logits":
        return f"KL {_g(m['kl'])} top1 {m['top1']:.4f} top{m['k']} {m['topk']:.4f}"
    if r.kind == "greedy":
        if m["first_divergence"] is None:
            return f"{m['n']} tokens agree"
        return (f"agree {m['agree']:.3f}; {m['diverged']}/{m['prompts']} prompts diverge, first at step "
                f"{m['first_divergence']}; {m['non_benign']} not at a near tie (top-{m['k']})")
    return f"nmax {_g(m['nmax'])}{masked}" if m else ""


def _cells(r: Row) -> list:
    m = r.metrics
    tensorish = r.kind in ("tensor", "logits") and not m.get("shape_mismatch")
    verdict = "PASS" if r.passed else "FAIL " + ",".join(r.failed)
    if tensorish:
        return [r.name, _cos(m["cosine"]), _g(m["max_abs"]), _g(m["max_rel"]), f"{m['share_1e3']:.4f}",
                f"{m['share_5e3']:.4f}", _extra(r), verdict]
    return [r.name, "-", "-", "-", "-", "-", _extra(r), verdict]


def table(c: Comparison) -> str:
    rows = [list(HEAD)] + [_cells(r) for r in c.rows]
    w = [max(len(row[k]) for row in rows) for k in range(len(HEAD))]
    fmt = lambda row: "  ".join(s.ljust(w[k]) for k, s in enumerate(row)).rstrip()  # noqa: E731
    lines = [fmt(rows[0]), "  ".join("-" * x for x in w)] + [fmt(r) for r in rows[1:]]
    return "\n".join(lines)


def headline(c: Comparison) -> str:
    a, b = c.a, c.b
    return (f"A: {a['backend']}/{a['dtype']}/{a['mode']} on {a['device_name']} ({a['path']})\n"
            f"B: {b['backend']}/{b['dtype']}/{b['mode']} on {b['device_name']} ({b['path']})\n"
            f"model {a['model']}, {a['prompts']} prompts, profile {c.profile.name}"
            + (", judged against the measured noise floor" if c.floor_used else ""))


def first_break_line(c: Comparison) -> str:
    fb = c.first_break
    if fb is None:
        return "all hook points agree"
    where = f" (prompt {fb.worst_prompt})" if fb.worst_prompt is not None else ""
    return f"first break: {fb.name}{where}"


def verdict_line(c: Comparison) -> str:
    return f"verdict: {'PASS' if c.passed else 'FAIL'} (profile {c.profile.name})"


def render(c: Comparison) -> str:
    parts = [headline(c)] + [f"note: {n}" for n in c.notes] + ["", table(c), "", first_break_line(c), verdict_line(c)]
    return "\n".join(parts)


def _clean(x):
    """JSON-safe: inf/nan become strings, tuples lists."""
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(c: Comparison) -> dict:
    fb = c.first_break
    return _clean({
        "verdict": "pass" if c.passed else "fail",
        "exit_code": c.exit_code,
        "first_break": None if fb is None else {"hook": fb.name, "prompt": fb.worst_prompt, "failed": fb.failed},
        "profile": c.profile.__dict__,
        "floor_used": c.floor_used,
        "a": c.a, "b": c.b, "notes": c.notes,
        "rows": [{"hook": r.name, "kind": r.kind, "layer": r.layer, "pass": r.passed, "failed": r.failed,
                  "worst_prompt": r.worst_prompt, "metrics": r.metrics, "per_prompt": r.per_prompt} for r in c.rows],
    })


def to_markdown(c: Comparison) -> str:
    lines = [f"# Parity report: {c.b['backend']}/{c.b['dtype']} vs {c.a['backend']}/{c.a['dtype']}", "",
             f"**{verdict_line(c)}** — {first_break_line(c)}", ""]
    for side, s in (("A (baseline)", c.a), ("B (scored)", c.b)):
        lines.append(f"- {side}: `{s['backend']}` {s['dtype']} {s['mode']} on {s['device_name']} "
                     f"(torch {s['versions'].get('torch', '?')}), `{s['path']}`")
    lines.append(f"- model `{c.a['model']}`, {c.a['prompts']} prompts, suite `{c.a.get('suite')}`")
    lines += [f"- note: {n}" for n in c.notes]
    lines += ["", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for r in c.rows:
        lines.append("| " + " | ".join(x.replace("|", "/") for x in _cells(r)) + " |")
    lines += ["", "Metrics: MindStudio Probe conventions (cosine, MaxAbsErr, MaxRelErr = max |B-A|/|A|, "
              "shares of elements with relative error < 0.1% and < 0.5%); nmax = max abs err / max |A|; "
              "KL(p_A || p_B) mean over positions; index rows: order-free set overlap with ties at the top-k cut.", ""]
    return "\n".join(lines)


def plot(c: Comparison, path: Path) -> bool:
    """Per-layer worst cosine distance and nmax of the tensor hooks. Skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - the plot is optional by design
        return False
    layers = sorted({r.layer for r in c.rows if r.layer is not None})
    if not layers:
        return False
    cosd, nmax = [], []
    for L in layers:
        rs = [r for r in c.rows if r.layer == L and r.kind == "tensor" and "cosine" in r.metrics]
        cosd.append(max([1 - r.metrics["cosine"] for r in rs] or [0]))
        nmax.append(max([r.metrics["nmax"] for r in rs] or [0]))
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    for a, ys, title in ((ax[0], cosd, "1 - cosine (worst hook)"), (ax[1], nmax, "max abs err / max |A| (worst hook)")):
        a.plot(layers, [max(y, 1e-18) for y in ys], "o-")
        a.set_yscale("log")
        a.set_xticks(layers)
        a.set_xlabel("layer")
        a.set_title(title, fontsize=9)
    fig.suptitle(f"{c.b['backend']}/{c.b['dtype']} vs {c.a['backend']}/{c.a['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(c: Comparison, out_dir) -> list:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "report.json").write_text(json.dumps(to_json(c), indent=1) + "\n")
    (d / "report.md").write_text(to_markdown(c))
    written = [d / "report.json", d / "report.md"]
    if plot(c, d / "per_layer.png"):
        written.append(d / "per_layer.png")
    return written
