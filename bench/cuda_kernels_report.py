"""Reports of bench/cuda_kernels.py: the console row of a case, the JSON / Markdown files (the
Markdown is what bench/results/ keeps) and the notes printed with them."""

from __future__ import annotations

import json
from pathlib import Path

HDR_GPU = (
    f"{'kernel':<13} {'case':<40} {'MB':>9} {'GFLOP':>9} {'cuda ms':>9} {'ref ms':>9} {'speedup':>8} "
    f"{'GB/s':>7} {'%BW':>6} {'%copy':>6} {'TF/s':>7} {'%TF':>6} {'%roof':>6}  {'check':<8} {'error':<27} target"
)
HDR_SMOKE = (f"{'kernel':<13} {'case':<40} {'MB':>9} {'GFLOP':>9} {'cuda ms':>9} {'ref ms':>9} {'speedup':>8}  "
             f"{'check':<8} {'error':<27} target (not judged in smoke mode)")


def _g(v: float) -> str:
    """Compact magnitude for the MB / GFLOP columns (12900, 3.14, 0.0123)."""
    if v == 0:
        return "0"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def fmt_row(r: dict, smoke: bool) -> str:
    def num(k, f, w):
        v = r.get(k)
        return f"{v:{w}{f}}" if isinstance(v, (int, float)) else f"{'-':>{w}}"

    head = f"{r['kernel']:<13} {r['case'][:40]:<40} {_g(r['bytes'] / 1e6):>9} {_g(r['flops'] / 1e9):>9} "
    if "error" in r:
        return head + f"ERROR: {r['error']}"
    ms = lambda k: (f"{r[k] * 1e3:9.3f}" if k in r else f"{'-':>9}")  # noqa: E731
    sp = f"{r['speedup']:7.1f}x" if "speedup" in r else f"{'-':>8}"
    chk = {True: "OK", False: "MISMATCH", None: "-"}[r.get("check_ok")]
    line = head + f"{ms('cuda_s')} {ms('ref_s')} {sp} "
    if not smoke:
        pct = lambda k: (f"{r[k] * 100:5.1f}%" if k in r else f"{'-':>6}")  # noqa: E731
        line += (f"{num('gbps', '.0f', 7)} {pct('pct_bw')} {pct('pct_copy_bw')} {num('tflops', '.1f', 7)} "
                 f"{pct('pct_tf')} {pct('pct_roof')} ")
    line += f" {chk:<8} {r.get('check', '')[:27]:<27} "
    if r.get("target"):
        if smoke:
            line += f"({r['target']})"
        else:
            line += f"{'PASS' if r.get('target_pass') else 'MISS'} {r['target']}"
            cap = r.get("target_cap")
            if cap is not None and cap < 0.999:
                line += f" [roofline caps this metric at {cap * 100:.0f}% here]"
    if r.get("ref_error"):
        line += f"  ({r['ref_error']})"
    return line

NOTES = [
    "bytes = unique bytes the op must move (module docstring); implementation scratch round trips "
    "(indexer fp32 score matrix, attention split-KV partials, MoE per-pair rows, mHC split-K partials) are not counted",
    "indexer keys are bf16 in the pool (256 B/entry); the spec's FP8 key layout would be 132 B/entry",
    "attention_fp8 / moe_fp4 reference = the reference op on the dequantised (bf16-exact) values",
]


def _driver_version() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def write_reports(args, doc: dict) -> None:
    if args.json:
        text = json.dumps(doc, indent=2, default=str)
        if args.json == "-":
            if not doc["partial"]:
                print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(doc))


def _pct(v) -> str:
    return f"{v * 100:.1f}" if isinstance(v, (int, float)) else "-"


def _num(v, f: str) -> str:
    return f"{v:{f}}" if isinstance(v, (int, float)) else "-"


def _markdown_preamble(doc: dict) -> list[str]:
    """The title, the command, the software and timing line, the roofline the percentages are taken against (when
    the hardware is known) and the partial-run warning."""
    hw = doc.get("hardware") or {}
    out = [
        f"# CUDA backend on {doc['device']}",
        "",
        f"`{doc['command']}`",
        "",
        f"torch {doc['torch']} (CUDA {doc.get('cuda')}), triton {doc['triton']}, driver {doc.get('driver')}; "
        f"timing: {doc['timing']['clock']}, median of {doc['timing']['reps']} after {doc['timing']['warmup']} warm-up"
        + (", L2 flushed before each run" if doc["timing"]["l2_flush"] else "")
        + ".",
    ]
    if hw:
        out += [
            "",
            f"Roofline: HBM {hw['bw'] / 1e12:.2f} TB/s peak ({hw['table']} datasheet), measured copy "
            f"{hw.get('copy_bw', 0) / 1e12:.2f} TB/s; bf16 {hw['bf16'] / 1e12:.0f} TF, fp8 {hw['fp8'] / 1e12:.0f} TF, "
            f"fp32 {hw['fp32'] / 1e12:.0f} TF. %BW = bytes / time / peak HBM, %copy = the same against the "
            "measured copy bandwidth, %TF = FLOPs / time / peak of the unit, "
            "%roof = max(bytes / BW, FLOPs / peak) / time.",
        ]
    if doc.get("partial"):
        out += ["", "**Partial: the run was cut short after the rows below.**"]
    return out


def _markdown_kernel_row(r: dict) -> str:
    """One case of the kernel table: its figures, check and target, or the error it stopped on."""
    if "error" in r:
        return (
            f"| {r['kernel']} | {r['case']} | {r.get('phase', '')} | | | | | | | | | | | | ERROR | "
            f"{r['error'][:120]} |"
        )
    chk = {True: "OK", False: "MISMATCH", None: "-"}[r.get("check_ok")] + f" ({r.get('check', '')})"
    tgt = ""
    if r.get("target"):
        tgt = ("PASS " if r.get("target_pass") else "MISS ") + r["target"] if "target_pass" in r else r["target"]
        if r.get("target_cap") is not None and r["target_cap"] < 0.999:
            tgt += f"; roofline caps it at {r['target_cap'] * 100:.0f}%"
    return (
        f"| {r['kernel']} | {r['case']} | {r['phase']} | {_g(r['bytes'] / 1e6)} | {_g(r['flops'] / 1e9)} | "
        f"{_num(r.get('cuda_s', 0) * 1e3, '.3f')} | {_num(r['ref_s'] * 1e3, '.3f') if 'ref_s' in r else '-'} | "
        f"{_num(r.get('speedup'), '.1f')} | {_num(r.get('gbps'), '.0f')} | {_pct(r.get('pct_bw'))} | "
        f"{_pct(r.get('pct_copy_bw'))} | {_num(r.get('tflops'), '.1f')} | {_pct(r.get('pct_tf'))} | "
        f"{_pct(r.get('pct_roof'))} | {chk} | {tgt} |"
    )


def _markdown_kernel_table(doc: dict) -> list[str]:
    """Every kernel case run, then the ones the time budget skipped."""
    out = [
        "",
        "| kernel | case | phase | MB | GFLOP | cuda ms | ref ms | x ref | GB/s | %BW | %copy | TF/s | %TF | %roof | "
        "check | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    out += [_markdown_kernel_row(r) for r in doc["rows"]]
    for k, label, why in doc.get("skipped", []):
        out.append(f"| {k} | {label} | | | | | | | | | | | | | skipped | {why} |")
    return out


def _markdown_model_table(m: dict | None) -> list[str]:
    """The whole-model decode: a row per batch against the reference (one column group per CUDA variant run), or the
    error it stopped on; nothing when the model was not run."""
    out = []
    if m and "rows" in m:
        cols = [k for k in ("cuda", "graphs") if any(f"{k}_ms" in r for r in m["rows"])]
        out += ["", f"## Whole-model decode: `{m['config']}`, {m['dtype']}, prompt {m['context']} tokens, "
                f"median of {m['steps']} steps", "",
                "| batch | ref ms/step | " + " | ".join(f"{k} ms/step | {k} x ref | {k} agree" for k in cols)
                + " | kernels/step (eager cuda) | kernels/layer | us/kernel |",
                "|---:|---:|" + "---:|---:|---:|" * len(cols) + "---:|---:|---:|"]
        for r in m["rows"]:
            cells = " | ".join(
                f"{r[k + '_ms']:.2f} | {r[k + '_ratio']:.2f} | {r[k + '_agree']}/{r['agree_of']}" for k in cols
            )
            kern = r.get("cuda_kernels")
            per_layer = f"{kern / m['layers']:.1f}" if kern and m.get("layers") else "-"
            us = f"{r['cuda_ms'] * 1e3 / kern:.1f}" if kern else "-"
            out.append(f"| {r['batch']} | {r['ref_ms']:.2f} | {cells} | {kern or '-'} | {per_layer} | {us} |")
        for n in m.get("notes", []):
            out.append(f"\nNote: {n}")
    elif m:
        out += ["", f"Whole-model decode: ERROR {m.get('error')}"]
    return out


def markdown(doc: dict) -> str:
    """The kernel table and the whole-model table as Markdown (what bench/results/ keeps)."""
    out = _markdown_preamble(doc) + _markdown_kernel_table(doc) + _markdown_model_table(doc.get("model"))
    out += [""] + [f"- {n}" for n in doc.get("notes", [])]
    return "\n".join(out) + "\n"
