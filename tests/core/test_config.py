"""Model and runtime configuration (v4/config.py): the official config.json files, field validation with
the field named, runtime fields and their units, YaRN frequencies.

Expected values come from spec/v4-architecture.md (§1.1 config, §2.4 YaRN), computed by hand in the
tests, never read back from our own output.
"""

from __future__ import annotations

import math

import pytest
import torch

from v4.config import CSA, HCA, SLIDING, ModelConfig, RuntimeConfig, build_runtime, yarn_inv_freq
from v4.errors import ConfigError

# ----------------------------------------------------------------------------- runtime fields


@pytest.mark.parametrize(
    "field,value",
    [("dtype", "int8"), ("mode", "fast"), ("max_num_seqs", 0), ("max_model_len", -5), ("block_size", 0),
     ("prefill_chunk", -1), ("max_num_seqs", True), ("max_num_batched_tokens", 0), ("kv_cache_memory", "lots"),
     ("kv_cache_memory", -1), ("backend", "gpu")],
)
def test_invalid_runtime_field_names_the_field(field, value):
    with pytest.raises(ConfigError) as ei:
        build_runtime({field: value}, env={})
    assert field in str(ei.value)
    with pytest.raises(ConfigError, match=field):
        RuntimeConfig.from_dict({field: value})


@pytest.mark.parametrize("old,new", [("max_batch", "max_num_seqs"), ("max_seq_len", "max_model_len")])
def test_renamed_runtime_fields_say_the_new_name(old, new):
    with pytest.raises(ConfigError, match=f"'runtime.{old}' is now 'runtime.{new}'"):
        build_runtime({old: 8}, env={})


@pytest.mark.parametrize("value,nbytes", [(4096, 4096), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9),
                                          ("1.5GiB", 3 * 2**29), ("100 kib", 102400)])
def test_kv_cache_memory_takes_bytes_or_units(value, nbytes):
    assert build_runtime({"kv_cache_memory": value}, env={}).kv_cache_bytes == nbytes


def test_unknown_runtime_key_is_named():
    with pytest.raises(ConfigError) as ei:
        build_runtime({"backend": "reference", "turbo": True}, env={})
    assert "turbo" in str(ei.value)


# ----------------------------------------------------------------------------- model config

FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4] + [0]


def flash_config_json() -> dict:
    """The official V4-Flash config.json, written from spec §1.1 (launch dump: no expert_dtype)."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "torch_dtype": "bfloat16",
        "vocab_size": 129280,
        "hidden_size": 4096,
        "num_hidden_layers": 43,
        "num_attention_heads": 64,
        "num_key_value_heads": 1,
        "head_dim": 512,
        "qk_rope_head_dim": 64,
        "q_lora_rank": 1024,
        "o_groups": 8,
        "o_lora_rank": 1024,
        "sliding_window": 128,
        "compress_ratios": FLASH_RATIOS,
        "compress_rope_theta": 160000,
        "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 1048576,
        "index_n_heads": 64,
        "index_head_dim": 128,
        "index_topk": 512,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 2048,
        "num_hash_layers": 3,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "rms_norm_eps": 1e-6,
        "num_nextn_predict_layers": 1,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    }


def test_official_flash_config_loads():
    assert len(FLASH_RATIOS) == 44
    cfg = ModelConfig.from_dict(flash_config_json())
    types_ = cfg.layer_types
    assert len(types_) == 43
    assert (types_.count(SLIDING), types_.count(CSA), types_.count(HCA)) == (2, 21, 20)
    # spec §1.1: sliding layers 0,1; CSA even 2..42; HCA odd 3..41
    assert [i for i, t in enumerate(types_) if t == SLIDING] == [0, 1]
    assert [i for i, t in enumerate(types_) if t == CSA] == list(range(2, 43, 2))
    assert [i for i, t in enumerate(types_) if t == HCA] == list(range(3, 42, 2))
    assert cfg.layer_ratio(43) == 0 and cfg.layer_type(43) == SLIDING  # the MTP block
    assert cfg.hca_ratio == 128
    assert cfg.nope_head_dim == 448


def test_official_pro_ratios_layer_counts():
    d = flash_config_json()
    d.update(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
             compress_ratios=[128, 128] + [4, 128] * 29 + [4] + [0], index_topk=1024, n_routed_experts=384,
             moe_intermediate_size=3072, routed_scaling_factor=2.5)
    cfg = ModelConfig.from_dict(d)
    t = cfg.layer_types
    assert (t.count(SLIDING), t.count(CSA), t.count(HCA)) == (0, 30, 31)


def test_official_config_json_file_loads(tmp_path):
    import json

    from v4.config import load_config_file

    ck = tmp_path / "DeepSeek-V4-Flash"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps(flash_config_json()))
    cfg, rt = load_config_file(str(ck))
    assert rt == {}
    assert cfg.name == "DeepSeek-V4-Flash"
    assert cfg.num_hidden_layers == 43 and cfg.compress_ratios == FLASH_RATIOS


@pytest.mark.parametrize(
    "field,value",
    [
        ("o_groups", 5),  # 64 heads are not divisible by 5
        ("compress_ratios", [0, 4, 128]),  # needs 43 + 1 entries
        ("hidden_size", -4096),
        ("num_key_value_heads", 2),
        ("num_attention_heads", 0),
        ("qk_rope_head_dim", 63),
        ("num_experts_per_tok", 300),  # > 256 experts
        ("scoring_func", "softmax"),
        ("tie_word_embeddings", True),
        ("rope_scaling", {"type": "linear", "factor": 4}),
        ("vocab_size", 1.5),
    ],
)
def test_bad_model_field_is_named(field, value):
    d = flash_config_json()
    d[field] = value
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_dict(d, source="my-config.json")
    msg = str(ei.value)
    assert field in msg
    assert "my-config.json" in msg


def test_mtp_ratio_must_be_zero():
    d = flash_config_json()
    d["compress_ratios"] = FLASH_RATIOS[:-1] + [4]
    with pytest.raises(ConfigError, match="compress_ratios"):
        ModelConfig.from_dict(d)


def test_unknown_model_key_is_named():
    d = flash_config_json()
    d["num_experts_per_token"] = 6  # a typo of num_experts_per_tok
    with pytest.raises(ConfigError, match="num_experts_per_token"):
        ModelConfig.from_dict(d)


# ----------------------------------------------------------------------------- YaRN (spec §2.4)


def _base_freqs(dim: int, base: float) -> list[float]:
    return [base ** (-2 * i / dim) for i in range(dim // 2)]


def test_yarn_inv_freq_matches_hand_formula():
    rs = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}
    got = yarn_inv_freq(64, 160000.0, rs)
    # spec §2.4: for rope dim 64, base 160000, L0 65536, beta 32 / 1: lo = 15, hi = 25
    lo, hi, factor = 15, 25, 16
    want = []
    for i, f in enumerate(_base_freqs(64, 160000.0)):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        want.append(f * ramp / factor + f * (1 - ramp))
    assert got.shape == (32,)
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    # sanity on the two ends: untouched high frequencies, fully interpolated low frequencies
    f = _base_freqs(64, 160000.0)
    assert math.isclose(float(got[0]), f[0], rel_tol=1e-12)
    assert math.isclose(float(got[14]), f[14], rel_tol=1e-12)
    assert math.isclose(float(got[25]), f[25] / 16, rel_tol=1e-12)
    assert math.isclose(float(got[31]), f[31] / 16, rel_tol=1e-12)


def test_yarn_bounds_from_spec_formula():
    # the lo / hi the spec quotes follow from its own formula
    d, base, L0 = 64, 160000.0, 65536
    lo = max(math.floor(d * math.log(L0 / (32 * 2 * math.pi)) / (2 * math.log(base))), 0)
    hi = min(math.ceil(d * math.log(L0 / (1 * 2 * math.pi)) / (2 * math.log(base))), d - 1)
    assert (lo, hi) == (15, 25)


def test_plain_rope_inv_freq():
    got = yarn_inv_freq(64, 10000.0, None)
    want = torch.tensor(_base_freqs(64, 10000.0), dtype=torch.float64)
    assert torch.allclose(got.double(), want, rtol=1e-12, atol=0)
