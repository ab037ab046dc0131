"""Measure the numbers the tolerance profiles in parity/profiles.py are set from.

    python -m parity.calibrate [--seeds 0,1,2,3,4] [--suites smoke,boundaries] [--small] [--long]

For every weight seed and suite it records the reference backend in float64 (plain and exact
mode) as the baseline, then float32, bfloat16 and float16 (plain) and float32 / bfloat16 (exact),
compares each against the baseline of its mode and prints, per profile and kind of row, the
worst value of every metric seen (worst over prompts, seeds and suites). `--small` adds the
`small` config on one 128-token prompt (seed 0 only); `--long` adds the tiny config on one
4000-token prompt (seed 0 only): far positions, where float32 rope angles lose precision. About
5 minutes on 2 CPU cores with all of them.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import record as R
from .bundle import Bundle
from .compare import compare

VARIANTS = [("float32", "plain"), ("bfloat16", "plain"), ("float16", "plain"), ("float32", "exact"), ("bfloat16", "exact")]
PROFILE_OF = {("float32", "plain"): "fp32", ("bfloat16", "plain"): "bf16", ("float16", "plain"): "fp16",
              ("float32", "exact"): "fp8-exact", ("bfloat16", "exact"): "fp8-exact"}
LOWER_IS_WORSE = ("cosine", "share_1e3", "share_5e3", "top1", "topk", "mean", "min_row", "agree")
HIGHER_IS_WORSE = ("nmax", "kl", "nonfinite")


def _bundle(config, dtype, mode, seed, prompts, opts) -> Bundle:
    built = R.build(None, config, None, {"backend": "reference", "dtype": dtype, "mode": mode}, seed=seed)
    tensors, info = R.record(built.model, prompts, opts)
    return Bundle(f"{config}/{dtype}/{mode}/seed{seed}", R.make_meta(built, prompts, opts, info), tensors)


def _collect(worst: dict, key, comp):
    for r in comp.rows:
        slot = worst.setdefault((key, r.kind), {})
        for m in r.per_prompt:
            for k in LOWER_IS_WORSE + HIGHER_IS_WORSE:
                if k not in m or m[k] is None:
                    continue
                v = float(m[k])
                cur = slot.get(k)
                if cur is None or (v < cur[0] if k in LOWER_IS_WORSE else v > cur[0]):
                    slot[k] = (v, f"{comp.b['path']} {r.name}")
            if r.kind == "greedy" and m["first_divergence"] is not None:
                slot["divergences"] = slot.get("divergences", 0) + 1
                if not m["benign"]:
                    slot["non_benign"] = slot.get("non_benign", 0) + 1
        # the pooled metrics the verdict uses
        pslot = worst.setdefault((key, r.kind + " pooled"), {})
        m = r.metrics
        for k in LOWER_IS_WORSE + HIGHER_IS_WORSE + ("non_benign", "diverged"):
            if k not in m or m[k] is None:
                continue
            v = float(m[k])
            cur = pslot.get(k)
            if cur is None or (v < cur[0] if k in LOWER_IS_WORSE else v > cur[0]):
                pslot[k] = (v, f"{comp.b['path']} {r.name}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--suites", default="smoke,boundaries")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--long", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    worst: dict = {}
    jobs = []
    for s in a.suites.split(","):
        suite = R.load_suite(s)
        prompts = R.suite_prompts(suite, R.build(None, suite.config, None, {"backend": "reference"}).tokenizer, 0)
        jobs.append((suite.config, prompts, R.Options(**suite.options)))
    if a.small:
        jobs.append(("small", [R.Prompt(R.generated_ids(128, 7, 0))], R.Options(greedy_tokens=4)))
    if a.long:
        jobs.append(("tiny-long", [R.Prompt(R.generated_ids(4000, 8, 0))],
                     R.Options(greedy_tokens=4, logits="last:64", prefill_chunk=1024)))
    t0 = time.perf_counter()
    for seed in [int(x) for x in a.seeds.split(",")]:
        for config, prompts, opts in jobs:
            if config in ("small", "tiny-long") and seed > 0:
                continue
            label = "tiny 4000 tokens" if config == "tiny-long" else config
            config = "tiny" if config == "tiny-long" else config
            base = {m: _bundle(config, "float64", m, seed, prompts, opts) for m in ("plain", "exact")}
            for dt, mode in VARIANTS:
                b = _bundle(config, dt, mode, seed, prompts, opts)
                key = PROFILE_OF[(dt, mode)] + f" ({dt}/{mode}, {label})"
                _collect(worst, key, compare(base[mode], b, PROFILE_OF[(dt, mode)]))
            print(f"seed {seed} {config} ({len(prompts)} prompts): {time.perf_counter() - t0:.0f}s", flush=True)
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
