"""Measure the numbers the tolerance profiles in parity/profiles.py are set from.

    python -m parity.calibrate [--checkpoint DIR | --config C [--seeds 0,1,2,3,4]] [--suites smoke,boundaries]
                               [--small] [--long]

The model is the shipped trained tiny-v4 checkpoint by default (`--checkpoint` another one; its
weights are fixed, so there is one run), or `--config C` with seeded random weights, one run per
weight seed. For every run and suite it records the reference backend in float64 (plain and exact
mode) as the baseline, then float32, bfloat16 and float16 (plain) and float32 / bfloat16 (exact),
compares each against the baseline of its mode and prints, per profile and kind of row, the worst
value of every metric seen (worst over prompts, seeds and suites). `--small` adds the `small`
config (random weights, seed 0) on one 128-token prompt; `--long` adds the main model on one
4000-token prompt of held-out text (first seed only): far positions, where float32 rope angles
lose precision. Measured side by side on 2 CPU cores: `--small --long` (tiny-v4) 3 min 52 s,
`--config tiny` (5 seeds) 3 min 49 s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import record
from .bundle import Bundle
from .compare import compare

VARIANTS = [
    ("float32", "plain"),
    ("bfloat16", "plain"),
    ("float16", "plain"),
    ("float32", "exact"),
    ("bfloat16", "exact"),
]
PROFILE_OF = {("float32", "plain"): "fp32", ("bfloat16", "plain"): "bf16", ("float16", "plain"): "fp16",
              ("float32", "exact"): "fp8-exact", ("bfloat16", "exact"): "fp8-exact"}
LOWER_IS_WORSE = ("cosine", "share_1e3", "share_5e3", "top1", "topk", "mean", "min_row", "agree")
HIGHER_IS_WORSE = ("nmax", "kl", "nonfinite")


def _bundle(model, dtype, mode, seed, prompts, opts) -> Bundle:
    """model: ("checkpoint", DIR) or ("config", NAME); the seed applies to a config only."""
    ckpt, config = (model[1], None) if model[0] == "checkpoint" else (None, model[1])
    built = record.build(ckpt, config, None, {"backend": "reference", "dtype": dtype, "mode": mode}, seed=seed)
    tensors, info = record.record(built.model, prompts, opts)
    return Bundle(f"{_label(model)}/{dtype}/{mode}/seed{seed}", record.make_meta(built, prompts, opts, info), tensors)


def _label(model) -> str:
    return Path(model[1]).name if model[0] == "checkpoint" else model[1]


def _keep_worst(slot: dict, metrics: dict, keys, where: str) -> None:
    """slot[k] = (value, where) for each of `keys` that `metrics` has and that is worse than slot's
    worst so far (lower for LOWER_IS_WORSE keys, higher for the others)."""
    for k in keys:
        if k not in metrics or metrics[k] is None:
            continue
        v = float(metrics[k])
        cur = slot.get(k)
        if cur is None or (v < cur[0] if k in LOWER_IS_WORSE else v > cur[0]):
            slot[k] = (v, where)


def _collect(worst: dict, key, comp):
    for r in comp.rows:
        where = f"{comp.b['path']} {r.name}"
        slot = worst.setdefault((key, r.kind), {})
        for m in r.per_prompt:
            _keep_worst(slot, m, LOWER_IS_WORSE + HIGHER_IS_WORSE, where)
            if r.kind == "greedy" and m["first_divergence"] is not None:
                slot["divergences"] = slot.get("divergences", 0) + 1
                if not m["benign"]:
                    slot["non_benign"] = slot.get("non_benign", 0) + 1
        # the pooled metrics the verdict uses
        pslot = worst.setdefault((key, r.kind + " pooled"), {})
        _keep_worst(pslot, r.metrics, LOWER_IS_WORSE + HIGHER_IS_WORSE + ("non_benign", "diverged"), where)


def _jobs(a, model) -> list:
    """[(model, prompts, options, label, seeds)]: each suite on the main model, then --small / --long."""
    seeds = [int(x) for x in a.seeds.split(",")] if model[0] == "config" else [0]
    tok = record.build(*((model[1], None) if model[0] == "checkpoint" else (None, model[1])), None,
                  {"backend": "reference"}).tokenizer
    jobs = []
    for s in a.suites.split(","):
        suite = record.load_suite(s)
        jobs.append((model, record.suite_prompts(suite, tok, 0), record.Options(**suite.options), _label(model), seeds))
    if a.small:
        jobs.append(
            (
                ("config", "small"),
                [record.Prompt(record.generated_ids(128, 7, 0))],
                record.Options(greedy_tokens=4),
                "small",
                [0],
            )
        )
    if a.long:
        jobs.append(
            (
                model,
                [record.Prompt(record.heldout_ids(0, 4000, tok, 0))],
                record.Options(greedy_tokens=4, logits="last:64", prefill_chunk=1024),
                _label(model) + " 4000 tokens",
                seeds[:1],
            )
        )
    return jobs


def main(argv=None):
    from v4.runtime import DEFAULT_CHECKPOINT

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help=f"checkpoint to calibrate on (default: the shipped {DEFAULT_CHECKPOINT.name})")
    g.add_argument("--config", help="calibrate on this config with seeded random weights instead (see --seeds)")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="weight seeds, with --config only")
    ap.add_argument("--suites", default="smoke,boundaries")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--long", action="store_true")
    a = ap.parse_args(argv)
    model = ("config", a.config) if a.config else ("checkpoint", a.checkpoint or str(DEFAULT_CHECKPOINT))
    torch.set_num_threads(1)
    worst: dict = {}
    t0 = time.perf_counter()
    for src, prompts, opts, label, seeds in _jobs(a, model):
        for seed in seeds:
            base = {m: _bundle(src, "float64", m, seed, prompts, opts) for m in ("plain", "exact")}
            for dt, mode in VARIANTS:
                b = _bundle(src, dt, mode, seed, prompts, opts)
                key = PROFILE_OF[(dt, mode)] + f" ({dt}/{mode}, {label})"
                _collect(worst, key, compare(base[mode], b, PROFILE_OF[(dt, mode)]))
            print(f"seed {seed} {label} ({len(prompts)} prompts): {time.perf_counter() - t0:.0f}s", flush=True)
    for (prof, kind), slot in sorted(worst.items()):
        if not kind.endswith("pooled"):
            continue  # the verdict judges pooled metrics; per-prompt worsts are diagnostics
        print(f"\n{prof} [{kind}]")
        for k, v in slot.items():
            val, where = v if isinstance(v, tuple) else (v, "")
            if k in ("cosine",):
                k, val = "1-cosine", 1 - val
            print(f"  {k:12s} {val:<14.6g} {where}")


if __name__ == "__main__":
    main()
