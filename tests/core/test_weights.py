"""Checkpoint tensor set, random-weight writer, streaming loader and its error messages."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from v4.config import ModelConfig
from v4.errors import CheckpointError
from v4.quant import QuantizedWeight
from v4.weights import (
    INDEX_FILE,
    canonical_name,
    checkpoint_hash,
    expected_tensors,
    init_checkpoint,
    init_tensor,
    load_checkpoint,
)

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def make_cfg(**kw) -> ModelConfig:
    d = dict(
        vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, head_dim=128,
        qk_rope_head_dim=64, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=16,
        compress_ratios=[0, 4, 16, 0], index_n_heads=8, index_head_dim=64, index_topk=4,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=64,
        num_hash_layers=1, num_nextn_predict_layers=1, max_position_embeddings=4096, name="tiny",
    )
    d.update(kw)
    cfg = ModelConfig(**d)
    cfg.validate()
    return cfg


def same_model(a: ModelConfig, b: ModelConfig) -> bool:
    return dataclasses.replace(a, name="x") == dataclasses.replace(b, name="x")


@pytest.fixture(scope="module")
def cfg():
    return make_cfg()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, cfg):
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "bf16": init_checkpoint(cfg, root / "bf16", quant="bf16", progress=False),
        "fp32": init_checkpoint(cfg, root / "fp32", quant="fp32", progress=False),
        "fp8": init_checkpoint(cfg, root / "fp8", quant="fp8", progress=False),
        "multi": init_checkpoint(cfg, root / "multi", quant="bf16", max_shard_bytes=96 * 1024, progress=False),
    }


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_of(root: Path, name: str) -> Path:
    wm = json.loads((root / INDEX_FILE).read_text())["weight_map"]
    return root / wm[name]


def edit_shard(shard: Path, fn) -> None:
    tensors = load_file(str(shard))
    fn(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def edit_index(root: Path, fn) -> None:
    p = root / INDEX_FILE
    idx = json.loads(p.read_text())
    fn(idx["weight_map"])
    p.write_text(json.dumps(idx))


def load_quiet(path, cfg=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MTP warning expected here
        return load_checkpoint(path, cfg, progress=False)


# ------------------------------------------------------------------------------------------
# tensor set


def test_expected_tensors_tiny(cfg):
    s = expected_tensors(cfg)
    assert s["embed.weight"].shape == (300, 64) and s["head.weight"].shape == (300, 64)
    assert s["hc_head_fn"].shape == (4, 256) and s["hc_head_scale"].shape == (1,)
    assert s["layers.0.hc_attn_fn"].shape == (24, 256) and s["layers.0.hc_ffn_base"].role == "fp32"
    assert s["layers.0.attn.wo_a.weight"].shape == (32, 256)  # [G*o_lora, H*c/G]
    assert s["layers.0.attn.wo_b.weight"].shape == (64, 32)
    assert s["layers.0.attn.wq_b.weight"].shape == (512, 32) and s["layers.0.attn.wq_b.weight"].role == "fp8able"
    # layer 0 sliding, 1 CSA (overlap, indexer), 2 HCA
    assert not any(k.startswith("layers.0.attn.compressor") for k in s)
    assert s["layers.1.attn.compressor.wkv.weight"].shape == (256, 64)
    assert s["layers.1.attn.compressor.wgate.weight"].shape == (256, 64)
    assert s["layers.1.attn.compressor.ape"].shape == (4, 256)
    assert s["layers.1.attn.compressor.norm.weight"].shape == (128,)
    assert s["layers.2.attn.compressor.wkv.weight"].shape == (128, 64)
    assert s["layers.2.attn.compressor.ape"].shape == (16, 128)
    assert s["layers.1.attn.indexer.wq_b.weight"].shape == (512, 32)
    assert s["layers.1.attn.indexer.weights_proj.weight"].shape == (8, 64)
    assert s["layers.1.attn.indexer.compressor.wgate.weight"].shape == (128, 64)
    assert s["layers.1.attn.indexer.compressor.ape"].shape == (4, 128)
    assert s["layers.1.attn.indexer.compressor.norm.weight"].shape == (64,)
    assert not any(k.startswith("layers.2.attn.indexer") for k in s)
    # hash routing on layer 0 only; MTP gate has a bias
    assert s["layers.0.ffn.gate.tid2eid"].shape == (300, 2) and s["layers.0.ffn.gate.tid2eid"].role == "index"
    assert "layers.0.ffn.gate.bias" not in s and s["layers.1.ffn.gate.bias"].shape == (4,)
    assert (
        s["layers.2.ffn.experts.3.w2.weight"].shape == (64, 64)
        and s["layers.2.ffn.experts.3.w2.weight"].role == "expert"
    )
    assert s["layers.2.ffn.shared_experts.w1.weight"].role == "fp8able"
    assert s["mtp.0.e_proj.weight"].shape == (64, 64) and s["mtp.0.e_proj.weight"].role == "fp8able"
    assert s["mtp.0.ffn.gate.bias"].shape == (4,) and "mtp.0.ffn.gate.tid2eid" not in s
    assert not any(k.startswith("mtp.0.attn.compressor") or k.startswith("mtp.0.attn.indexer") for k in s)
    for k in ("mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.norm.weight",
              "mtp.0.hc_head_fn", "mtp.0.hc_head_base", "mtp.0.hc_head_scale"):
        assert k in s
    assert "mtp.0.embed.weight" not in s and "mtp.0.head.weight" not in s
    no_shared = expected_tensors(make_cfg(n_shared_experts=0))
    assert not any("shared_experts" in k for k in no_shared)


def test_expected_tensors_match_official_flash_header():
    """Tensor count and total_size of the official V4-Flash release (spec §0, §4.1)."""
    s = expected_tensors(ModelConfig())
    n, size = 0, 0
    for spec in s.values():
        numel = math.prod(spec.shape)
        if spec.role == "expert":  # FP4 packed + per-32 scale
            n, size = n + 2, size + numel // 2 + numel // 32
        elif spec.role == "fp8able":
            n, size = n + 2, size + numel + math.prod(-(-d // 128) for d in spec.shape)
        else:
            n, size = n + 1, size + numel * {"fp32": 4, "index": 8, "float": 2}[spec.role]
    assert n == 69187 and size == 159_609_485_896
    assert s["layers.2.attn.wo_a.weight"].shape == (8192, 4096)
    assert s["layers.0.ffn.experts.0.w1.weight"].shape == (2048, 4096)


def test_canonical_name():
    assert canonical_name("model.embed_tokens.weight") == "embed.weight"
    assert canonical_name("lm_head.weight") == "head.weight"
    assert canonical_name("head.weight") == "head.weight"
    assert canonical_name("model.hc_head.hc_fn") == "hc_head_fn"
    assert canonical_name("model.hc_head.hc_scale") == "hc_head_scale"
    assert canonical_name("model.layers.3.attn.norm.weight") == "layers.3.attn.kv_norm.weight"
    assert canonical_name("layers.3.attn.compressor.norm.weight") == "layers.3.attn.compressor.norm.weight"
    assert (
        canonical_name("model.layers.3.attn.indexer.compressor.norm.weight")
        == "layers.3.attn.indexer.compressor.norm.weight"
    )
    assert canonical_name("layers.0.attn.wq_a.scale") == "layers.0.attn.wq_a.scale"
    assert canonical_name("mtp.0.embed.weight") is None and canonical_name("mtp.0.head.weight") is None
    assert canonical_name("mtp.0.enorm.weight") == "mtp.0.enorm.weight"


# ------------------------------------------------------------------------------------------
# writer + loader round trips


def test_roundtrip_bf16(cfg, ckpts):
    root = ckpts["bf16"]
    assert sorted(p.name for p in root.iterdir()) == ["config.json", "model-00001-of-00001.safetensors", INDEX_FILE]
    assert "quantization_config" not in json.loads((root / "config.json").read_text())
    got_cfg, w = load_quiet(root)
    assert same_model(got_cfg, cfg)
    specs = expected_tensors(cfg)
    assert list(w) == list(specs)
    stored = load_file(str(root / "model-00001-of-00001.safetensors"))
    assert set(stored) == set(specs)
    for name, spec in specs.items():
        t = w[name]
        assert isinstance(t, torch.Tensor) and tuple(t.shape) == spec.shape
        want = {"fp32": torch.float32, "index": torch.int64}.get(spec.role, torch.bfloat16)
        assert t.dtype == want, name
        assert torch.equal(t.view(torch.uint8) if t.is_floating_point() else t,
                           stored[name].view(torch.uint8) if t.is_floating_point() else stored[name]), name


def test_roundtrip_fp32_and_init_sanity(cfg, ckpts):
    _, w32 = load_quiet(ckpts["fp32"])
    _, w16 = load_quiet(ckpts["bf16"])
    specs = expected_tensors(cfg)
    for name, spec in specs.items():
        t = w32[name]
        assert t.dtype == (torch.int64 if spec.role == "index" else torch.float32), name
        if spec.role == "index":
            assert torch.equal(t, w16[name])
            continue
        assert torch.isfinite(t).all(), name
        assert torch.equal(t.to(w16[name].dtype), w16[name]), name  # same seed: bf16 = round(fp32)
    # the scales the init promises
    assert abs(w32["embed.weight"].std().item() - 1.0) < 0.1
    assert abs(w32["layers.0.attn.wq_a.weight"].std().item() * math.sqrt(64) - 1.0) < 0.2
    assert abs(w32["layers.0.attn.wo_a.weight"].std().item() * math.sqrt(256) - 1.0) < 0.2
    assert abs(w32["layers.0.hc_attn_fn"].std().item() * math.sqrt(256) - 1.0) < 0.2
    assert abs(w32["layers.1.attn_norm.weight"].mean().item() - 1.0) < 0.1
    assert abs(w32["layers.1.hc_ffn_scale"].mean().item() - 1.0) < 0.3
    tid = w32["layers.0.ffn.gate.tid2eid"]
    assert tid.shape == (300, 2) and tid.min() >= 0 and tid.max() < 4
    assert (tid[:, 0] != tid[:, 1]).all()
    assert len({tuple(r) for r in tid.tolist()}) > 6  # not one routing for every token


def test_seed_determinism_and_sharding(cfg, ckpts, tmp_path):
    root = ckpts["multi"]
    shards = sorted(root.glob("model-*.safetensors"))
    assert len(shards) > 2
    n = len(shards)
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    idx = json.loads((root / INDEX_FILE).read_text())
    assert set(idx["weight_map"]) == set(expected_tensors(cfg))
    assert set(idx["weight_map"].values()) == {p.name for p in shards}
    total = sum(t.numel() * t.element_size() for p in shards for t in load_file(str(p)).values())
    assert idx["metadata"]["total_size"] == total
    _, wm = load_quiet(root)
    _, w1 = load_quiet(ckpts["bf16"])
    assert all(torch.equal(wm[k], w1[k]) for k in w1)  # shard size does not change the values
    # same seed -> same bytes; other seed -> other values and other hash
    again = init_checkpoint(cfg, tmp_path / "again", quant="bf16", progress=False)
    other = init_checkpoint(cfg, tmp_path / "other", quant="bf16", seed=1, progress=False)
    assert checkpoint_hash(again) == checkpoint_hash(ckpts["bf16"])
    assert checkpoint_hash(other) != checkpoint_hash(ckpts["bf16"])
    assert checkpoint_hash(root) != checkpoint_hash(ckpts["bf16"])
    _, wo = load_quiet(other)
    assert not torch.equal(wo["embed.weight"], w1["embed.weight"])


def test_roundtrip_fp8(cfg, ckpts):
    root = ckpts["fp8"]
    conf = json.loads((root / "config.json").read_text())
    assert conf["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    }
    assert conf["expert_dtype"] == "fp4"
    got_cfg, w = load_quiet(root)
    assert got_cfg.expert_dtype == "fp4"
    _, w16 = load_quiet(ckpts["bf16"])
    _, w32 = load_quiet(ckpts["fp32"])
    specs = expected_tensors(cfg)
    for name, spec in specs.items():
        v = w[name]
        if spec.role == "fp8able":
            assert isinstance(v, QuantizedWeight) and v.fmt == "fp8", name
            assert v.data.dtype == torch.float8_e4m3fn and tuple(v.data.shape) == spec.shape
            assert v.scale.dtype == torch.float8_e8m0fnu
            assert tuple(v.scale.shape) == tuple(-(-d // 128) for d in spec.shape)
            assert v.shape == spec.shape
        elif spec.role == "expert":
            assert isinstance(v, QuantizedWeight) and v.fmt == "fp4", name
            assert v.data.dtype == torch.int8 and tuple(v.data.shape) == (spec.shape[0], spec.shape[1] // 2)
            assert v.scale.dtype == torch.float8_e8m0fnu and tuple(v.scale.shape) == (
                spec.shape[0],
                spec.shape[1] // 32,
            )
            assert v.shape == spec.shape
        else:
            assert isinstance(v, torch.Tensor) and torch.equal(v, w16[name]), name

    # FP8: dequantised element = e4m3 value * 2^(scale byte - 127), by hand
    q = w["layers.1.attn.wq_b.weight"]  # [512, 32]: 4 row blocks
    i, j = 300, 17
    s_byte = int(q.scale.view(torch.uint8)[i // 128, j // 128])
    by_hand = float(q.data[i, j].to(torch.float32)) * 2.0 ** (s_byte - 127)
    deq = q.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == (512, 32)
    assert deq[i, j].item() == by_hand
    ref = w32["layers.1.attn.wq_b.weight"]  # same seed: quantised from these values
    assert torch.nn.functional.cosine_similarity(deq.flatten(), ref.flatten(), dim=0) > 0.99

    # FP4: element 2k is the low nibble of byte k, scale per 32 inputs
    e = w["layers.2.ffn.experts.1.w2.weight"]  # [64, 64]
    deq = e.dequantize()
    for i, j in ((5, 40), (5, 41), (63, 0)):
        byte = int(e.data[i, j // 2].view(torch.uint8))
        nib = (byte >> 4) if j % 2 else (byte & 0x0F)
        s_byte = int(e.scale.view(torch.uint8)[i, j // 32])
        assert deq[i, j].item() == E2M1[nib] * 2.0 ** (s_byte - 127)
    ref = w32["layers.2.ffn.experts.1.w2.weight"]
    assert torch.nn.functional.cosine_similarity(deq.flatten(), ref.flatten(), dim=0) > 0.95


def test_init_fp4_needs_multiple_of_32(tmp_path):
    with pytest.raises(CheckpointError, match="hidden_size=48"):
        init_checkpoint(make_cfg(hidden_size=48), tmp_path / "x", quant="fp8", progress=False)
    with pytest.raises(CheckpointError, match="quant"):
        init_checkpoint(make_cfg(), tmp_path / "y", quant="int4", progress=False)


def test_init_tensor_is_per_name(cfg):
    s = expected_tensors(cfg)
    a = init_tensor("layers.1.attn.wkv.weight", s["layers.1.attn.wkv.weight"], cfg, seed=3)
    b = init_tensor("layers.1.attn.wkv.weight", s["layers.1.attn.wkv.weight"], cfg, seed=3)
    c = init_tensor("layers.2.attn.wkv.weight", s["layers.2.attn.wkv.weight"], cfg, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_missing_mtp_is_dropped_with_warning(tmp_path):
    no_mtp = make_cfg(num_nextn_predict_layers=0, compress_ratios=[0, 4, 16])
    root = init_checkpoint(no_mtp, tmp_path / "c", progress=False)
    with pytest.warns(UserWarning, match="mtp"):
        got, w = load_checkpoint(root, make_cfg(), progress=False)
    assert got.num_nextn_predict_layers == 0 and got.compress_ratios == [0, 4, 16]
    assert set(w) == set(expected_tensors(no_mtp))


def test_explicit_cfg_without_config_json(cfg, ckpts, tmp_path):
    root = copy_ckpt(ckpts["bf16"], tmp_path / "c")
    (root / "config.json").unlink()
    got, w = load_quiet(root, cfg)
    assert got is cfg and len(w) == len(expected_tensors(cfg))
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(root, progress=False)


def test_no_index_several_files(cfg, ckpts, tmp_path):
    root = copy_ckpt(ckpts["multi"], tmp_path / "c")
    (root / INDEX_FILE).unlink()
    _, w = load_quiet(root)
    _, w1 = load_quiet(ckpts["bf16"])
    assert all(torch.equal(w[k], w1[k]) for k in w1)


def test_accepted_alternative_forms(cfg, ckpts, tmp_path):
    """FP8 block-scaled experts with F32 scales (-Base style), I32 tid2eid, BF16 fp32-extras, F16 floats."""
    from v4.quant import quant_fp8_block

    root = copy_ckpt(ckpts["fp8"], tmp_path / "c")
    shard = root / "model-00001-of-00001.safetensors"
    _, w32 = load_quiet(ckpts["fp32"])
    ex = "layers.1.ffn.experts.2.w3.weight"
    data, scale = quant_fp8_block(w32[ex])

    def change(t):
        t[ex] = data
        t["layers.1.ffn.experts.2.w3.scale"] = scale.to(torch.float32)
        t["layers.0.ffn.gate.tid2eid"] = t["layers.0.ffn.gate.tid2eid"].to(torch.int32)
        t["layers.1.attn.compressor.ape"] = t["layers.1.attn.compressor.ape"].to(torch.bfloat16)
        t["norm.weight"] = t["norm.weight"].to(torch.float16)

    edit_shard(shard, change)
    (root / INDEX_FILE).unlink()
    _, w = load_quiet(root)
    q = w[ex]
    assert isinstance(q, QuantizedWeight) and q.fmt == "fp8" and q.scale.dtype == torch.float32 and q.shape == (64, 64)
    assert torch.nn.functional.cosine_similarity(q.dequantize().flatten(), w32[ex].flatten(), dim=0) > 0.99
    assert w["layers.0.ffn.gate.tid2eid"].dtype == torch.int32
    assert w["layers.1.attn.compressor.ape"].dtype == torch.bfloat16
    assert w["norm.weight"].dtype == torch.float16


def test_scale_in_another_shard(cfg, tmp_path):
    root = init_checkpoint(cfg, tmp_path / "c", quant="fp8", max_shard_bytes=64 * 1024, progress=False)
    name, sname = "layers.1.attn.wq_b.weight", "layers.1.attn.wq_b.scale"
    src = shard_of(root, sname)
    dst = sorted(root.glob("model-*.safetensors"))[-1]
    assert src != dst
    moved = {}
    edit_shard(src, lambda t: moved.setdefault(sname, t.pop(sname)))
    edit_shard(dst, lambda t: t.update(moved))
    edit_index(root, lambda wm: wm.__setitem__(sname, dst.name))
    _, w = load_quiet(root)
    assert isinstance(w[name], QuantizedWeight) and torch.equal(
        w[name].scale.view(torch.uint8), moved[sname].view(torch.uint8)
    )


# ------------------------------------------------------------------------------------------
# transformers' save_pretrained


_HF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn", "attn_hc.base": "hc_attn_base", "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn", "ffn_hc.base": "hc_ffn_base", "ffn_hc.scale": "hc_ffn_scale",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
}
_HF_TOP = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}


def hf_state_dict_to_official(sd: dict, inter: int) -> dict:
    """transformers module names (spec §4.4) -> official names; independent of the loader's aliases."""
    out = {}
    for k, v in sd.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", k)
        assert m, k
        layer, rest = m.groups()
        p = f"layers.{layer}."
        if rest == "mlp.experts.gate_up_proj":  # [E, 2I, D]: w1 rows then w3 rows
            for e in range(v.shape[0]):
                out[f"{p}ffn.experts.{e}.w1.weight"] = v[e, :inter]
                out[f"{p}ffn.experts.{e}.w3.weight"] = v[e, inter:]
        elif rest == "mlp.experts.down_proj":  # [E, D, I]
            for e in range(v.shape[0]):
                out[f"{p}ffn.experts.{e}.w2.weight"] = v[e]
        else:
            out[p + _HF_LAYER[rest]] = v
    return out


def hf_tiny_config(tf):
    # compress_ratios= (the legacy kwarg) only knows the ratios 0/4/128, so the HCA ratio 16 goes in compress_rates
    return tf.DeepseekV4Config(
        vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, head_dim=128,
        qk_rope_head_dim=64, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=16,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        index_n_heads=8, index_head_dim=64, index_topk=4, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=64, num_hash_layers=1, max_position_embeddings=4096,
    )


def test_transformers_save_pretrained_loads(tmp_path):
    import transformers as tf
    hcfg = hf_tiny_config(tf)
    torch.manual_seed(0)
    model = tf.DeepseekV4ForCausalLM(hcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # transformers inits many tensors to 0 / 1: make every value distinct
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randint(0, 4, t.shape, generator=g))
    model.save_pretrained(tmp_path / "hf")
    ref = hf_state_dict_to_official(model.state_dict(), inter=64)

    with pytest.warns(UserWarning, match="no mtp"):
        got_cfg, w = load_checkpoint(tmp_path / "hf", progress=False)
    assert got_cfg.num_nextn_predict_layers == 0 and got_cfg.compress_ratios == [0, 4, 16]
    assert got_cfg.hidden_size == 64 and got_cfg.num_hash_layers == 1 and got_cfg.qk_rope_head_dim == 64
    assert set(w) == set(ref) == set(expected_tensors(got_cfg))
    for k, v in ref.items():
        assert isinstance(w[k], torch.Tensor) and torch.equal(w[k], v), k


def test_random_init_is_numerically_sane(ckpts, tmp_path):
    """Our seeded init, run through transformers' DeepseekV4 forward: finite, O(1), not degenerate."""
    import transformers as tf
    model = tf.DeepseekV4ForCausalLM(hf_tiny_config(tf)).eval()
    _, w = load_quiet(ckpts["fp32"])
    with torch.no_grad():
        for k, view in hf_state_dict_to_official(model.state_dict(), inter=64).items():
            view.copy_(w[k])  # views share storage with the model's parameters
        ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
        out = model(ids, output_hidden_states=True)
    logits = out.logits
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std(-1).mean().item() < 3.0
    assert logits.argmax(-1).unique().numel() > 10
    for h in out.hidden_states:
        assert 0.3 < h.float().pow(2).mean().sqrt().item() < 5.0


# ------------------------------------------------------------------------------------------
# errors: one sentence naming the file / tensor


def test_error_dir_missing_and_empty(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path / "empty", progress=False)
    (tmp_path / "empty" / "config.json").write_text(json.dumps(make_cfg().to_hf_dict()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(tmp_path / "empty", progress=False)


def test_error_truncated_shard(ckpts, tmp_path):
    root = copy_ckpt(ckpts["multi"], tmp_path / "c")
    shard = shard_of(root, "layers.1.attn.wq_b.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated") as ei:
        load_checkpoint(root, progress=False)
    assert shard.name in str(ei.value)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt") as ei:
        load_checkpoint(root, progress=False)
    assert shard.name in str(ei.value)
    shard.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        load_checkpoint(root, progress=False)


def test_error_missing_shard(ckpts, tmp_path):
    root = copy_ckpt(ckpts["multi"], tmp_path / "c")
    shard = shard_of(root, "layers.2.attn.wo_a.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing") as ei:
        load_checkpoint(root, progress=False)
    assert shard.name in str(ei.value)


def test_error_wrong_shape(ckpts, tmp_path):
    root = copy_ckpt(ckpts["multi"], tmp_path / "c")
    name = "layers.1.attn.wo_a.weight"
    shard = shard_of(root, name)
    edit_shard(shard, lambda t: t.__setitem__(name, torch.zeros(32, 128, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(root, progress=False)
    msg = str(ei.value)
    assert name in msg and shard.name in msg and "[32, 128]" in msg and "[32, 256]" in msg
    assert "num_attention_heads=4" in msg and "o_groups=2" in msg


def test_error_config_contradicts_weights(ckpts, tmp_path):
    root = copy_ckpt(ckpts["bf16"], tmp_path / "c")
    conf = json.loads((root / "config.json").read_text())
    conf["hidden_size"] = 128
    (root / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(root, progress=False)
    msg = str(ei.value)
    assert "embed.weight" in msg and "hidden_size=128" in msg and "config.json" in msg


@pytest.mark.parametrize(
    "name,bad",
    [
        ("layers.0.attn_norm.weight", torch.zeros(64, dtype=torch.int32)),
        ("layers.0.ffn.gate.tid2eid", torch.zeros(300, 2, dtype=torch.float32)),
        ("layers.1.attn.wq_a.weight", torch.zeros(32, 64, dtype=torch.int8)),
    ],
)
def test_error_wrong_dtype(ckpts, tmp_path, name, bad):
    root = copy_ckpt(ckpts["multi"], tmp_path / "c")
    shard = shard_of(root, name)
    edit_shard(shard, lambda t: t.__setitem__(name, bad))
    with pytest.raises(CheckpointError, match="dtype") as ei:
        load_checkpoint(root, progress=False)
    assert name in str(ei.value) and shard.name in str(ei.value)


def test_error_unknown_tensor(ckpts, tmp_path):
    root = copy_ckpt(ckpts["multi"], tmp_path / "c")
    shard = shard_of(root, "layers.0.attn.wkv.weight")
    extra = "layers.0.attn.compressor.wkv.weight"  # layer 0 is sliding-only
    edit_shard(shard, lambda t: t.__setitem__(extra, torch.zeros(128, 64, dtype=torch.bfloat16)))
    edit_index(root, lambda wm: wm.__setitem__(extra, shard.name))
    with pytest.raises(CheckpointError, match="unknown tensor") as ei:
        load_checkpoint(root, progress=False)
    msg = str(ei.value)
    assert extra in msg and shard.name in msg and "compress_ratios[0]=0" in msg


def test_error_duplicate_alias(ckpts, tmp_path):
    root = copy_ckpt(ckpts["bf16"], tmp_path / "c")
    (root / INDEX_FILE).unlink()
    shard = root / "model-00001-of-00001.safetensors"
    edit_shard(shard, lambda t: t.__setitem__("model.embed_tokens.weight", t["embed.weight"].clone()))
    with pytest.raises(CheckpointError, match="twice") as ei:
        load_checkpoint(root, progress=False)
    assert "embed.weight" in str(ei.value)


def test_error_missing_tensor(ckpts, tmp_path):
    name = "layers.2.ffn.experts.3.w2.weight"
    # the index still lists it: the message names the shard
    root = copy_ckpt(ckpts["multi"], tmp_path / "a")
    shard = shard_of(root, name)
    edit_shard(shard, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="missing") as ei:
        load_checkpoint(root, progress=False)
    assert name in str(ei.value) and shard.name in str(ei.value)
    # gone from the index too
    edit_index(root, lambda wm: wm.pop(name))
    with pytest.raises(CheckpointError, match="not found in any shard") as ei:
        load_checkpoint(root, progress=False)
    assert name in str(ei.value)


def test_error_scale_pairing(ckpts, tmp_path):
    name = "layers.0.attn.wq_a.weight"
    sname = "layers.0.attn.wq_a.scale"
    # FP8 weight without its scale
    root = copy_ckpt(ckpts["fp8"], tmp_path / "a")
    shard = shard_of(root, name)
    edit_shard(shard, lambda t: t.pop(sname))
    edit_index(root, lambda wm: wm.pop(sname))
    with pytest.raises(CheckpointError, match="no layers.0.attn.wq_a.scale") as ei:
        load_checkpoint(root, progress=False)
    assert name in str(ei.value) and shard.name in str(ei.value)
    # scale without its weight
    root = copy_ckpt(ckpts["fp8"], tmp_path / "b")
    edit_shard(shard_of(root, name), lambda t: t.pop(name))
    edit_index(root, lambda wm: wm.pop(name))
    with pytest.raises(CheckpointError, match="without its weight") as ei:
        load_checkpoint(root, progress=False)
    assert sname in str(ei.value)
    # scale of the wrong shape
    root = copy_ckpt(ckpts["fp8"], tmp_path / "c")
    edit_shard(shard_of(root, name), lambda t: t.__setitem__(sname, torch.ones(2, 2, dtype=torch.float32)))
    with pytest.raises(CheckpointError, match=re.escape(sname)):
        load_checkpoint(root, progress=False)
