"""The embedded default model (issue 14): with neither --checkpoint nor --config, every command that
takes a model runs the shipped trained tiny-v4 checkpoint and says so on stderr; `--config tiny`
still gives seeded random weights, and `--config tiny-v4` the trained model's architecture with
seeded random weights (like any --config). Held-out suite prompts are exactly N tokens long."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parity import bundle as BD
from parity import record as R
from v4.cli import build_parser, main, pick_model
from v4.runtime import DEFAULT_CHECKPOINT
from v4.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from v4.dist.shard import SKIP
from v4.weights import load_checkpoint

pytestmark = pytest.mark.usefixtures("no_triton_interpreter")

NOTE = "using the trained tiny-v4"


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("DSV4_BACKEND", raising=False)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tok():
    cfg, _ = load_checkpoint(DEFAULT_CHECKPOINT, progress=False, select=lambda name: SKIP)
    return load_tokenizer(cfg, DEFAULT_CHECKPOINT)


def test_the_default_is_the_shipped_package_checkpoint():
    import v4

    assert DEFAULT_CHECKPOINT.parent.parent.samefile(Path(v4.__file__).parent)  # found from the package, not the CWD
    assert (DEFAULT_CHECKPOINT / "config.json").is_file() and DEFAULT_CHECKPOINT.name == "tiny-v4"


def test_info_without_a_model_names_tiny_v4(capsys):
    code, out, err = run(capsys, "info", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["model"] == "tiny-v4" and d["layers"]["total"] == 4 and d["layers"]["mtp"] == 1
    assert NOTE in err and str(DEFAULT_CHECKPOINT) in err and len(err.strip().splitlines()) == 1
    code, out, _ = run(capsys, "info")
    assert out.startswith("tiny-v4: 4 layers, hidden 128") and "window 32" in out


def test_generate_without_a_model_speaks_tiny_v4s_tokenizer(capsys, tok):
    assert isinstance(tok, HFTokenizer)
    code, out, err = run(capsys, "generate", "--prompt", "def main(", "--max-new-tokens", "8", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["model"] == "tiny-v4" and NOTE in err
    assert d["prompt_ids"] == tok.encode("def main(")
    gen = d["generated_ids"]
    assert gen and all(0 <= t < 4096 for t in gen)
    assert d["text"] == tok.decode(gen) and d["text"].strip()  # real text, not stray bytes


def test_config_tiny_is_still_random_tiny(capsys):
    code, out, err = run(capsys, "generate", "--config", "tiny", "--prompt", "hi", "--max-new-tokens", "2", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["model"] == "tiny" and d["prompt_ids"] == [0, ord("h") + 3, ord("i") + 3]  # byte-level tokenizer
    assert NOTE not in err


def test_config_tiny_v4_is_the_architecture_with_random_weights(capsys):
    code, out, err = run(capsys, "generate", "--config", "tiny-v4", "--seed-weights", "1", "--prompt", "hi",
                         "--max-new-tokens", "2", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["model"] == "tiny-v4" and NOTE not in err
    assert d["prompt_ids"] == [0, ord("h") + 3, ord("i") + 3]  # no tokenizer.json: byte-level, like any --config


def test_seed_weights_without_config_is_one_sentence(capsys):
    for argv in (["info", "--seed-weights", "2"], ["parity", "record", "--suite", "smoke", "--seed-weights", "2",
                                                   "--out", "/nonexistent/x"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and "Traceback" not in err
        line = [x for x in err.splitlines() if x.startswith("dsv4: error:")]
        assert len(line) == 1 and "--seed-weights" in line[0] and "--config" in line[0]


def test_serve_resolves_to_tiny_v4_served_as_tiny_v4():
    """`dsv4 serve` loads a.checkpoint (v4/serve/server.py); main fills it in before the command runs."""
    a = build_parser().parse_args(["serve"])
    pick_model(a)
    assert a.checkpoint == str(DEFAULT_CHECKPOINT) and a.config is None and a.seed_weights == 0
    assert a.served_model_name == "tiny-v4"  # clients send a name, not a path inside the package
    a = build_parser().parse_args(["serve", "--config", "tiny"])
    pick_model(a)
    assert a.checkpoint is None and a.config == "tiny" and a.served_model_name is None
    a = build_parser().parse_args(["serve", "--served-model-name", "mine"])
    pick_model(a)
    assert a.served_model_name == "mine"


def test_parity_record_without_a_model_records_tiny_v4(capsys, tmp_path, tok):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"heldout": 6160, "length": 12}\n{"text": "def main("}\n')
    code, out, err = run(capsys, "parity", "record", "--backend", "reference", "--prompts", str(prompts),
                         "--layers", "none", "--greedy", "2", "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert NOTE in err
    meta = json.loads((tmp_path / "b" / BD.META_FILE).read_text())
    assert meta["weights"]["source"] == "checkpoint" and meta["model"]["config"]["vocab_size"] == 4096
    assert [p["tokens"] for p in meta["prompts"]] == [12, len(tok.encode("def main("))]


@pytest.mark.parametrize("n", [1, 3, 17, 129])
def test_heldout_prompts_are_exactly_n_tokens_for_either_tokenizer(tok, n):
    byte = ByteTokenizer(512, 0, 1)
    for t in (tok, byte):
        ids = R.heldout_ids(6001, n, t, 0)
        assert len(ids) == n and ids[0] == 0
        if n > 1:
            assert R.heldout_text()[6001:].startswith(t.decode(ids[1:]))


def test_heldout_prompt_errors_are_one_sentence(tok):
    from v4.errors import InputError

    with pytest.raises(InputError, match="'heldout' must be a character offset"):
        R.heldout_ids(10**7, 4, tok, 0, "suite x, prompt 0")
    with pytest.raises(InputError, match="has only .* tokens"):
        R.heldout_ids(12400, 500, tok, 0)
    with pytest.raises(InputError, match="'length' >= 1"):
        R._prompt_from_spec({"heldout": 0}, tok, 0, "p")
    with pytest.raises(InputError, match="exactly one of"):
        R._prompt_from_spec({"heldout": 0, "text": "x", "length": 3}, tok, 0, "p")


def test_default_suites_name_no_config_and_long_names_small():
    assert R.load_suite("smoke").config is None and R.load_suite("boundaries").config is None
    assert R.load_suite("long").config == "small"
