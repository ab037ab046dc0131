"""`dsv4` command line: backends, info, generate and its error messages.

Runs `v4.cli.main` in-process (capsys) and the installed `dsv4` console script twice.
Expected numbers are computed by hand from spec/v4-architecture.md (§1.1, §3.3, §6).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import backends
from v4.cli import main

pytestmark = pytest.mark.usefixtures("no_triton_interpreter")

REPO = Path(__file__).resolve().parents[2]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- backends


def test_backends_matrix(capsys):
    code, out, _ = run(capsys, "backends")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["op", "reference", "cuda", "ascend"]
    for op in backends.OP_NAMES:
        row = [line for line in lines if line.split()[:1] == [op]]
        assert len(row) == 1, op
        assert row[0].split()[1] == "yes"  # reference implements every op
    avail = [line for line in lines if line.startswith("available")][0].split()
    assert avail[1] == "yes"
    for name in ("cuda", "ascend"):
        info = backends.probe(name)
        if not info.available:
            assert f"{name}: unavailable: {info.reason}" in out
            assert "install" in info.reason


def test_backends_json(capsys):
    code, out, _ = run(capsys, "backends", "--json")
    assert code == 0
    data = {d["name"]: d for d in json.loads(out)}
    assert set(data) >= {"reference", "cuda", "ascend"}
    ref = data["reference"]
    assert ref["available"] is True and ref["reason"] == ""
    assert sorted(ref["ops"]) == sorted(backends.OP_NAMES)
    for name in ("cuda", "ascend"):
        if not backends.probe(name).available:
            assert data[name]["available"] is False
            assert data[name]["reason"]
    # each backend's own settings: runtime.backend_options.<backend>.<option> and the flag made from it
    assert data["reference"]["options"] == [] and data["cuda"]["options"] == []
    (w,) = data["ascend"]["options"]
    assert (w["field"], w["flag"], w["default"], w["choices"]) == (
        "runtime.backend_options.ascend.weights", "--ascend-weights", "dequant", ["dequant", "w8a8"])


def test_backends_prints_each_backends_own_readiness_report(capsys, monkeypatch):
    """`dsv4 backends` asks every backend for its report (backends.readiness_reports), naming none."""
    monkeypatch.setattr(backends, "readiness_reports", lambda: ["report one", "report two"])
    code, out, _ = run(capsys, "backends")
    assert code == 0 and out.rstrip().endswith("report one\n\nreport two")


# ----------------------------------------------------------------------------- info


def _info(capsys, config):
    code, out, err = run(capsys, "info", "--config", config, "--json")
    assert code == 0, err
    return json.loads(out)


# spec §3.3 production layout: FP8 nope (448 B) + bf16 rope (64 x 2 B) + 7 ue8m0 scales + 1 pad = 584 B;
# indexer key: FP4 128 dims (64 B) + 4 scales = 68 B.  Spec §6: per CSA layer (E + I) / 4, per HCA layer E / 128.
E_FP8, I_FP8 = 448 + 64 * 2 + 8, 128 // 2 + 128 // 32


def test_fp8_layout_entry_sizes():
    assert (E_FP8, I_FP8) == (584, 68)


def test_info_flash(capsys):
    d = _info(capsys, "v4-flash")
    assert d["layers"] == {"total": 43, "sliding": 2, "csa": 21, "hca": 20, "mtp": 1}
    assert d["hca_ratio"] == 128
    fp8 = d["cache_bytes_per_token_fp8_layout"]
    assert fp8["entry_bytes"] == 584 and fp8["index_key_bytes"] == 68
    want = 21 * (584 + 68) / 4 + 20 * 584 / 128
    assert want == 3514.25
    assert fp8["total_per_token"] == pytest.approx(want, abs=1e-9)
    assert fp8["per_layer_type"]["csa"] == pytest.approx(163.0)
    assert fp8["per_layer_type"]["hca"] == pytest.approx(4.5625)
    assert fp8["per_layer_type"]["sliding"] == 0
    assert fp8["window_ring_bytes_per_sequence"] == 43 * 128 * 584  # spec §6: 3.2 MB
    # the bf16 cache (1024 B entries, 256 B indexer keys): spec §6 gives 6,880 B/token for Flash
    bf16 = d["cache_bytes_per_token"]
    assert d["runtime"]["dtype"] == "bfloat16"
    assert bf16["total_per_token"] == pytest.approx(21 * (1024 + 256) / 4 + 20 * 1024 / 128) == 6880


def test_info_pro(capsys):
    d = _info(capsys, "v4-pro")
    assert d["layers"] == {"total": 61, "sliding": 0, "csa": 30, "hca": 31, "mtp": 1}
    want = 30 * (584 + 68) / 4 + 31 * 584 / 128
    assert want == 5031.4375
    assert d["cache_bytes_per_token_fp8_layout"]["total_per_token"] == pytest.approx(want, abs=1e-9)
    assert d["cache_bytes_per_token"]["total_per_token"] == pytest.approx(9848)  # spec §6, bf16 buffers


def test_info_official_config_dir(capsys, tmp_path):
    from tests.core.test_config import flash_config_json

    ck = tmp_path / "DeepSeek-V4-Flash"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps(flash_config_json()))
    d = _info(capsys, str(ck))
    assert d["model"] == "DeepSeek-V4-Flash"
    assert d["layers"]["sliding"] == 2 and d["layers"]["csa"] == 21 and d["layers"]["hca"] == 20
    assert d["cache_bytes_per_token_fp8_layout"]["total_per_token"] == pytest.approx(3514.25)


def test_info_text(capsys):
    code, out, _ = run(capsys, "info", "--config", "v4-flash")
    assert code == 0
    assert "2 sliding, 21 CSA" in out and "20 HCA (ratio 128)" in out
    assert "3514.2" in out or "3514.3" in out


# ----------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def tiny_model():
    from v4.runtime import load

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DSV4_BACKEND", raising=False)
        return load(config="tiny", overrides={"backend": "reference"}, progress=False).model


def greedy_by_recompute(model, ids, n):
    """Argmax chain with a full recompute of the growing sequence at each step (no decode cache)."""
    seq, out = list(ids), []
    for _ in range(n):
        tok = int(model.logits(seq)[-1].argmax())
        out.append(tok)
        if tok == model.cfg.eos_token_id:
            break
        seq.append(tok)
    return out


def _generate_json(capsys, *args):
    code, out, err = run(capsys, "generate", "--config", "tiny", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_generate_ids_json(capsys, tiny_model):
    d = _generate_json(capsys, "--ids", "5,6,7", "--max-new-tokens", "4")
    assert d["model"] == "tiny" and d["backend"] == "reference"
    assert d["prompt_ids"] == [5, 6, 7]
    gen = d["generated_ids"]
    assert all(isinstance(t, int) and 0 <= t < 512 for t in gen)
    assert gen == greedy_by_recompute(tiny_model, [5, 6, 7], 4)
    if len(gen) == 4:
        assert d["finish_reason"] == "length"
    t = d["timings"]
    for k in ("load_s", "prefill_s", "decode_s"):
        assert t[k] >= 0
    assert t["prefill_tokens"] == 3
    assert t["decode_tokens"] == len(gen) - 1


def test_generate_prompt_bytes(capsys, tiny_model):
    d = _generate_json(capsys, "--prompt", "hi", "--max-new-tokens", "2")
    want_ids = [0, ord("h") + 3, ord("i") + 3]  # bos, then byte + 3
    assert want_ids == [0, 107, 108]
    assert d["prompt_ids"] == want_ids
    gen = d["generated_ids"]
    assert gen == greedy_by_recompute(tiny_model, want_ids, 2)
    assert d["text"] == bytes(t - 3 for t in gen if 3 <= t < 259).decode("utf-8", errors="replace")


def test_generate_text_mode(capsys):
    code, out, err = run(capsys, "generate", "--config", "tiny", "--prompt", "a", "--max-new-tokens", "1")
    assert code == 0
    assert "tiny on reference/float32/plain" in err
    assert "2 prompt tokens" in err


def test_generate_sampling_seed_reproducible(capsys):
    args = ("--ids", "5,6", "--max-new-tokens", "3", "--temperature", "1.0", "--top-p", "0.9", "--seed", "4")
    a = _generate_json(capsys, *args)["generated_ids"]
    b = _generate_json(capsys, *args)["generated_ids"]
    assert a == b


# ----------------------------------------------------------------------------- errors


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dsv4: error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--config", "tiny", "--ids", ""], ["empty"]),
        (["--config", "tiny", "--ids", "5,99999"], ["99999", "vocabulary"]),
        (["--config", "tiny", "--ids", "5,x"], ["--ids", "5,x"]),
        (["--config", "tiny", "--prompt", "hi", "--ids", "5,6"], ["--prompt", "--ids"]),
        (["--config", "tiny"], ["--prompt", "--ids"]),
        (["--config", "tiny", "--ids", "5", "--temperature", "-1"], ["temperature"]),
        (["--config", "tiny", "--ids", "5", "--max-new-tokens", "-2"], ["--max-tokens must be"]),
        (["--config", "no-such-model", "--ids", "5"], ["no-such-model", "tiny"]),
    ],
)
def test_generate_bad_input(capsys, args, needles):
    code, _, err = run(capsys, "generate", *args)
    _assert_one_line_error(code, err, *needles)


def test_missing_checkpoint_dir(capsys, tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    code, _, err = run(capsys, "generate", "--checkpoint", str(missing), "--ids", "5")
    _assert_one_line_error(code, err, str(missing), "config.json")


def test_bad_runtime_file(capsys, tmp_path):
    rt = tmp_path / "rt.yaml"
    rt.write_text("runtime:\n  backend: reference\n  max_num_seqs: 0\n")
    code, _, err = run(capsys, "info", "--config", "tiny", "--runtime", str(rt))
    _assert_one_line_error(code, err, "max_num_seqs")


def test_env_backend_beats_cli_and_unavailable_is_an_error(capsys, monkeypatch):
    if backends.probe("cuda").available:
        pytest.skip("cuda is available here")
    monkeypatch.setenv("DSV4_BACKEND", "cuda")
    code, _, err = run(capsys, "generate", "--config", "tiny", "--backend", "reference", "--ids", "5")
    _assert_one_line_error(code, err, "cuda", "not available")


# ----------------------------------------------------------------------------- console script


def _dsv4():
    exe = shutil.which("dsv4")
    if exe is None:
        pytest.skip("the dsv4 console script is not installed")
    env = {k: v for k, v in os.environ.items() if k != "DSV4_BACKEND"} | {"OMP_NUM_THREADS": "1"}
    return exe, env


def test_console_script_generate(tiny_model):
    exe, env = _dsv4()
    r = subprocess.run([exe, "generate", "--config", "tiny", "--ids", "5,6,7", "--max-new-tokens", "3", "--json"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["prompt_ids"] == [5, 6, 7]
    assert d["generated_ids"] == greedy_by_recompute(tiny_model, [5, 6, 7], 3)


def test_console_script_error_exit_code(tmp_path):
    exe, env = _dsv4()
    r = subprocess.run([exe, "generate", "--checkpoint", str(tmp_path / "nope"), "--ids", "5"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    _assert_one_line_error(r.returncode, r.stderr, "nope", "config.json")
    assert r.stdout == ""


def test_generate_several_prompts_through_the_engine(capsys, tiny_model):
    code, out, err = run(capsys, "generate", "--config", "tiny", "--json", "--prompt", "ab", "--prompt", "xyz!",
                         "--max-new-tokens", "5", "--ignore-eos", "--logprobs", "2")
    assert code == 0, err
    objs = [json.loads(line) for line in out.strip().splitlines()]
    assert [o["prompt_ids"] for o in objs] == [[0, 100, 101], [0, 123, 124, 125, 36]]
    for o in objs:
        assert o["generated_ids"] == greedy_by_recompute(tiny_model, o["prompt_ids"], 5)
        assert [x["token_id"] for x in o["logprobs"]] == o["generated_ids"]
        assert all(len(x["top"]) == 2 and x["top"][0][1] >= x["logprob"] for x in o["logprobs"])


def test_generate_stop_string_is_cut_from_the_text(capsys, tiny_model):
    full = _generate_json(capsys, "--prompt", "hi", "--max-new-tokens", "12", "--ignore-eos")["text"]
    stop = full[2:4]
    d = _generate_json(capsys, "--prompt", "hi", "--max-new-tokens", "12", "--ignore-eos", "--stop", stop)
    assert d["text"] == full[:full.index(stop)] and d["finish_reason"] == "stop"
