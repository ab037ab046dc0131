"""Deployment plans: does a model fit a set of devices under a parallel layout, and what does each rank hold?

A deployment file (`configs/deploy/*.yaml`) names the hardware, the model, the weight form, the
parallel layout (`parallel.ParallelConfig`), the runtime limits and the environment to set.
`plan(dep, context)` computes, for every rank:

- weight bytes by kind (attention, routed experts, shared expert, embedding + LM head, other:
  norms, mHC, router gates, the MTP block's e_proj / h_proj), over `v4.weights.expected_tensors`
  cut by `shard.rank_slice`: the plan splits the weights exactly as the loader does;
- the KV cache: bytes per context token (`v4.cache.cache_bytes_per_token`), the fixed state of
  every sequence slot, and the capacity left once weights and a workspace reserve are paid for,
  by the same block arithmetic that sizes the engine's cache at start-up (`kv_capacity_tokens`);
- the expert-parallel all-to-all bytes of one decode step;
- whether it fits, and if not, why.

Bytes per element of each weight form (by the `role` of `expected_tensors`):
- `fp8` (the official release): "fp8able" tensors FP8 e4m3 (1 B) + one UE8M0 scale byte per
  128x128 block; routed experts ("expert") FP4 e2m1 (0.5 B) + one UE8M0 scale byte per 32 inputs
  of a row (FP8 blocks instead when the config says `expert_dtype: fp8`, 2 B for `bf16`);
- `w8a8` (Ascend's modelslim form): "fp8able" and "expert" tensors int8 (1 B) + one fp32 scale
  per output channel (4 B a row);
- `w4a8`: routed experts int4 (0.5 B) + one fp32 scale per output channel; the rest as w8a8.
  ASSUMPTION: per-channel scales; a per-group int4 scheme (e.g. groups of 256 inputs) would add
  4 B per group, 1.6 % of the int4 bytes at 256;
- `bf16`: 2 B.
Every form keeps the other roles in their stored width: "float" bf16 (2 B), "fp32" 4 B, "index"
(tid2eid) int64 8 B. A sliced FP8 / FP4 tensor pays for every scale block its slice touches (what
the loader reads).

The KV cache (`cache.py`'s layout, with the entry and indexer-key widths of the hardware):
- FP8 hardware: the production layout of spec §3.3, as `dsv4 info` prints it: an entry is
  (head_dim - rope) FP8 bytes + rope dims in bf16 + 8 bytes of scales, an indexer key
  index_head_dim / 2 bytes (FP4) + one scale byte per 32;
- no FP8 (A2 / A3): bf16 entries (head_dim x 2 B) and indexer keys (index_head_dim x 2 B).
- Per sequence slot, fixed: the window ring of every layer (W entries in the same layout) and the
  compressor states in fp32 (counted: 0.5 MiB per HCA layer per sequence at ratio 128), plus one
  partly filled pool block per ratio, as `CacheGeometry.blocks_for_budget` charges them.
- The cache is replicated on every TP rank of a DP group (V4 has one shared KV head), and each DP
  group caches its own sequences: every rank of a group holds the whole cache of the group's
  `max_num_seqs` slots.

Memory budget of a rank: device_memory x gpu_memory_utilization (default 0.9) - this rank's
weights - runtime.workspace_reserve (default 4 GiB: one step's activations, the sampler's logits,
graph pools; an assumption, not a measurement). Communicator buffers (HCCL_BUFFSIZE, NCCL) are
outside torch's allocator and are taken to live in the (1 - utilization) share, as vLLM has it; a
file whose communicators need more says so by raising workspace_reserve.

Expert-parallel traffic of one decode step, per rank: its tokens (max_num_seqs of its DP group,
divided over the TP ranks: each TP rank dispatches its share) x num_experts_per_tok x hidden_size,
per MoE layer (every main layer; the MTP block's is left out), dispatch in the activation form
(1 B when the weight form quantises activations: fp8 / w8a8 / w4a8; else bf16) and combine in
bf16. All top-k copies are counted (the ones whose expert is local never leave the rank: an upper
bound by 1/EP), and the per-token scales of a quantised dispatch are left out (< 2 %).

LM-head TP (`parallel.lm_head_tensor_parallel_size`, the decode layout "attention DP + MoE EP +
LM-head TP" of cann-recipes-infer): the head's vocab rows are split over groups of that many
consecutive ranks, whatever the attention TP; the embedding stays as attention TP has it. The
shard rules (`shard.rank_slice`) do not know this split yet: it is a plan-only figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..cache import CacheGeometry, cache_bytes_per_token
from ..config import (
    CSA,
    REPO_CONFIG_DIR,
    SLIDING,
    ModelConfig,
    load_config_file,
    parse_bytes,
)
from ..errors import ConfigError
from .parallel import ParallelConfig, RankPlacement
from .shard import SKIP, WHOLE, Slice, rank_slice

DEPLOY_DIR = REPO_CONFIG_DIR / "deploy"
WEIGHT_FORMS = ("fp8", "w8a8", "w4a8", "bf16")
KV_DTYPES = ("fp8", "bf16")
KINDS = ("attention", "experts", "shared", "embed_head", "other")
GiB, MiB = 2**30, 2**20
DEFAULT_UTILIZATION = 0.9
DEFAULT_RESERVE = "4GiB"
STATE_BYTES = 4  # compressor states are fp32, as the engine keeps them (`ops.acc`)


# ---------------------------------------------------------------------------------------------
# The deployment file
# ---------------------------------------------------------------------------------------------


@dataclass
class Deployment:
    path: str
    name: str
    description: str
    hw_kind: str
    devices: int
    device_memory: int  # bytes
    nodes: int
    fp8: bool
    model: ModelConfig
    weights: str
    layout: ParallelConfig
    lm_head_tp: int  # ranks one LM head is split over (= tp unless the file says otherwise)
    max_num_seqs: int  # per DP group
    block_size: int
    max_model_len: int
    utilization: float
    reserve: int  # bytes
    kv_dtype: str
    env: dict = field(default_factory=dict)

    @property
    def act_bytes(self) -> int:
        """Bytes of one dispatched activation: the quantised forms quantise activations too."""
        return 2 if self.weights == "bf16" else 1


_TOP = {"name", "description", "hardware", "model", "weights", "parallel", "runtime", "env"}
_HW = {"kind", "devices", "device_memory", "nodes", "fp8"}
_PAR = {"tensor_parallel_size", "data_parallel_size", "enable_expert_parallel", "lm_head_tensor_parallel_size"}
_RT = {"max_num_seqs", "block_size", "max_model_len", "max_num_batched_tokens", "gpu_memory_utilization",
       "workspace_reserve", "kv_cache_dtype"}


def resolve_deploy_path(name_or_path: str) -> Path:
    """A path, or a bare name of configs/deploy/ (`a2-flash-tp8-ep` -> configs/deploy/a2-flash-tp8-ep.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (DEPLOY_DIR / name_or_path, DEPLOY_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    avail = sorted(x.stem for x in DEPLOY_DIR.glob("*.yaml")) if DEPLOY_DIR.is_dir() else []
    raise ConfigError(f"deployment '{name_or_path}' not found: give a YAML path or one of: "
                      f"{', '.join(avail) or '(no configs/deploy/ directory next to the package)'}")


def _section(raw: dict, key: str, known: set, src: str, required: bool = True) -> dict:
    d = raw.get(key)
    if d is None and not required:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{src}: field '{key}' must be a mapping" + (", and it is required" if d is None else ""))
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{src}: unknown field(s) {', '.join(f'{key}.{k}' for k in unknown)}; "
                          f"valid: {', '.join(sorted(known))}")
    return d


def _int(d: dict, key: str, src: str, default=None) -> int:
    v = d.get(key.split(".")[-1], default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{src}: field '{key}' must be a positive integer, got {v!r}")
    return v


def _bool(d: dict, key: str, src: str, default=None) -> bool:
    v = d.get(key.split(".")[-1], default)
    if not isinstance(v, bool):
        raise ConfigError(f"{src}: field '{key}' must be true or false, got {v!r}")
    return v


def _bytes(d: dict, key: str, src: str, default=None) -> int:
    try:
        return parse_bytes(d.get(key.split(".")[-1], default), key)
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None


def _model(name_or_path: str, src: str) -> ModelConfig:
    cfg, _ = load_config_file(name_or_path)
    if cfg is None:
        raise ConfigError(f"{src}: model '{name_or_path}' is a runtime file with no 'model:' section; name a model "
                          "config (v4-flash, v4-pro, tiny, a config.json)")
    return cfg


def _read(path: Path) -> dict:
    src = str(path)
    try:
        import yaml

        raw = yaml.safe_load(path.read_text())
    except Exception as e:  # noqa: BLE001 - parse errors become one sentence (PyYAML's span several lines)
        where = getattr(e, "problem_mark", None)
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"{src}: cannot parse ({e.__class__.__name__}: {what}{at}); fix the file syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: top level must be a mapping")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ConfigError(f"{src}: unknown top-level field(s) {', '.join(unknown)}; valid: {', '.join(sorted(_TOP))}")
    env = raw.get("env") or {}
    if not isinstance(env, dict):
        raise ConfigError(f"{src}: field 'env' must be a mapping of variable names to values")
    for k, v in env.items():
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise ConfigError(f"{src}: field 'env.{k}' must be a string or number (quote true / false), got {v!r}")
    return raw


def _hardware(hw: dict, src: str) -> dict:
    if not isinstance(hw.get("kind"), str) or not hw["kind"]:
        raise ConfigError(f"{src}: field 'hardware.kind' must be a name (e.g. \"Ascend 910B\"), got {hw.get('kind')!r}")
    devices, nodes = _int(hw, "hardware.devices", src), _int(hw, "hardware.nodes", src, 1)
    if devices % nodes:
        raise ConfigError(f"{src}: field 'hardware.devices'={devices} is not a multiple of hardware.nodes={nodes}")
    return {"hw_kind": hw["kind"], "devices": devices, "nodes": nodes, "fp8": _bool(hw, "hardware.fp8", src),
            "device_memory": _bytes(hw, "hardware.device_memory", src)}


def _weights(raw: dict, fp8: bool, src: str) -> str:
    weights = raw.get("weights")
    if weights not in WEIGHT_FORMS:
        raise ConfigError(f"{src}: field 'weights' must be one of {', '.join(WEIGHT_FORMS)}, got {weights!r}")
    if weights == "fp8" and not fp8:
        raise ConfigError(f"{src}: field 'weights' is fp8 but hardware.fp8 is false (A2/A3 have no FP8); use w8a8, "
                          "w4a8 or bf16")
    return weights


def _layout(par: dict, cfg: ModelConfig, devices: int, src: str) -> dict:
    layout = ParallelConfig(tp=par.get("tensor_parallel_size", 1), dp=par.get("data_parallel_size", 1),
                            ep=_bool(par, "parallel.enable_expert_parallel", src, False))
    layout.check(cfg, source=f"{src}: parallel")
    if layout.world_size != devices:
        raise ConfigError(f"{src}: field 'hardware.devices'={devices} but the layout {layout.describe()} has "
                          f"{layout.world_size} ranks (one per device); make them equal")
    lm_tp = _int(par, "parallel.lm_head_tensor_parallel_size", src, layout.tp)
    if devices % lm_tp or lm_tp % layout.tp or lm_tp > cfg.vocab_size:
        raise ConfigError(f"{src}: field 'parallel.lm_head_tensor_parallel_size'={lm_tp} must divide the "
                          f"{devices} ranks and be a multiple of tensor_parallel_size={layout.tp}")
    return {"layout": layout, "lm_head_tp": lm_tp}


def _runtime(rt: dict, cfg: ModelConfig, fp8: bool, src: str) -> dict:
    util = rt.get("gpu_memory_utilization", DEFAULT_UTILIZATION)
    if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
        raise ConfigError(f"{src}: field 'runtime.gpu_memory_utilization' must be in (0, 1], got {util!r}")
    kv_dtype = rt.get("kv_cache_dtype", "fp8" if fp8 else "bf16")
    if kv_dtype not in KV_DTYPES or (kv_dtype == "fp8" and not fp8):
        raise ConfigError(f"{src}: field 'runtime.kv_cache_dtype' must be bf16, or fp8 on hardware.fp8: true, "
                          f"got {kv_dtype!r}")
    max_len = _int(rt, "runtime.max_model_len", src, 65536)
    if max_len > cfg.max_position_embeddings:
        raise ConfigError(f"{src}: field 'runtime.max_model_len'={max_len} exceeds the model's "
                          f"max_position_embeddings={cfg.max_position_embeddings}")
    _int(rt, "runtime.max_num_batched_tokens", src, 1)  # checked, not used: the reserve covers its activations
    return {"max_num_seqs": _int(rt, "runtime.max_num_seqs", src, 8),
            "block_size": _int(rt, "runtime.block_size", src, 128), "max_model_len": max_len,
            "utilization": float(util), "reserve": _bytes(rt, "runtime.workspace_reserve", src, DEFAULT_RESERVE),
            "kv_dtype": kv_dtype}


def load_deployment(name_or_path: str, model_override: str | None = None) -> Deployment:
    """Read and check a deployment file; `model_override` (a config name or path) replaces its `model`."""
    path = resolve_deploy_path(name_or_path)
    src = str(path)
    raw = _read(path)
    hw = _hardware(_section(raw, "hardware", _HW, src), src)
    weights = _weights(raw, hw["fp8"], src)
    if model_override is None and not isinstance(raw.get("model"), str):
        raise ConfigError(f"{src}: field 'model' must be a config name or path (e.g. v4-flash), got {raw.get('model')!r}")
    cfg = _model(model_override or raw["model"], src)
    par = _layout(_section(raw, "parallel", _PAR, src), cfg, hw["devices"], src)
    rt = _runtime(_section(raw, "runtime", _RT, src, required=False), cfg, hw["fp8"], src)
    return Deployment(path=src, name=str(raw.get("name") or path.stem), description=str(raw.get("description") or ""),
                      model=cfg, weights=weights, env={k: str(v) for k, v in (raw.get("env") or {}).items()},
                      **hw, **par, **rt)


# ---------------------------------------------------------------------------------------------
# Weight bytes
# ---------------------------------------------------------------------------------------------


def kind_of(name: str) -> str:
    if name in ("embed.weight", "head.weight"):
        return "embed_head"
    if ".ffn.experts." in name:
        return "experts"
    if ".ffn.shared_experts." in name:
        return "shared"
    return "attention" if ".attn." in name else "other"


def _blocks(n: int, dim: int, block: int, s) -> int:
    """Scale blocks of `block` along `dim` that a tensor of extent n there (after the slice) touches."""
    if isinstance(s, Slice) and s.dim == dim:
        return -(-s.stop // block) - s.start // block
    return -(-n // block)


def stored_bytes(shape: tuple, role: str, form: str, s=WHOLE, expert_dtype: str | None = None) -> int:
    """Bytes of one rank's part of a tensor: `shape` is its logical shape after the slice `s`."""
    numel = math.prod(shape)
    if role not in ("fp8able", "expert"):
        return numel * {"float": 2, "fp32": 4, "index": 8}[role]
    rows, cols = shape
    int4 = role == "expert" and form == "w4a8"
    if form == "bf16" or (form == "fp8" and role == "expert" and expert_dtype == "bf16"):
        return 2 * numel
    if form in ("w8a8", "w4a8"):  # int8 / int4 + one fp32 scale per output channel
        return (rows * -(-cols // 2) if int4 else numel) + 4 * rows
    if role == "fp8able" or expert_dtype == "fp8":  # FP8 e4m3 + UE8M0 per 128x128 block
        return numel + _blocks(rows, 0, 128, s) * _blocks(cols, 1, 128, s)
    return rows * -(-cols // 2) + rows * _blocks(cols, 1, 32, s)  # FP4 e2m1 + UE8M0 per 32 inputs


_BLOCK_PREFIX = re.compile(r"^(layers|mtp)\.\d+\.")


_GROUPS: dict[str, list] = {}  # config fields (JSON) -> tensor_groups: V4-Pro's 73,000 tensors take 0.3 s


def tensor_groups(cfg: ModelConfig) -> list[tuple[str, tuple, str, int]]:
    """(a representative name, shape, role, count) per group of tensors that differ only by block
    index. `rank_slice` never reads the block index from a name, so one call per group answers for
    all of it: 1,200 calls per rank instead of 73,000 for V4-Pro (384 ranks in a CloudMatrix plan)."""
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    if key not in _GROUPS:
        _GROUPS[key] = _tensor_groups(cfg)
    return _GROUPS[key]


def _tensor_groups(cfg: ModelConfig) -> list[tuple[str, tuple, str, int]]:
    from ..weights import expected_tensors

    groups: dict[tuple, list] = {}
    for name, spec in expected_tensors(cfg).items():
        key = (_BLOCK_PREFIX.sub("#.", name), spec.shape, spec.role)
        if key in groups:
            groups[key][3] += 1
        else:
            groups[key] = [name, spec.shape, spec.role, 1]
    return [tuple(g) for g in groups.values()]


def _slice_for(name: str, cfg, place: RankPlacement, lm_head: RankPlacement | None):
    if name == "head.weight" and lm_head is not None:  # LM-head TP: rows over the head group (plan-only)
        return Slice(0, *lm_head.vocab)
    return rank_slice(name, cfg, place)


def rank_weight_bytes(cfg: ModelConfig, place: RankPlacement, form: str, lm_head: RankPlacement | None = None,
                      groups=None) -> dict[str, int]:
    """Bytes by kind of the weights rank `place` holds. `groups`: from `tensor_groups`, or None for one
    `rank_slice` per tensor of `expected_tensors` (the slow, plain sum the grouped one is tested against)."""
    if groups is None:
        from ..weights import expected_tensors

        groups = [(n, s.shape, s.role, 1) for n, s in expected_tensors(cfg).items()]
    out = dict.fromkeys(KINDS, 0)
    for name, shape, role, count in groups:
        s = _slice_for(name, cfg, place, lm_head)
        if s == SKIP:
            continue
        if s != WHOLE:
            shape = tuple(s.stop - s.start if d == s.dim else n for d, n in enumerate(shape))
        out[kind_of(name)] += count * stored_bytes(shape, role, form, s, cfg.expert_dtype)
    return out


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


def kv_entry_bytes(cfg: ModelConfig, kv_dtype: str) -> tuple[int, int]:
    """(entry bytes, indexer-key bytes) of one cached row: the FP8 production layout of spec §3.3 (as
    `dsv4 info` prints it: FP8 nope + bf16 rope + 8 scale bytes; FP4 key + a scale byte per 32), or bf16."""
    if kv_dtype == "fp8":
        rope = cfg.qk_rope_head_dim
        return (cfg.head_dim - rope) + 2 * rope + 8, cfg.index_head_dim // 2 + cfg.index_head_dim // 32
    return cfg.head_dim * 2, cfg.index_head_dim * 2


def kv_geometry(cfg: ModelConfig, entry_bytes: int, index_bytes: int, block_size: int,
                num_layers: int | None = None, state_bytes: int = STATE_BYTES) -> CacheGeometry:
    """`CacheGeometry.of` with byte widths instead of a torch dtype: the same sums (a ring of W entries
    per layer, fp32 compressor states, a pool block per ratio), with entry = head_dim x element size
    there and any width here (the FP8 layout has 584-byte entries, not a dtype's multiple). The test
    suite holds the two equal for the engine's dtypes; were `CacheGeometry.of` to take byte widths,
    this copy would go."""
    n = num_layers if num_layers is not None else cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    W, D, Di = cfg.sliding_window, cfg.head_dim, cfg.index_head_dim
    slot, blocks = 0, {}
    for i in range(n):
        kind, m = cfg.layer_type(i), cfg.layer_ratio(i)
        slot += W * entry_bytes
        if kind == SLIDING:
            continue
        k = 2 if kind == CSA else 1
        slot += 2 * (k * m) * (k * D) * state_bytes
        blocks[m] = blocks.get(m, 0) + block_size * entry_bytes
        if kind == CSA:
            slot += 2 * (2 * m) * (2 * Di) * state_bytes
            blocks[m] += block_size * index_bytes
    return CacheGeometry(slot, blocks, block_size)


def fixed_bytes(geo: CacheGeometry, num_seqs: int) -> int:
    """What `num_seqs` slots cost before any context: rings, states, one partly filled block per ratio."""
    return num_seqs * (geo.slot_bytes + sum(geo.block_bytes.values()))


def kv_capacity_tokens(cfg: ModelConfig, budget_bytes: int, entry_bytes: int, index_bytes: int, num_seqs: int,
                       block_size: int = 64, num_layers: int | None = None, state_bytes: int = STATE_BYTES) -> int | None:
    """Context tokens a cache of `budget_bytes` holds for `num_seqs` slots: blocks per ratio by
    `CacheGeometry.blocks_for_budget` (the engine's start-up sizing), then the least ratio x
    block_size x blocks over ratios. 0 where the engine would refuse to start (the budget does not
    hold the slots' fixed state); None for a model with no compressed layer (no pool: unbounded)."""
    geo = kv_geometry(cfg, entry_bytes, index_bytes, block_size, num_layers, state_bytes)
    if budget_bytes <= fixed_bytes(geo, num_seqs):
        return 0
    blocks = geo.blocks_for_budget(budget_bytes, num_seqs)
    return min((n * geo.tokens_per_block(m) for m, n in blocks.items()), default=None)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class RankPlan:
    ranks: list  # the (consecutive) ranks with these same figures
    weights: dict  # bytes by kind
    budget: int  # device_memory x utilization
    kv_budget: int  # what is left for the cache (may be negative)
    kv_tokens: int | None
    seqs: int  # sequences of `context` tokens at once (capped by max_num_seqs)
    ep_tokens: int
    ep_dispatch: int
    ep_combine: int
    reason: str | None = None

    @property
    def weight_total(self) -> int:
        return sum(self.weights.values())

    def figures(self) -> tuple:
        return (tuple(self.weights.values()), self.kv_tokens, self.seqs, self.ep_tokens, self.reason)


def ep_bytes(dep: Deployment, place: RankPlacement) -> tuple[int, int, int]:
    """(tokens, dispatch bytes, combine bytes) of one decode step on this rank, over every MoE layer."""
    if not dep.layout.ep:
        return 0, 0, 0
    tp = dep.layout.tp
    tokens = len(range(place.tp_rank, dep.max_num_seqs, tp))  # this TP rank's share of the group's tokens
    per_layer = tokens * dep.model.num_experts_per_tok * dep.model.hidden_size
    n = dep.model.num_hidden_layers
    return tokens, per_layer * dep.act_bytes * n, per_layer * 2 * n


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def _rank_plan(dep: Deployment, rank: int, context: int, groups, geo: CacheGeometry, entry: int, index: int) -> RankPlan:
    cfg, lay = dep.model, dep.layout
    place = lay.rank(cfg, rank)
    lm_head = None
    if dep.lm_head_tp != lay.tp:
        lm_head = ParallelConfig(tp=dep.lm_head_tp, dp=dep.devices // dep.lm_head_tp).rank(cfg, rank)
    weights = rank_weight_bytes(cfg, place, dep.weights, lm_head, groups)
    budget = int(dep.device_memory * dep.utilization)
    kv_budget = budget - sum(weights.values()) - dep.reserve
    tokens = kv_capacity_tokens(cfg, kv_budget, entry, index, dep.max_num_seqs, dep.block_size)
    seqs = dep.max_num_seqs if tokens is None else min(dep.max_num_seqs, tokens // context)
    p = RankPlan([rank], weights, budget, kv_budget, tokens, seqs, *ep_bytes(dep, place))
    p.reason = _why_not(dep, p, context, geo)
    return p


def _why_not(dep: Deployment, p: RankPlan, context: int, geo: CacheGeometry) -> str | None:
    dev = f"a {_gib(dep.device_memory)} device gives {_gib(p.budget)} at utilization {dep.utilization:g}"
    if p.weight_total + dep.reserve >= p.budget:
        return (f"rank {p.ranks[0]} needs {_gib(p.weight_total)} of weights + {_gib(dep.reserve)} workspace reserve "
                f"but {dev}")
    fixed = fixed_bytes(geo, dep.max_num_seqs)
    if p.kv_budget <= fixed:
        return (f"rank {p.ranks[0]} has {_gib(p.kv_budget)} left for the KV cache, less than the fixed state of "
                f"max_num_seqs={dep.max_num_seqs} sequence slots ({_gib(fixed)}: window rings, compressor states, a "
                "block per ratio each); lower runtime.max_num_seqs")
    if p.seqs < 1:
        return f"rank {p.ranks[0]}: KV capacity {p.kv_tokens:,} tokens cannot hold one sequence of {context} tokens"
    return None


def _group(plans: list[RankPlan]) -> list[RankPlan]:
    """Consecutive ranks with the same figures, as one row."""
    out: list[RankPlan] = []
    for p in plans:
        if out and out[-1].figures()[:-1] == p.figures()[:-1] and out[-1].ranks[-1] == p.ranks[0] - 1:
            out[-1].ranks.append(p.ranks[0])
        else:
            out.append(p)
    return out


@dataclass
class Plan:
    dep: Deployment
    context: int
    kv: dict
    rows: list  # RankPlan, identical consecutive ranks grouped

    @property
    def reason(self) -> str | None:
        return next((r.reason for r in self.rows if r.reason), None)

    @property
    def fits(self) -> bool:
        return self.reason is None


def plan(dep: Deployment, context: int | None = None) -> Plan:
    cfg = dep.model
    context = dep.max_model_len if context is None else context
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ConfigError(f"--context must be a positive number of tokens, got {context!r}")
    if context > cfg.max_position_embeddings:
        raise ConfigError(f"--context {context} exceeds the max_position_embeddings={cfg.max_position_embeddings} of "
                          f"model '{cfg.name}'")
    entry, index = kv_entry_bytes(cfg, dep.kv_dtype)
    per_token = cache_bytes_per_token(cfg, entry_bytes=entry, index_bytes=index)
    geo = kv_geometry(cfg, entry, index, dep.block_size)
    kv = {"dtype": dep.kv_dtype, "entry_bytes": entry, "index_key_bytes": index,
          "bytes_per_token": per_token["per_token_total"], "window_ring_bytes_per_sequence": per_token["window_ring_bytes"],
          "fixed_bytes_per_sequence": geo.slot_bytes + sum(geo.block_bytes.values()),
          "compressor_state_counted": True,
          "bytes_per_sequence_at_context": int(per_token["per_token_total"] * context) + geo.slot_bytes}
    groups = tensor_groups(cfg)
    rows = [_rank_plan(dep, r, context, groups, geo, entry, index) for r in range(dep.devices)]
    return Plan(dep, context, kv, _group(rows))


# ---------------------------------------------------------------------------------------------
# Output and the `plan` subcommand
# ---------------------------------------------------------------------------------------------


def _ranks(r: list) -> str:
    return f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}"


def to_json(p: Plan) -> dict:
    d = p.dep
    return {
        "deployment": d.name, "file": d.path, "description": d.description, "model": d.model.name,
        "weights": d.weights, "layout": d.layout.describe(), "lm_head_tensor_parallel_size": d.lm_head_tp,
        "hardware": {"kind": d.hw_kind, "devices": d.devices, "nodes": d.nodes, "device_memory": d.device_memory,
                     "fp8": d.fp8},
        "runtime": {"max_num_seqs_per_dp_group": d.max_num_seqs, "block_size": d.block_size,
                    "max_model_len": d.max_model_len, "gpu_memory_utilization": d.utilization,
                    "workspace_reserve": d.reserve},
        "context": p.context, "kv": p.kv,
        "ranks": [{"ranks": [r.ranks[0], r.ranks[-1]], "weights": {**r.weights, "total": r.weight_total},
                   "budget": r.budget, "kv_budget": r.kv_budget, "kv_tokens": r.kv_tokens,
                   "sequences_at_context": r.seqs,
                   "ep_decode_step": {"tokens": r.ep_tokens, "dispatch": r.ep_dispatch, "combine": r.ep_combine,
                                      "total": r.ep_dispatch + r.ep_combine},
                   "fits": r.reason is None, "reason": r.reason} for r in p.rows],
        "env": d.env, "fits": p.fits, "reason": p.reason,
    }


def format_plan(p: Plan) -> str:
    d, kv = p.dep, p.kv
    lines = [
        f"deployment {d.name} ({d.path})" + (f": {d.description}" if d.description else ""),
        f"{d.devices} x {d.hw_kind} ({_gib(d.device_memory)} each, {d.nodes} node{'s' if d.nodes > 1 else ''}); "
        f"model {d.model.name}, {d.weights} weights, {d.layout.describe()}"
        + (f", LM head TP{d.lm_head_tp}" if d.lm_head_tp != d.layout.tp else ""),
        (f"KV {kv['dtype']}: entry {kv['entry_bytes']} B, indexer key {kv['index_key_bytes']} B; "
         f"{kv['bytes_per_token']:.2f} B per context token, {kv['fixed_bytes_per_sequence'] / MiB:.2f} MiB fixed per "
         f"sequence slot (window rings, fp32 compressor states, a block per ratio); "
         f"{kv['bytes_per_sequence_at_context'] / GiB:.2f} GiB per sequence of {p.context} tokens"),
        (f"budget per rank: {_gib(p.rows[0].budget)} (utilization {d.utilization:g}) - weights - "
         f"{_gib(d.reserve)} workspace reserve; max_num_seqs {d.max_num_seqs} per DP group"),
        "",
    ]
    head = ("ranks", "attention", "experts", "shared", "embed+head", "other", "weights", "KV budget", "KV tokens",
            f"seqs@{p.context}", "EP tok", "EP out MiB", "EP back MiB")
    table = [head]
    for r in p.rows:
        w = r.weights
        table.append((_ranks(r.ranks), *(f"{w[k] / GiB:.2f}" for k in KINDS), f"{r.weight_total / GiB:.2f}",
                      f"{r.kv_budget / GiB:.2f}", "unbounded" if r.kv_tokens is None else f"{r.kv_tokens:,}",
                      str(r.seqs), str(r.ep_tokens), f"{r.ep_dispatch / MiB:.1f}", f"{r.ep_combine / MiB:.1f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines += ["  ".join(c.rjust(widths[i]) for i, c in enumerate(row)) for row in table]
    lines.append("(GiB unless marked; EP: one decode step's dispatch / combine bytes over all MoE layers)")
    if d.env:
        lines += ["", "environment:"] + [f"  export {k}={v}" for k, v in d.env.items()]
        if any("<" in v for v in d.env.values()):
            lines.append("  (values in <...> are per node: fill them in on each node)")
    lines += ["", "fits" if p.fits else f"does not fit: {p.reason}"]
    return "\n".join(lines)


def _tokens(s: str) -> int:
    """--context: an integer, or with a binary K / M suffix (128K = 131072, 1M = 1048576)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a number of tokens (e.g. 1048576 or 1M), got {s!r}")
    return int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20}[m.group(2).lower()]


def cmd_plan(a) -> int:
    try:
        p = plan(load_deployment(a.deploy, a.config), a.context)
    except ConfigError as e:
        print(f"dsv4: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(to_json(p), indent=1) if a.json else format_plan(p))
    return 0 if p.fits else 1


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `plan` on an argparse subparsers object."""
    p = sub.add_parser("plan", help="memory and traffic plan of a multi-device deployment (configs/deploy/)")
    p.add_argument("--deploy", required=True, help="deployment YAML: a path or a name in configs/deploy/")
    p.add_argument("--config", default=None, help="model config (name or path) instead of the deployment's model")
    p.add_argument("--context", type=_tokens, default=None,
                   help="tokens per sequence to size for, e.g. 1048576 or 1M (default: the deployment's max_model_len; "
                        "a larger value is a what-if: the engine caps sequences at max_model_len)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_plan)
    return p


def main(argv=None) -> int:
    """`plan` alone, for tests and `python -m v4.dist.deployment plan ...`."""
    parser = argparse.ArgumentParser(prog="dsv4")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # argparse's own errors (missing --deploy, bad --context) are bad input: 2
        return int(e.code or 0)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())

