"""Loader fixes of issue 14: which *.safetensors files make the checkpoint (transformers' rule), and a
compress_ratios list that keeps the removed MTP block's trailing entry."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from v4.config import ModelConfig, load_config_file
from v4.errors import CheckpointError, ConfigError
from v4.weights import INDEX_FILE, checkpoint_hash, expected_tensors, init_checkpoint, load_checkpoint


@pytest.fixture(scope="module")
def tiny():
    cfg, _ = load_config_file("tiny")
    return cfg


@pytest.fixture(scope="module")
def one_shard(tiny, tmp_path_factory):
    return init_checkpoint(tiny, tmp_path_factory.mktemp("one") / "c", progress=False)


@pytest.fixture(scope="module")
def multi_shard(tiny, tmp_path_factory):
    root = init_checkpoint(tiny, tmp_path_factory.mktemp("multi") / "c", max_shard_bytes=96 * 1024, progress=False)
    assert len(list(root.glob("model-*.safetensors"))) > 2
    return root


@pytest.fixture(scope="module")
def reference(one_shard):
    return load_checkpoint(one_shard, progress=False)[1]


def load_recording(path, cfg=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got_cfg, w = load_checkpoint(path, cfg, progress=False)
    return got_cfg, w, [str(c.message) for c in caught]


def same_tensors(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def single_file_ckpt(one_shard: Path, dst: Path) -> Path:
    """The one-shard checkpoint as transformers writes a small model: model.safetensors, no index."""
    shutil.copytree(one_shard, dst)
    (dst / "model-00001-of-00001.safetensors").rename(dst / "model.safetensors")
    (dst / INDEX_FILE).unlink()
    return dst


# ------------------------------------------------------------------------------------------
# which files are the checkpoint


def test_model_safetensors_alone_loads_without_warning(one_shard, reference, tmp_path):
    root = single_file_ckpt(one_shard, tmp_path / "c")
    _, w, msgs = load_recording(root)
    assert msgs == []
    assert same_tensors(w, reference)


def test_stray_files_beside_model_safetensors_are_ignored_with_a_warning(one_shard, reference, tmp_path):
    root = single_file_ckpt(one_shard, tmp_path / "c")
    hash_before = checkpoint_hash(root)
    # a dump of logits (an unknown tensor "ids") and a copy of a checkpoint tensor ("stored twice")
    save_file({"ids": torch.arange(8), "logits": torch.zeros(8, 512)}, str(root / "logits.safetensors"))
    save_file({"embed.weight": reference["embed.weight"].clone()}, str(root / "embed-copy.safetensors"))

    _, w, msgs = load_recording(root)
    assert same_tensors(w, reference)
    assert len(msgs) == 1, msgs
    msg = msgs[0]
    assert "embed-copy.safetensors" in msg and "logits.safetensors" in msg
    assert "model.safetensors" in msg and INDEX_FILE in msg  # says why
    assert msg.count(". ") == 0 and msg.count(";") <= 1  # one sentence
    # the fingerprint covers what is loaded, and says nothing itself
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint_hash(root) == hash_before


def test_no_index_no_model_safetensors_loads_every_shard(multi_shard, reference, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(multi_shard, root)
    (root / INDEX_FILE).unlink()
    _, w, msgs = load_recording(root)
    assert msgs == []
    assert same_tensors(w, reference)
    # an extra file is still read as a shard there (today's behaviour), so a logits dump is refused
    save_file({"ids": torch.arange(8)}, str(root / "logits.safetensors"))
    with pytest.raises(CheckpointError, match="unknown tensor ids in logits.safetensors"):
        load_checkpoint(root, progress=False)


def test_index_still_rules(multi_shard, reference, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(multi_shard, root)
    # files the index does not list, a model.safetensors among them, are not read
    save_file({"ids": torch.arange(8)}, str(root / "logits.safetensors"))
    save_file({"embed.weight": reference["embed.weight"].clone()}, str(root / "model.safetensors"))
    _, w, msgs = load_recording(root)
    assert msgs == []
    assert same_tensors(w, reference)
    # and the index is what is checked: a shard it names that is gone is an error
    shard = json.loads((root / INDEX_FILE).read_text())["weight_map"]["layers.2.attn.wo_a.weight"]
    (root / shard).unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard)):
        load_checkpoint(root, progress=False)


# ------------------------------------------------------------------------------------------
# compress_ratios with the MTP block's trailing entry


def no_mtp_hf_dict(tiny: ModelConfig, ratios: list, nextn: int = 0) -> dict:
    cfg = dataclasses.replace(tiny, num_nextn_predict_layers=0, compress_ratios=list(tiny.compress_ratios[:4]))
    d = cfg.to_hf_dict()
    d["num_nextn_predict_layers"] = nextn
    d["compress_ratios"] = ratios
    return d


def test_trailing_compress_ratio_accepted_with_warning(tiny, tmp_path):
    assert tiny.num_nextn_predict_layers == 1 and tiny.compress_ratios == [0, 4, 16, 4, 0]
    path = tmp_path / "m" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(no_mtp_hf_dict(tiny, [0, 4, 16, 4, 0])))
    with pytest.warns(UserWarning) as rec:
        cfg, _ = load_config_file(str(path))
    msgs = [str(r.message) for r in rec]
    assert len(msgs) == 1 and "'compress_ratios'" in msgs[0] and str(path) in msgs[0]
    assert cfg.num_nextn_predict_layers == 0 and cfg.compress_ratios == [0, 4, 16, 4]
    cfg.validate()  # the trimmed config validates again without a second warning or an error


def test_trailing_compress_ratio_checkpoint_loads(tiny, tmp_path):
    no_mtp = dataclasses.replace(tiny, num_nextn_predict_layers=0, compress_ratios=[0, 4, 16, 4])
    root = init_checkpoint(no_mtp, tmp_path / "c", progress=False)
    cpath = root / "config.json"
    conf = json.loads(cpath.read_text())
    conf["compress_ratios"] = [0, 4, 16, 4, 0]  # the official list, MTP block removed
    cpath.write_text(json.dumps(conf))
    got, w, msgs = load_recording(root)
    assert len(msgs) == 1 and "'compress_ratios'" in msgs[0] and str(cpath) in msgs[0]
    assert got.compress_ratios == [0, 4, 16, 4] and got.num_nextn_predict_layers == 0
    assert set(w) == set(expected_tensors(no_mtp))


@pytest.mark.parametrize(
    "ratios,nextn,n",
    [
        ([0, 4, 16, 4, 0, 0], 0, 4),  # two extra entries
        ([0, 4, 16], 0, 4),  # one short
        ([0, 4, 16, 4, 0, 0], 1, 5),  # the trailing entry is accepted only without MTP blocks
    ],
)
def test_wrong_compress_ratio_count_still_refused(tiny, tmp_path, ratios, nextn, n):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(no_mtp_hf_dict(tiny, ratios, nextn)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError) as ei:
            load_config_file(str(path))
    assert str(ei.value) == (
        f"{path}: field 'compress_ratios' must list one ratio per layer plus one per MTP block "
        f"({n} entries), got {len(ratios)}"
    )
