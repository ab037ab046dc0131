"""bench/engine_cpu.py --speculative K --smoke (issue 15): the script runs end to end on the trained
tiny model and prints its table, acceptance figures and targets. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "engine_cpu.py"


def test_speculative_smoke(tmp_path):
    out = tmp_path / "spec.json"
    p = subprocess.run([sys.executable, str(BENCH), "--speculative", "2", "--smoke", "--dtype", "float64",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    text = p.stdout
    for needle in ("mean acc len", "acceptance per position", "greedy k=2", "sampled k=2 sample drafts",
                   "sampled k=2 argmax drafts", "target: mean acceptance length", "target: single-stream tokens/s"):
        assert needle in text, needle
    assert "0 of 8 requests differ" in text  # fp64: greedy k=2 generates k=0's tokens at both concurrencies
    doc = json.loads(out.read_text())
    runs = doc["runs"]
    assert len(runs) == 10 and {r["concurrency"] for r in runs} == {1, 4}
    for r in runs:
        assert r["completed"] == 4 and r["output_tokens"] == 48 and not r["stopped"]
        if r["k"]:
            assert len(r["acceptance_rate_per_pos"]) == 2 and 1.0 <= r["mean_acceptance_length"] <= 3.0
            assert r["num_drafts"] > 0 and r["ratio_to_k0"] is not None
    assert doc["greedy_requests_differing"] == 0 and "mean_acceptance_length_greedy" in doc["targets"]
