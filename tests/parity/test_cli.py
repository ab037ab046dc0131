"""`dsv4 parity record | compare | run | ops`: bundles across processes, the bundle format, exit
codes, one-sentence errors for incomparable or damaged bundles, batched == alone, reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parity import bundle as BD
from v4.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("DSV4_BACKEND", raising=False)


def run(capsys, *argv):
    code = main(["parity", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _dsv4():
    exe = shutil.which("dsv4")
    return [exe] if exe else [sys.executable, "-m", "v4.cli"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """fp64 smoke bundle recorded by a separate `dsv4` process; fp32 recorded in this one."""
    d = tmp_path_factory.mktemp("bundles")
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0", OMP_NUM_THREADS="1")
    env.pop("DSV4_BACKEND", None)
    p = subprocess.run(_dsv4() + ["parity", "record", "--backend", "reference", "--dtype", "fp64", "--suite", "smoke",
                                  "--out", str(d / "fp64"), "--threads", "1"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout
    assert main(["parity", "record", "--backend", "reference", "--dtype", "fp32", "--suite", "smoke",
                 "--out", str(d / "fp32")]) == 0
    return d


def test_bundle_from_another_process_compares_here(bundles, capsys, tmp_path):
    code, out, _ = run(
        capsys, "compare", str(bundles / "fp64"), str(bundles / "fp32"), "--report", str(tmp_path / "rep")
    )
    assert code == 0, out
    lines = out.splitlines()
    assert "all hook points agree" in lines
    assert lines[-1] == "verdict: PASS (profile fp32)" or "verdict: PASS (profile fp32)" in lines
    head = next(line for line in lines if line.startswith("hook"))
    for col in ("cosine", "max abs", "max rel", "<0.1%", "<0.5%", "verdict"):
        assert col in head
    for hook in (
        "layers.0.input",
        "layers.1.attn.q",
        "layers.1.attn.kv",
        "layers.1.attn.indexer_topk",
        "layers.2.attn.compressed",
        "layers.3.attn.output",
        "layers.3.ffn.route_ids",
        "layers.3.ffn.route_weights",
        "layers.3.ffn.output",
        "layers.3.output",
        "logits",
        "greedy",
    ):
        assert any(line.split()[:1] == [hook] for line in lines), hook
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["verdict"] == "pass" and rep["first_break"] is None and rep["exit_code"] == 0
    assert rep["a"]["dtype"] == "float64" and rep["b"]["dtype"] == "float32"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "all hook points agree" in md and "| layers.0.attn.q |" in md


def test_bundle_format_and_documented_keys(bundles):
    b = BD.read(bundles / "fp64")
    meta = json.loads((bundles / "fp64" / BD.META_FILE).read_text())
    for k in ("model", "weights", "backend", "dtype", "mode", "versions", "suite", "prompts", "hooks",
              "tensors_sha256"):
        assert k in meta
    assert meta["model"]["config_hash"] and meta["weights"]["hash"] and meta["backend"]["device_name"]
    assert meta["dtype"] == "float64" and meta["mode"] == "plain" and meta["suite"] == "smoke"
    assert "torch" in meta["versions"]
    assert [p["tokens"] for p in meta["prompts"]] == [10, 17, 40]
    V = meta["model"]["config"]["vocab_size"]
    for i, n in enumerate([10, 17, 40]):
        assert b.t(i, "input_ids").dtype == torch.int64 and b.t(i, "input_ids").shape == (n,)
        assert b.t(i, "logits").dtype == torch.float32 and b.t(i, "logits").shape == (n, V)
        assert b.t(i, "greedy_ids").dtype == torch.int64 and b.t(i, "greedy_ids").shape == (8,)
        assert b.hook(i, "layers.1.attn.indexer_topk").dtype == torch.int64
        assert b.hook(i, "layers.0.attn.q").dtype == torch.float32
        # compressed entries of prompt i: n // 4 at the CSA layer, n // 16 at the HCA layer
        assert b.hook(i, "layers.1.attn.compressed").shape[0] == n // 4
        assert b.hook(i, "layers.2.attn.compressed").shape[0] == n // 16
    # forward order within a block
    h = b.hooks
    order = [
        "layers.1.input",
        "layers.1.attn.q",
        "layers.1.attn.kv",
        "layers.1.attn.indexer_topk",
        "layers.1.attn.compressed",
        "layers.1.attn.output",
        "layers.1.ffn.route_ids",
        "layers.1.ffn.route_weights",
        "layers.1.ffn.output",
        "layers.1.output",
    ]
    assert [h.index(x) for x in order] == sorted(h.index(x) for x in order)


def _one_line_exit_2(code, out, err):
    assert code == 2
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_damaged_bundles_exit_2_with_a_sentence(bundles, capsys, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bundles / "fp32", bad)
    data = (bad / BD.TENSOR_FILE).read_bytes()
    (bad / BD.TENSOR_FILE).write_bytes(data[: len(data) // 2])  # truncated copy
    line = _one_line_exit_2(*run(capsys, "compare", str(bundles / "fp64"), str(bad)))
    assert "damaged tensor file" in line
    # a bit flip in the data keeps the size but not the digest
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    (bad / BD.TENSOR_FILE).write_bytes(bytes(flipped))
    assert "damaged tensor file" in _one_line_exit_2(*run(capsys, "compare", str(bundles / "fp64"), str(bad)))
    (bad / BD.TENSOR_FILE).write_bytes(data)
    (bad / BD.META_FILE).write_text('{"format": "dsv4-parity-bundle", ')
    assert "damaged metadata" in _one_line_exit_2(*run(capsys, "compare", str(bundles / "fp64"), str(bad)))
    (bad / BD.META_FILE).unlink()
    assert "missing" in _one_line_exit_2(*run(capsys, "compare", str(bundles / "fp64"), str(bad)))
    assert "no such bundle" in _one_line_exit_2(
        *run(capsys, "compare", str(bundles / "fp64"), str(tmp_path / "nowhere"))
    )


def test_damaged_safetensors_with_a_matching_digest(bundles, capsys, tmp_path):
    """A tensor file that is not safetensors at all, with metadata that vouches for it."""
    bad = tmp_path / "bad2"
    shutil.copytree(bundles / "fp32", bad)
    (bad / BD.TENSOR_FILE).write_bytes(b"\xff" * 64)
    meta = json.loads((bad / BD.META_FILE).read_text())
    meta["tensors_sha256"] = BD._sha256(bad / BD.TENSOR_FILE)
    (bad / BD.META_FILE).write_text(json.dumps(meta))
    assert "damaged tensor file" in _one_line_exit_2(*run(capsys, "compare", str(bundles / "fp64"), str(bad)))


def test_different_weights_or_prompts_are_not_comparable(bundles, capsys, tmp_path):
    # seeded random weights need --config (the default model is a checkpoint: its weights are fixed)
    for seed in ("0", "1"):
        assert main(["parity", "record", "--backend", "reference", "--suite", "smoke", "--config", "tiny",
                     "--seed-weights", seed, "--out", str(tmp_path / f"seed{seed}")]) == 0
    capsys.readouterr()
    line = _one_line_exit_2(*run(capsys, "compare", str(tmp_path / "seed0"), str(tmp_path / "seed1")))
    assert "not comparable" in line and "different weights" in line
    line = _one_line_exit_2(*run(capsys, "compare", str(bundles / "fp64"), str(tmp_path / "seed0")))
    assert "not comparable" in line  # the trained default against random tiny
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"ids": [0, 5, 6, 7]}\n{"text": "Hello, V4"}\n{"ids": [0, 9]}\n')
    assert main(["parity", "record", "--backend", "reference", "--config", "tiny", "--prompts", str(prompts),
                 "--out", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    line = _one_line_exit_2(*run(capsys, "compare", str(tmp_path / "seed0"), str(tmp_path / "other")))
    assert "not comparable" in line and "prompt 0 has different input ids" in line
    assert main(["parity", "record", "--backend", "reference", "--config", "small", "--prompts", str(prompts),
                 "--layers", "none", "--greedy", "1", "--out", str(tmp_path / "small")]) == 0
    capsys.readouterr()
    line = _one_line_exit_2(*run(capsys, "compare", str(tmp_path / "other"), str(tmp_path / "small")))
    assert "different model configs" in line


def test_prompts_file_errors_are_one_sentence(capsys, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"ids": [0, 1]}\nnot json\n')
    line = _one_line_exit_2(
        *run(capsys, "record", "--config", "tiny", "--prompts", str(p), "--out", str(tmp_path / "x"))
    )
    assert "bad.jsonl:2" in line
    p.write_text('{"ids": [0, 99999]}\n')
    line = _one_line_exit_2(
        *run(capsys, "record", "--config", "tiny", "--prompts", str(p), "--out", str(tmp_path / "x"))
    )
    assert "outside the vocabulary" in line
    assert "not found" in _one_line_exit_2(*run(capsys, "record", "--suite", "nosuch", "--out", str(tmp_path / "x")))


def test_batched_recording_equals_recording_alone(capsys, tmp_path):
    """The boundaries suite packs mixed-length batches in one step; alone, each prompt runs by itself
    (on the default model, the trained tiny-v4)."""
    assert (
        main(
            ["parity", "record", "--backend", "reference", "--suite", "boundaries", "--out", str(tmp_path / "batched")]
        )
        == 0
    )
    assert main(["parity", "record", "--backend", "reference", "--suite", "boundaries", "--no-batch",
                 "--out", str(tmp_path / "alone")]) == 0
    capsys.readouterr()
    a = BD.read(tmp_path / "batched")
    assert {p["batch"] for p in a.meta["prompts"]} == {None, "mixed-1", "mixed-2"}
    assert sorted({p["tokens"] for p in a.meta["prompts"]}) == [1, 3, 4, 5, 15, 16, 17, 31, 32, 33, 127, 128, 129]
    assert a.meta["weights"]["source"] == "checkpoint" and a.meta["model"]["config"]["sliding_window"] == 32
    code, out, _ = run(capsys, "compare", str(tmp_path / "alone"), str(tmp_path / "batched"))
    assert code == 0, out
    assert "all hook points agree" in out


def test_run_on_the_default_model(capsys):
    """`dsv4 parity run` with no arguments: the smoke suite on the shipped trained tiny-v4, whose
    peaked distributions leave bf16 no argmax flip on these prompts."""
    code, out, err = run(capsys, "run", "--threads", "1")
    assert code == 0, out
    assert "using the trained tiny-v4" in err and "model tiny-v4, 3 prompts" in out
    summary = out[out.index("summary"):].splitlines()
    assert any("reference/float32/plain" in line and "PASS" in line and "profile fp32" in line for line in summary)
    assert any("reference/bfloat16/plain" in line and "PASS" in line and "profile bf16" in line for line in summary)
    bf16 = out[out.index("B: reference/bfloat16"):]
    logits = next(line for line in bf16.splitlines() if line.startswith("logits"))
    assert "top1 1.0000" in logits


def test_run_on_random_tiny(capsys, tmp_path):
    code, out, _ = run(
        capsys, "run", "--config", "tiny", "--report", str(tmp_path / "rep"), "--out", str(tmp_path / "b")
    )
    assert code == 0, out
    summary = out[out.index("summary"):].splitlines()
    assert any("reference/float32/plain" in line and "PASS" in line and "profile fp32" in line for line in summary)
    assert any("reference/bfloat16/plain" in line and "PASS" in line and "profile bf16" in line for line in summary)
    assert len(list((tmp_path / "rep").glob("*/report.json"))) == 2
    assert len(list((tmp_path / "b").iterdir())) == 3


def test_run_with_repeat_measures_a_zero_floor(capsys):
    code, out, _ = run(
        capsys,
        "run",
        "--config",
        "tiny",
        "--backends",
        "reference:fp64,reference:fp32",
        "--repeat",
        "2",
        "--greedy",
        "2",
    )
    assert code == 0, out
    assert "noise floor of reference/float32/plain: zero (bit-identical repeats)" in out
    assert "judged against the measured noise floor" in out


def test_run_rejects_bad_backend_lists(capsys):
    assert "unknown dtype" in _one_line_exit_2(*run(capsys, "run", "--backends", "reference:fp7,reference"))
    assert "at least two" in _one_line_exit_2(*run(capsys, "run", "--backends", "reference"))
    line = _one_line_exit_2(*run(capsys, "run", "--backends", "reference:fp64,ascend:bf16", "--greedy", "1"))
    assert "ascend" in line and "not available" in line


def test_ops_reference_fp32_passes(capsys):
    code, out, _ = run(capsys, "ops", "--backend", "reference", "--dtype", "fp32")
    assert code == 0, out
    import backends

    for op in backends.OP_NAMES:
        row = [line for line in out.splitlines() if line.split()[:1] == [op]]
        assert len(row) == 1 and row[0].rstrip().endswith("PASS"), (op, out)
    assert out.rstrip().endswith("verdict: PASS")


def test_ops_catches_a_broken_op_of_a_partial_backend(capsys, monkeypatch):
    """A registered backend that implements only rms_norm, and gets its weight wrong."""
    import types

    import backends
    from backends.reference.ops import ReferenceOps

    class BrokenNorm(ReferenceOps):
        name = "broken"

        def rms_norm(self, x, weight, eps):
            return super().rms_norm(x, None if weight is None else weight * 1.01, eps)

    mod = types.ModuleType("fake_broken_backend")
    mod.probe = lambda: backends.BackendInfo("broken", "cpu", True, "", frozenset({"rms_norm"}),
                                             ("float32",), ("plain",))
    mod.make_ops = lambda device=None: BrokenNorm(device or "cpu")
    monkeypatch.setitem(sys.modules, "fake_broken_backend", mod)
    monkeypatch.setitem(backends._REGISTRY, "broken", backends._Entry("fake_broken_backend"))
    code, out, _ = run(capsys, "ops", "--backend", "broken")
    assert code == 1, out
    rows = {
        line.split()[0]: line for line in out.splitlines() if line.split()[:1] and line.split()[0] in backends.OP_NAMES
    }
    assert "FAIL" in rows["rms_norm"] and "broken" in rows["rms_norm"]
    assert all("SKIP" in rows[op] for op in backends.OP_NAMES if op != "rms_norm")


def test_metadata_with_a_wrong_structure_is_damaged_not_a_crash(bundles, capsys, tmp_path):
    bad = tmp_path / "bad3"
    shutil.copytree(bundles / "fp32", bad)
    meta = json.loads((bad / BD.META_FILE).read_text())
    meta["model"] = "tiny"  # valid JSON, wrong shape
    (bad / BD.META_FILE).write_text(json.dumps(meta))
    line = _one_line_exit_2(*run(capsys, "compare", str(bundles / "fp64"), str(bad)))
    assert "damaged metadata" in line and "model" in line


def test_verify_from_a_checkpoint_and_its_refusals(capsys, tmp_path):
    """`parity verify` re-records a checkpoint bundle from this machine's copy of the checkpoint,
    and says in one sentence when the weights cannot be the golden bundle's."""
    ck = tmp_path / "ck"
    assert main(["init", "--config", "tiny", "--out", str(ck), "--quant", "fp32"]) == 0
    golden = tmp_path / "golden"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"length": 9, "seed": 3}\n')
    assert main(["parity", "record", "--backend", "reference", "--dtype", "fp64", "--checkpoint", str(ck),
                 "--prompts", str(prompts), "--greedy", "2", "--out", str(golden)]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "verify", str(golden), "--backend", "reference", "--dtype", "fp32",
                       "--checkpoint", str(ck), "--skip-ops")
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith("verdict: PASS") and "ops skipped" in out
    line = _one_line_exit_2(*run(capsys, "verify", str(golden), "--backend", "reference", "--skip-ops"))
    assert "--checkpoint" in line and "recorded from checkpoint" in line
    # another checkpoint (other seed): same config, different weights -> not comparable, exit 2
    other = tmp_path / "other"
    assert main(["init", "--config", "tiny", "--out", str(other), "--quant", "fp32", "--seed", "1"]) == 0
    capsys.readouterr()
    line = _one_line_exit_2(*run(capsys, "verify", str(golden), "--backend", "reference", "--checkpoint",
                                 str(other), "--skip-ops"))
    assert "different weights" in line
