"""`dsv4 plan` and v4/dist/deployment.py: weight bytes per rank, KV bytes and capacity, EP traffic, exit codes.

Expected figures are worked out by hand in each test from the config's numbers (written out as
literals: tiny.yaml's shapes, V4-Flash's 43 layers), not read back from the module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from v4.cache import CacheGeometry
from v4.config import load_config_file
from v4.dist import deployment as D
from v4.dist.parallel import ParallelConfig
from v4.dist.shard import Slice

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs" / "deploy").glob("*.yaml"))
GiB = 2**30


@pytest.fixture(scope="module")
def flash():
    return load_config_file("v4-flash")[0]


def run(capsys, *argv):
    code = D.main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path, text: str, name: str = "dep.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


H100_DP8 = """\
hardware: {kind: H100, devices: 8, device_memory: 81559MiB, fp8: true}
model: v4-flash
weights: fp8
parallel: {tensor_parallel_size: 1, data_parallel_size: 8, enable_expert_parallel: true}
runtime: {max_num_seqs: 32, block_size: 128, max_model_len: 262144, workspace_reserve: RESERVE}
"""


# ----------------------------------------------------------------------------- weight bytes by hand
# tiny.yaml: vocab 512, hidden 64, 4 layers + 1 MTP block (ratios 0, 4, 16, 4 | 0), 4 heads x head_dim 128,
# q_lora 32, o_groups 2 x o_lora 16, 8 index heads x 128, 8 experts (top-2) + 1 shared of 64, hc_mult 4,
# 1 hash layer. Blocks: layers 0-3 and mtp.0 (5 in all); CSA at layers 1 and 3, HCA (ratio 16) at layer 2.

BLOCKS = 5
HC = 24 * 256 * 4 * 2 + 24 * 4 * 2 + 3 * 4 * 2  # hc_{attn,ffn}_fn [24, 256], _base [24], _scale [3], fp32
# float/fp32 tensors of the compressors and the indexer: the same bytes in every weight form and on every
# rank (replicated under TP)
CSA_COMP = (256 * 64 * 2 + 128) * 2 + 4 * 256 * 4  # wkv, wgate [2*128, 64], norm [128] bf16; ape [4, 256] fp32
HCA_COMP = (128 * 64 * 2 + 128) * 2 + 16 * 128 * 4  # wkv, wgate [128, 64], norm; ape [16, 128]
IDX_FLOAT = 8 * 64 * 2 + CSA_COMP  # weights_proj [8, 64] bf16 + its compressor (same shapes as CSA's)
# other, float part: norms, mHC, gates (tid2eid [512, 2] int64 on layer 0, bias [8] fp32 elsewhere),
# the MTP block's enorm, hnorm, norm, hc_head, and the model's norm + hc_head
OTHER_FLOAT = (BLOCKS * (2 * 64 * 2 + HC + 8 * 64 * 2)  # attn_norm, ffn_norm [64]; mHC; gate.weight [8, 64]
               + 512 * 2 * 8 + 4 * 8 * 4  # tid2eid on layer 0, gate.bias on layers 1-3 and the MTP block
               + 4 * 64 * 2  # mtp.0 enorm, hnorm, norm and the model's norm [64]
               + 2 * (4 * 256 * 4 + 4 * 4 + 1 * 4))  # hc_head_fn [4, 256], _base [4], _scale [1]: MTP's and the model's


def test_tiny_weight_bytes_tp2_bf16(tiny_cfg):
    # bf16 form, TP2 without EP, rank 0: heads 0-1, o_group 0, vocab 0-255, every expert's inter 0-31
    attn_block = 2 * (32 * 64 + 32 + 256 * 32 + 128 * 64 + 128 + 16 * 256 + 64 * 16) + 2 * 4
    #                wq_a      q_norm wq_b(2 heads) wkv  kv_norm wo_a(1 group) wo_b(cols)  attn_sink fp32
    idx_wq_b = 1024 * 32 * 2  # indexer wq_b [8*128, 32]: replicated
    attention = BLOCKS * attn_block + 2 * (CSA_COMP + idx_wq_b + IDX_FLOAT) + HCA_COMP
    experts = BLOCKS * 8 * 3 * (32 * 64) * 2  # w1, w3 rows 0-31 and w2 columns 0-31 of every expert
    shared = BLOCKS * 3 * (32 * 64) * 2
    embed_head = 2 * 256 * 64 * 2
    other = OTHER_FLOAT + 2 * 64 * 64 * 2  # + mtp e_proj, h_proj [64, 64]
    assert (attention, experts, shared, embed_head, other) == (691048, 491520, 61440, 65536, 286688)
    lay = ParallelConfig(tp=2)
    groups = D.tensor_groups(tiny_cfg)
    for r in (0, 1):  # even splits: both ranks hold the same bytes
        got = D.rank_weight_bytes(tiny_cfg, lay.rank(tiny_cfg, r), "bf16", groups=groups)
        assert got == {"attention": attention, "experts": experts, "shared": shared, "embed_head": embed_head,
                       "other": other}


def test_tiny_weight_bytes_ep2_official_fp8(tiny_cfg):
    # fp8 form (FP8 + a UE8M0 byte per 128x128 block; experts FP4 + a byte per 32 inputs), DP2 + EP2:
    # everything replicated except the routed experts, 4 per rank
    def fp8(o, i):
        return o * i + math.ceil(o / 128) * math.ceil(i / 128)

    attn_block = (fp8(32, 64) + 32 * 2 + fp8(512, 32) + fp8(128, 64) + 128 * 2 + fp8(32, 256) + fp8(64, 32) + 4 * 4)
    assert attn_block == 2049 + 64 + 16388 + 8193 + 256 + 8194 + 2049 + 16
    attention = BLOCKS * attn_block + 2 * (CSA_COMP + fp8(1024, 32) + IDX_FLOAT) + HCA_COMP
    fp4_expert = 3 * (64 * 32 + 64 * 2)  # [64, 64]: 64 rows x 32 packed bytes + 64 rows x 2 scale bytes
    experts = BLOCKS * 4 * fp4_expert
    shared = BLOCKS * 3 * fp8(64, 64)
    other = OTHER_FLOAT + 2 * fp8(64, 64)
    assert (attention, experts, shared, other) == (574413, 130560, 61455, 278498)
    lay = ParallelConfig(tp=1, dp=2, ep=True)
    for r in (0, 1):
        got = D.rank_weight_bytes(tiny_cfg, lay.rank(tiny_cfg, r), "fp8", groups=D.tensor_groups(tiny_cfg))
        assert got == {"attention": attention, "experts": experts, "shared": shared,
                       "embed_head": 2 * 512 * 64 * 2, "other": other}
    # w4a8: experts int4 + an fp32 scale per output row; the shared expert int8 + the same scales
    got = D.rank_weight_bytes(tiny_cfg, lay.rank(tiny_cfg, 0), "w4a8", groups=D.tensor_groups(tiny_cfg))
    assert got["experts"] == BLOCKS * 4 * 3 * (64 * 32 + 64 * 4) == 138240
    assert got["shared"] == BLOCKS * 3 * (64 * 64 + 64 * 4) == 65280


def test_sliced_scales_count_the_blocks_the_slice_touches():
    # FP4 expert w2 [64, 64], columns 16-47 (an uneven TP cut): data 64 x 16 B, scale columns 0 and 1 of each row
    assert D.stored_bytes((64, 32), "expert", "fp8", Slice(1, 16, 48)) == 64 * 16 + 64 * 2
    # FP8 wq_b rows 100-299 of [512, 32]: 200 x 32 B + row blocks 0, 1, 2 x one column block
    assert D.stored_bytes((200, 32), "fp8able", "fp8", Slice(0, 100, 300)) == 200 * 32 + 3
    assert D.stored_bytes((200, 32), "fp8able", "w8a8", Slice(0, 100, 300)) == 200 * 32 + 200 * 4
    assert D.stored_bytes((7, 3), "fp32", "w4a8") == 7 * 3 * 4
    assert D.stored_bytes((512, 2), "index", "bf16") == 512 * 2 * 8


@pytest.mark.parametrize("lay", [ParallelConfig(tp=2), ParallelConfig(tp=2, dp=2), ParallelConfig(tp=2, dp=2, ep=True),
                                 ParallelConfig(tp=1, dp=4, ep=True)], ids=lambda p: p.describe())
@pytest.mark.parametrize("form", D.WEIGHT_FORMS)
def test_grouped_sum_equals_one_rank_slice_per_tensor(tiny_cfg, lay, form):
    """The plan's shortcut (one rank_slice per group of tensors differing only by block index) gives
    the same bytes as asking rank_slice about every tensor."""
    for r in range(lay.world_size):
        place = lay.rank(tiny_cfg, r)
        assert (D.rank_weight_bytes(tiny_cfg, place, form, groups=D.tensor_groups(tiny_cfg))
                == D.rank_weight_bytes(tiny_cfg, place, form, groups=None))


def test_grouped_sum_equals_plain_sum_on_flash(flash):
    lay = ParallelConfig(tp=4, dp=2, ep=True)
    place = lay.rank(flash, 5)
    assert (D.rank_weight_bytes(flash, place, "fp8", groups=D.tensor_groups(flash))
            == D.rank_weight_bytes(flash, place, "fp8", groups=None))


# ----------------------------------------------------------------------------- KV bytes and capacity

# V4-Flash: 43 layers, compress_ratios [0, 0, (4, 128) x 20, 4] -> 2 sliding, 21 CSA (ratio 4), 20 HCA
# (ratio 128); the MTP block is sliding; window 128, head_dim 512 (64 rope), index_head_dim 128.
FP8_ENTRY = (512 - 64) + 2 * 64 + 8  # 584: FP8 nope + bf16 rope + 8 scale bytes
FP8_INDEX = 128 // 2 + 128 // 32  # 68: FP4 key + a scale byte per 32
FP8_PER_TOKEN = 21 * (FP8_ENTRY + FP8_INDEX) / 4 + 20 * FP8_ENTRY / 128  # 3423 + 91.25
BF16_PER_TOKEN = 21 * (1024 + 256) / 4 + 20 * 1024 / 128  # 6720 + 160


def test_kv_bytes_per_token_flash(flash):
    assert (FP8_ENTRY, FP8_INDEX, FP8_PER_TOKEN, BF16_PER_TOKEN) == (584, 68, 3514.25, 6880.0)
    assert D.kv_entry_bytes(flash, "fp8") == (584, 68)
    assert D.kv_entry_bytes(flash, "bf16") == (1024, 256)
    gpu = D.plan(D.load_deployment("h200x8-flash-tp8-ep"))
    npu = D.plan(D.load_deployment("a2-flash-tp8-ep"))
    assert gpu.kv["bytes_per_token"] == FP8_PER_TOKEN and gpu.kv["dtype"] == "fp8"
    assert npu.kv["bytes_per_token"] == BF16_PER_TOKEN and npu.kv["dtype"] == "bf16"
    assert npu.kv["window_ring_bytes_per_sequence"] == 43 * 128 * 1024


def test_capacity_by_hand_flash_fp8(flash):
    S, budget, bs = 4, 10 * GiB, 128
    # per slot: 44 rings (43 layers + MTP) of 128 entries; fp32 compressor states: CSA kv + score [8, 1024]
    # and the indexer's [8, 256]; HCA kv + score [128, 512]
    slot = 44 * 128 * 584 + 21 * (2 * 8 * 1024 * 4 + 2 * 8 * 256 * 4) + 20 * (2 * 128 * 512 * 4)
    block4, block128 = 21 * 128 * (584 + 68), 20 * 128 * 584  # a pool block of every layer at that ratio
    assert (slot, block4, block128) == (15495168, 1752576, 1495040)
    tokens = int((budget - S * (slot + block4 + block128)) // FP8_PER_TOKEN)
    want = min(
        (tokens // 512 + S) * 512, (tokens // 16384 + S) * 16384
    )  # a block holds 128 entries = 512 / 16384 tokens
    assert (
        D.kv_capacity_tokens(flash, budget, 584, 68, S, block_size=bs) == want == 3035648
    )  # 3,034,060 tokens of blocks + 4 partly filled ones
    geo = D.kv_geometry(flash, 584, 68, bs)
    assert geo.pool_bytes_per_token() == FP8_PER_TOKEN
    assert D.kv_capacity_tokens(flash, S * (slot + block4 + block128), 584, 68, S, block_size=bs) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [16, 64, 128])
@pytest.mark.parametrize("model", ["tiny", "v4-flash"])
def test_capacity_is_the_engines_arithmetic(dtype, bs, model):
    """For the engine's own layout (entry = head_dim x element size) the plan's geometry is
    CacheGeometry.of's, and the capacity is what blocks_for_budget gives at start-up."""
    cfg = load_config_file(model)[0]
    e = torch.empty(0, dtype=dtype).element_size()
    n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    engine = CacheGeometry.of(cfg, dtype, bs, n_layers)
    assert D.kv_geometry(cfg, cfg.head_dim * e, cfg.index_head_dim * e, bs, n_layers) == engine
    for slots, budget in (
        (1, 3 * 2**20 if model == "tiny" else 2 * GiB),
        (8, 64 * 2**20 if model == "tiny" else 9 * GiB),
    ):
        blocks = engine.blocks_for_budget(budget, slots)
        want = min(n * m * bs for m, n in blocks.items())
        assert D.kv_capacity_tokens(cfg, budget, cfg.head_dim * e, cfg.index_head_dim * e, slots, bs) == want


# ----------------------------------------------------------------------------- EP traffic


def test_ep_bytes_by_hand():
    p = D.plan(D.load_deployment("a3-flash-w8a8-dp4-tp4-ep"))
    # 64 sequences per DP group over TP4: 16 tokens a rank; top-6 x hidden 4096; int8 out, bf16 back; 43 MoE layers
    (row,) = p.rows
    assert row.ranks == list(range(16))
    assert (row.ep_tokens, row.ep_dispatch, row.ep_combine) == (16, 16 * 6 * 4096 * 1 * 43, 16 * 6 * 4096 * 2 * 43)
    (row,) = D.plan(D.load_deployment("h100x8-flash-dp8-ep")).rows  # DP8, TP1: all 32 of a rank's sequences, FP8 out
    assert (row.ep_tokens, row.ep_dispatch, row.ep_combine) == (32, 32 * 6 * 4096 * 43, 32 * 6 * 4096 * 2 * 43)


def test_ep_bytes_uneven_and_without_ep(tmp_path):
    base = H100_DP8.replace("RESERVE", "4GiB").replace("tensor_parallel_size: 1, data_parallel_size: 8",
                                                       "tensor_parallel_size: 4, data_parallel_size: 2")
    dep = D.load_deployment(write(tmp_path, base.replace("max_num_seqs: 32", "max_num_seqs: 10")))
    rows = D.plan(dep).rows
    # 10 sequences over TP4: 3, 3, 2, 2 tokens per TP rank, in both DP groups
    assert [(r.ranks, r.ep_tokens) for r in rows] == [([0, 1], 3), ([2, 3], 2), ([4, 5], 3), ([6, 7], 2)]
    assert rows[0].ep_dispatch == 3 * 6 * 4096 * 43
    no_ep = D.load_deployment(
        write(tmp_path, base.replace("enable_expert_parallel: true", "enable_expert_parallel: false"), "b.yaml")
    )
    assert all((r.ep_tokens, r.ep_dispatch, r.ep_combine) == (0, 0, 0) for r in D.plan(no_ep).rows)


# ----------------------------------------------------------------------------- LM-head TP


def test_cm384_one_expert_per_die_and_lm_head_tp16():
    p = D.plan(D.load_deployment("cm384-pro-decode"))
    (row,) = p.rows  # every die alike
    assert row.ranks == list(range(384))
    # V4-Pro: hidden 7168, moe_intermediate 3072, 61 layers + 1 MTP block; one routed expert a die, W4A8:
    # w1, w3 [3072, 7168] and w2 [7168, 3072] int4 + an fp32 scale per output row
    expert = 2 * (3072 * 7168 // 2 + 3072 * 4) + (7168 * 3072 // 2 + 7168 * 4)
    assert row.weights["experts"] == 62 * expert
    # the embedding whole (bf16), the head's vocab rows split over 16 dies: 129280 / 16 = 8080
    assert row.weights["embed_head"] == 129280 * 7168 * 2 + 8080 * 7168 * 2
    assert p.fits


# ----------------------------------------------------------------------------- command line


def test_fits_exit_0(capsys):
    code, out, err = run(capsys, "--deploy", "h200x8-flash-tp8-ep")
    assert code == 0 and err == ""
    assert out.rstrip().splitlines()[-1] == "fits"
    assert "0-7" in out  # identical ranks grouped


def test_does_not_fit_exit_1(capsys, tmp_path):
    # weights: V4-Flash W8A8 at TP8 is ~36 GiB a rank; a 32 GiB device gives 28.8 GiB at 0.9
    small = write(
        tmp_path,
        H100_DP8.replace("RESERVE", "4GiB")
        .replace("81559MiB", "32GiB")
        .replace("fp8: true", "fp8: false")
        .replace("weights: fp8", "weights: w8a8")
        .replace("tensor_parallel_size: 1, data_parallel_size: 8", "tensor_parallel_size: 8, data_parallel_size: 1"),
    )
    code, out, _ = run(capsys, "--deploy", small)
    assert code == 1
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("does not fit: rank 0 needs 36.11 GiB of weights") and "28.80 GiB at utilization 0.9" in last
    # context: a reserve that leaves ~2.25 GiB for the cache holds 262144 tokens but not 1M
    tight = write(tmp_path, H100_DP8.replace("RESERVE", "43.5GiB"), "tight.yaml")
    assert run(capsys, "--deploy", tight)[0] == 0
    code, out, _ = run(capsys, "--deploy", tight, "--context", "1M")
    assert code == 1
    assert "cannot hold one sequence of 1048576 tokens" in out.rstrip().splitlines()[-1]
    # fixed state: 4096 slots of 17.9 MiB do not fit in 2.25 GiB
    many = write(
        tmp_path, H100_DP8.replace("RESERVE", "43.5GiB").replace("max_num_seqs: 32", "max_num_seqs: 4096"), "many.yaml"
    )
    code, out, _ = run(capsys, "--deploy", many)
    assert code == 1 and "lower runtime.max_num_seqs" in out


@pytest.mark.parametrize(
    "edit, field",
    [
        (("weights: fp8", "weights: fp16"), "'weights'"),
        (
            ("tensor_parallel_size: 1, data_parallel_size: 8", "tensor_parallel_size: 3, data_parallel_size: 8"),
            "tensor_parallel_size=3",
        ),
        (("devices: 8", "devices: 16"), "'hardware.devices'=16"),
        (("block_size: 128", "block_size: 0"), "'runtime.block_size'"),
        (("block_size: 128", "blok_size: 128"), "runtime.blok_size"),
        (("fp8: true", "fp8: false"), "'weights' is fp8 but hardware.fp8 is false"),
        (("81559MiB", "lots"), "'hardware.device_memory'"),
        (("model: v4-flash", "model: no-such-model"), "no-such-model"),
        (("max_model_len: 262144", "max_model_len: 2097152"), "max_position_embeddings"),
        (("runtime: {", "runtime: {gpu_memory_utilization: 1.5, "), "'runtime.gpu_memory_utilization'"),
        (("parallel: {", "parallel: {lm_head_tensor_parallel_size: 3, "), "'parallel.lm_head_tensor_parallel_size'=3"),
        (("weights: fp8", "weights: fp8\nextra: 1"), "extra"),
        (("hardware: {", "hardware: ["), "cannot parse"),
    ],
)
def test_bad_input_exit_2(capsys, tmp_path, edit, field):
    path = write(tmp_path, H100_DP8.replace("RESERVE", "4GiB").replace(*edit))
    code, out, err = run(capsys, "--deploy", path)
    assert code == 2 and out == ""
    assert err.startswith("dsv4: error: ") and field in err and err.count("\n") == 1
    if "cannot parse" not in field and "no-such-model" not in field:
        assert path in err  # the sentence names the file


def test_bad_command_line_exit_2(capsys):
    assert run(capsys, "--deploy", "no-such-deployment")[0] == 2
    assert run(capsys, "--deploy", "a2-flash-tp8-ep", "--context", "0")[0] == 2
    assert run(capsys, "--deploy", "a2-flash-tp8-ep", "--context", "2M")[0] == 2  # past max_position_embeddings
    assert run(capsys, "--deploy", "a2-flash-tp8-ep", "--context", "lots")[0] == 2
    code, _, err = run(capsys, "--deploy", "a2-flash-tp8-ep", "--config", "tiny")  # tiny has 4 heads: no TP8
    assert code == 2 and "num_attention_heads=4 is not divisible by tensor_parallel_size=8" in err
    assert run(capsys)[0] == 2  # --deploy is required


def test_config_override_and_json(capsys):
    code, out, _ = run(capsys, "--deploy", str(REPO / "configs/deploy/h200x8-flash-tp8-ep.yaml"), "--config", "v4-pro",
                       "--json")
    d = json.loads(out)
    # V4-Pro's ~790 GB of FP4 experts over 8 GPUs: 98 GiB a rank before attention; it still fits a 141 GB H200
    assert d["model"] == "v4-pro" and d["layout"] == "TP8 + EP8"
    assert code == (0 if d["fits"] else 1)
    (row,) = d["ranks"]
    assert row["ranks"] == [0, 7] and row["weights"]["total"] == sum(
        v for k, v in row["weights"].items() if k != "total"
    )
    assert d["kv"]["entry_bytes"] == 584 and d["context"] == 1048576


def test_one_million_context(capsys):
    code, out, _ = run(capsys, "--deploy", "a3-flash-w8a8-dp4-tp4-ep", "--context", "1048576", "--json")
    d = json.loads(out)
    assert code == 0 and d["context"] == 1048576 and d["fits"]
    (row,) = d["ranks"]
    assert row["kv_tokens"] >= 1048576 and row["sequences_at_context"] == row["kv_tokens"] // 1048576
    assert d["kv"]["bytes_per_sequence_at_context"] == int(BF16_PER_TOKEN * 1048576) + D.kv_geometry(
        load_config_file("v4-flash")[0], 1024, 256, 128).slot_bytes


# which shipped deployments fit at their own max_model_len, and at 1M context
FITS = {p.stem: True for p in SHIPPED}
FITS_1M = dict(FITS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_deployments(path, capsys):
    dep = D.load_deployment(path.stem)
    assert dep.name == path.stem and dep.devices == dep.layout.world_size
    assert D.plan(dep).fits == FITS[path.stem]
    p1m = D.plan(dep, 1 << 20)
    assert p1m.fits == FITS_1M[path.stem]
    assert all(r.seqs == min(dep.max_num_seqs, r.kv_tokens // (1 << 20)) for r in p1m.rows)
    if dep.nodes > 1 and not dep.fp8:  # multi-node Ascend: the HCCL settings of ascend.md §6
        assert {"HCCL_IF_IP", "HCCL_SOCKET_IFNAME", "HCCL_EXEC_TIMEOUT", "HCCL_CONNECT_TIMEOUT"} <= set(dep.env)
        assert dep.env["HCCL_EXEC_TIMEOUT"] == "204" and dep.env["HCCL_CONNECT_TIMEOUT"] == "1200"
    if not dep.fp8:
        assert dep.env["HCCL_BUFFSIZE"] == "1024" and dep.env["HCCL_OP_EXPANSION_MODE"] == "AIV"
        assert dep.weights in ("w8a8", "w4a8") and dep.kv_dtype == "bf16"
    else:
        assert dep.weights == "fp8" and dep.kv_dtype == "fp8" and dep.env == {}
