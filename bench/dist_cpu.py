"""Multi-device layouts side by side on this machine's CPU (gloo): decode tok/s of `dsv4 generate`
per layout and its ratio to one process, plus what one tick of the multi-device protocol costs.

    python bench/dist_cpu.py [--config small] [--prompts 4] [--tokens 32] [--layouts "TP1;TP2;..."]

On one CPU the ranks share the same cores, so TP2 cannot be faster than TP1 here: the figure to read
is the overhead (ticks, plans, collectives) per decode step, not a speed-up. Each layout runs as its
own `dsv4 generate --json` process (the ranks are spawned by it), greedy, the same prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LAYOUTS = {
    "TP1": [],
    "TP2": ["-tp", "2"],
    "TP2+EP2": ["-tp", "2", "--enable-expert-parallel"],
    "DP2+EP2": ["-dp", "2", "--enable-expert-parallel"],
}


def run(config: str, flags: list[str], prompts: int, tokens: int) -> dict:
    args = [sys.executable, "-m", "v4", "generate", "--config", config, "--max-new-tokens", str(tokens),
            "--ignore-eos", "--json", *flags]
    for i in range(prompts):
        args += ["--prompt", f"prompt number {i}: " + "lorem ipsum " * (4 + 3 * i)]
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(flags) or 'TP1'} failed:\n{r.stderr[-2000:]}")
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    t = lines[0]["timings"]
    return {"decode_tok_per_s": t["decode_tok_per_s"], "decode_steps": t["decode_steps"], "decode_s": t["decode_s"],
            "prefill_s": t["prefill_s"], "wall_s": wall, "ids": [x["generated_ids"] for x in lines]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--layouts", default=";".join(LAYOUTS), help="';'-separated names of " + ", ".join(LAYOUTS))
    a = p.parse_args(argv)
    names = [n for n in a.layouts.split(";") if n]
    results = {n: run(a.config, LAYOUTS[n], a.prompts, a.tokens) for n in names}
    base = results[names[0]]
    print(
        f"{a.config}, {a.prompts} prompts x {a.tokens} tokens, {os.cpu_count()} CPU cores, reference backend, float32"
    )
    print(
        f"{'layout':10} {'decode tok/s':>12} {'ratio':>6} {'ms/step':>8} {'+ms/step':>9} {'same ids':>8} {'wall s':>7}"
    )
    for n, r in results.items():
        ms = 1e3 * r["decode_s"] / max(1, r["decode_steps"])
        base_ms = 1e3 * base["decode_s"] / max(1, base["decode_steps"])
        print(f"{n:10} {r['decode_tok_per_s']:12.1f} {r['decode_tok_per_s'] / base['decode_tok_per_s']:6.2f} {ms:8.2f} "
              f"{ms - base_ms:9.2f} {str(r['ids'] == base['ids']):>8} {r['wall_s']:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
