"""bench/decode_cpu.py reports a speed ratio only where transformers (the oracle) agrees with ours
(issue 14): the decision, the report, and main's exit status, without running the benchmark."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "decode_cpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_decode_cpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_disagreeing_oracle_gives_no_ratio(bench):
    ok, speedup, line = bench.speed_verdict(128, 0, 16, ours_ms=40.0, hf_ms=200.0)
    assert not ok and speedup is None
    assert "DISAGREES" in line and "0 of 16" in line and "no speed ratio" in line
    assert "5.00" not in line and "PASS" not in line and "MISS" not in line


def test_agreeing_oracle_gives_the_ratio(bench):
    ok, speedup, line = bench.speed_verdict(1024, 16, 16, ours_ms=40.0, hf_ms=200.0)
    assert ok and speedup == pytest.approx(5.0)
    assert "5.00x" in line and "PASS" in line and "1024" in line
    ok, speedup, line = bench.speed_verdict(1024, 16, 16, ours_ms=40.0, hf_ms=44.0)
    assert ok and speedup == pytest.approx(1.1) and "MISS" in line


@pytest.mark.parametrize(
    "agree,selective,ok",
    [
        (16, False, True),
        (15, False, False),  # the indexer does not select: every greedy token must agree
        (15, True, True),  # it selects: near-tie flips at its top-k boundary are allowed (90%)
        (14, True, False),
        (0, True, False),
    ],
)
def test_agreement_threshold(bench, agree, selective, ok):
    got, speedup, _ = bench.speed_verdict(8192, agree, 16, 50.0, 60.0, indexer_selective=selective)
    assert got is ok and (speedup is None) is (not ok)


def row(bench, ctx, agree, steps=16, ours_ms=40.0, hf_ms=200.0, selective=False):
    r = {
        "context": ctx, "steps": steps, "warmup": 2, "indexer_selective": selective,
        "ours_ms": ours_ms, "hf_ms": hf_ms, "ours_ms_median": ours_ms, "hf_ms_median": hf_ms,
        "ours_tok_s": 1e3 / ours_ms, "hf_tok_s": 1e3 / hf_ms, "token_agree": agree, "token_agree_all": agree,
        "prefill_token_agree": agree == steps, "prefill_logits_max_abs_diff": 0.0,
        "last_logits_max_abs_diff": 0.0, "last_logits_max_abs": 1.0, "ours_prefill_s": 1.0, "hf_prefill_s": 1.0,
        "loadavg_1m": 0.0,
    }
    r["oracle_agrees"], r["speedup"], _ = bench.speed_verdict(ctx, agree, steps, ours_ms, hf_ms, selective)
    return r


def test_report_prints_no_ratio_where_the_oracle_disagrees(bench, capsys):
    args = types.SimpleNamespace(steps=16, warmup=2)
    summary = bench.report([row(bench, 128, 16), row(bench, 1024, 0)], args)
    out = capsys.readouterr().out
    assert "speedup target @ 128:" in out and "5.00x" in out
    assert "speedup target @ 1024" not in out
    assert "oracle DISAGREES @ 1024" in out and "0 of 16" in out
    table_1024 = next(line for line in out.splitlines() if line.lstrip().startswith("1024 |"))
    assert "NO ORACLE" in table_1024 and "5.00x" not in table_1024
    assert summary["oracle_agrees"] == {128: True, 1024: False}
    assert summary["speedup_pass"] == {128: True}


def test_main_exits_nonzero_when_the_oracle_disagrees(bench, monkeypatch, capsys):
    pytest.importorskip("transformers")
    hf = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="eager"))
    monkeypatch.setattr(bench, "build_models", lambda *a, **k: (hf, object()))
    agree = {128: 16, 1024: 0}
    monkeypatch.setattr(bench, "run_context", lambda hf, ours, ctx, args: row(bench, ctx, agree[ctx]))
    assert bench.main(["--contexts", "128,1024", "--steps", "16"]) == 1
    out = capsys.readouterr().out
    assert "correctness check FAILED at context(s) 1024" in out and "no speed ratio" in out
    agree[1024] = 16
    assert bench.main(["--contexts", "128,1024", "--steps", "16"]) == 0
    assert "FAILED" not in capsys.readouterr().out
