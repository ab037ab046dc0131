"""Model and runtime configuration.

`ModelConfig` uses the key names of the official HF `config.json` of DeepSeek-V4-Flash / -Pro
(spec §1.1), so an official `config.json` loads as it is. The layout transformers writes
(`layer_types`, `compress_rates`, `rope_parameters`, ...) is read too. Our YAML files under
`configs/` hold the same keys under `model:` and the runtime selection under `runtime:`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, InputError

SLIDING, CSA, HCA = "sliding", "csa", "hca"
CSA_RATIO = 4  # the overlapping compressor with the lightning indexer; any other ratio > 0 is HCA

REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # One ratio per layer, then one per MTP block (0 = sliding only, 4 = CSA, other = HCA).
    compress_ratios: list = field(default_factory=lambda: [0, 0] + [4, 128] * 20 + [4] + [0])
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        }
    )
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    quantization_config: dict | None = None
    expert_dtype: str | None = None
    name: str = "custom"

    # ---- derived -----------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def layer_ratio(self, layer: int) -> int:
        """Compression ratio of block `layer` (layer == num_hidden_layers + k is MTP block k)."""
        return int(self.compress_ratios[layer])

    def layer_type(self, layer: int) -> str:
        r = self.layer_ratio(layer)
        return SLIDING if r == 0 else (CSA if r == CSA_RATIO else HCA)

    @property
    def layer_types(self) -> list[str]:
        return [self.layer_type(i) for i in range(self.num_hidden_layers)]

    def check_token_ids(self, ids, what: str = "prompt") -> None:
        """One sentence naming the first id outside the vocabulary, or an empty prompt."""
        if len(ids) == 0:
            raise InputError(f"empty {what}: give at least one token")
        bad = next((int(t) for t in ids if not 0 <= int(t) < self.vocab_size), None)
        if bad is not None:
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size}) of model '{self.name}'")

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    @property
    def hca_ratio(self) -> int | None:
        rs = {self.layer_ratio(i) for i in range(self.num_hidden_layers)} - {0, CSA_RATIO}
        return rs.pop() if rs else None

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        d = _normalise_hf_keys(dict(d), source)
        known = cls.field_names()
        unknown = sorted(k for k in d if k not in known and k not in _IGNORED_HF_KEYS)
        if unknown:
            raise ConfigError(
                f"{source}: unknown model field(s) {', '.join(unknown)}; "
                f"valid fields are the keys of the official DeepSeek-V4 config.json"
            )
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.validate(source)
        return cfg

    def to_hf_dict(self) -> dict:
        """The official HF `config.json` content for this config."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        d["model_type"] = "deepseek_v4"
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        if d["expert_dtype"] is None:
            d.pop("expert_dtype")
        return d

    # ---- validation --------------------------------------------------------------------
    def validate(self, source: str = "config") -> None:
        def bad(fieldname: str, why: str):
            raise ConfigError(f"{source}: field '{fieldname}' {why}")

        _check_rows(self, _MODEL_CHECKS, bad)
        n = self.num_hidden_layers + self.num_nextn_predict_layers
        if (
            self.num_nextn_predict_layers == 0
            and isinstance(self.compress_ratios, (list, tuple))
            and len(self.compress_ratios) == n + 1
        ):
            # The official list with the MTP block removed keeps the MTP's trailing entry; transformers
            # and the official inference code read only the first num_hidden_layers entries.
            warnings.warn(
                f"{source}: field 'compress_ratios' has {n + 1} entries for num_hidden_layers={n} and "
                "num_nextn_predict_layers=0; ignoring the trailing entry "
                f"{self.compress_ratios[-1]!r} (an MTP block's)",
                stacklevel=3,
            )
            self.compress_ratios = list(self.compress_ratios[:n])
        if not isinstance(self.compress_ratios, (list, tuple)) or len(self.compress_ratios) != n:
            got = len(self.compress_ratios) if isinstance(self.compress_ratios, (list, tuple)) else self.compress_ratios
            bad("compress_ratios", f"must list one ratio per layer plus one per MTP block ({n} entries), got {got}")
        self.compress_ratios = list(self.compress_ratios)
        for i, r in enumerate(self.compress_ratios):
            if not _non_negative_int(r):
                bad("compress_ratios", f"entry {i} must be a non-negative integer, got {r!r}")
        for j in range(self.num_nextn_predict_layers):
            if self.compress_ratios[self.num_hidden_layers + j] != 0:
                bad(
                    "compress_ratios",
                    f"MTP entry {self.num_hidden_layers + j} must be 0 (the MTP block is sliding-only)",
                )
        _check_rows(self, _LAYOUT_CHECKS, bad)
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            t = rs.get("type", rs.get("rope_type"))
            if t != "yarn":
                bad("rope_scaling", f"type must be 'yarn' (or rope_scaling null), got {t!r}")
            for k in ["factor", "original_max_position_embeddings", "beta_fast", "beta_slow"]:
                if not isinstance(rs.get(k), (int, float)) or rs[k] <= 0:
                    bad("rope_scaling", f"needs a positive '{k}', got {rs.get(k)!r}")
        _check_rows(self, _STORAGE_CHECKS, bad)

    def short(self) -> str:
        return (
            f"{self.name}: {self.num_hidden_layers} layers, hidden {self.hidden_size}, "
            f"{self.num_attention_heads} heads x {self.head_dim}, {self.n_routed_experts} experts "
            f"top-{self.num_experts_per_tok}"
        )


# Keys transformers writes that carry no information we need (or that we re-derive).
_IGNORED_HF_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "initializer_range",
    "use_cache", "pad_token_id", "attention_bias", "attention_dropout", "mlp_bias", "output_router_logits",
    "router_aux_loss_coef", "router_jitter_noise", "auto_map", "partial_rotary_factor",
    "layer_types", "compress_rates", "mlp_layer_types", "rope_parameters", "n_group", "topk_group",
    "first_k_dense_replace", "ep_size", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
}

_LAYER_TYPE_TO_KIND = {
    "sliding_attention": 0,
    "compressed_sparse_attention": "csa",
    "heavily_compressed_attention": "hca",
}


# ---- ModelConfig.validate's tables ------------------------------------------------------------
# Rows (field, check, message): `validate` raises "<source>: field '<field>' <message>" at the first row
# whose check(config, value) is false, the message formatted with the config (c) and the field's value
# (v). Rows run in order: the type rows come first, so the relations after them compare numbers.


def _positive_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v > 0


def _non_negative_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= 0


def _positive_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0


_POSITIVE_INTS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
    "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
    "max_position_embeddings", "index_n_heads", "index_head_dim", "index_topk",
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "hc_mult",
    "hc_sinkhorn_iters",
)
_NON_NEGATIVE_INTS = ("num_hash_layers", "num_nextn_predict_layers", "n_shared_experts")
_POSITIVE_NUMBERS = (
    "rope_theta", "compress_rope_theta", "routed_scaling_factor", "swiglu_limit", "hc_eps", "rms_norm_eps",
)

_MODEL_CHECKS = (
    *((k, lambda c, v: _positive_int(v), "must be a positive integer, got {v!r}") for k in _POSITIVE_INTS),
    *((k, lambda c, v: _non_negative_int(v), "must be a non-negative integer, got {v!r}") for k in _NON_NEGATIVE_INTS),
    *((k, lambda c, v: _positive_number(v), "must be a positive number, got {v!r}") for k in _POSITIVE_NUMBERS),
    ("num_key_value_heads", lambda c, v: v == 1,
     "must be 1 (V4 attention has one shared K=V head), got {v}"),
    ("qk_rope_head_dim", lambda c, v: not (v % 2 or v > c.head_dim),
     "must be even and at most head_dim={c.head_dim}, got {v}"),
    ("index_head_dim", lambda c, v: not c.qk_rope_head_dim > v,
     "must be at least qk_rope_head_dim={c.qk_rope_head_dim}, got {v}"),
    ("o_groups", lambda c, v: not c.num_attention_heads % v,
     "must divide num_attention_heads={c.num_attention_heads}, got {v}"),
    ("num_experts_per_tok", lambda c, v: not v > c.n_routed_experts,
     "({v}) exceeds n_routed_experts={c.n_routed_experts}"),
    ("num_hash_layers", lambda c, v: not v > c.num_hidden_layers,
     "({v}) exceeds num_hidden_layers={c.num_hidden_layers}"),
    ("scoring_func", lambda c, v: v == "sqrtsoftplus", "must be 'sqrtsoftplus' for DeepSeek V4, got {v!r}"),
    ("hidden_act", lambda c, v: v == "silu", "must be 'silu', got {v!r}"),
    ("tie_word_embeddings", lambda c, v: not v, "must be false (V4 has a separate head)"),
    ("n_shared_experts", lambda c, v: not v > 1, "must be 0 or 1, got {v}"),
)
# after compress_ratios is a list of non-negative integers, one per layer and MTP block
_LAYOUT_CHECKS = (
    ("compress_ratios", lambda c, v: len({r for r in v if r not in (0, CSA_RATIO)}) <= 1,
     "may use only one HCA ratio besides 0 and 4"),
)
_STORAGE_CHECKS = (
    ("expert_dtype", lambda c, v: v in (None, "fp4", "fp8", "bf16"), "must be fp4, fp8 or bf16, got {v!r}"),
)


def _check_rows(cfg, rows, bad) -> None:
    for fieldname, ok, message in rows:
        v = getattr(cfg, fieldname)
        if not ok(cfg, v):
            bad(fieldname, message.format(c=cfg, v=v))


def _normalise_hf_keys(d: dict, source: str) -> dict:
    """Fold the transformers-written layout (layer_types, compress_rates, rope_parameters) into ours."""
    if "compress_ratios" not in d and "layer_types" in d:
        rates = d.get("compress_rates") or {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
        ratios = []
        for t in d["layer_types"]:
            if t not in _LAYER_TYPE_TO_KIND:
                raise ConfigError(f"{source}: field 'layer_types' has unknown entry {t!r}")
            ratios.append(0 if t == "sliding_attention" else int(rates[t]))
        n_mtp = int(d.get("num_nextn_predict_layers", 1))
        d["compress_ratios"] = ratios + [0] * n_mtp
    if "num_hash_layers" not in d and "mlp_layer_types" in d:
        d["num_hash_layers"] = sum(1 for t in d["mlp_layer_types"] if t == "hash_moe")
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("compress"), dict):
        comp = rp["compress"]
        d.setdefault("compress_rope_theta", comp.get("rope_theta", 160000.0))
        if "rope_scaling" not in d:
            t = comp.get("rope_type", comp.get("type"))
            d["rope_scaling"] = (
                {k: comp[k] for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")}
                | {"type": "yarn"}
                if t == "yarn"
                else None
            )
        if isinstance(rp.get("main"), dict):
            d.setdefault("rope_theta", rp["main"].get("rope_theta", 10000.0))
    if "qk_rope_head_dim" not in d and "partial_rotary_factor" in d and "head_dim" in d:
        d["qk_rope_head_dim"] = int(d["head_dim"] * d["partial_rotary_factor"])
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = d["eos_token_id"][0]
    if isinstance(d.get("rope_scaling"), dict):
        d["rope_scaling"] = dict(d["rope_scaling"])
    return d


# ---------------------------------------------------------------------------------------
# Runtime configuration
# ---------------------------------------------------------------------------------------

BACKENDS = ("auto", "reference", "cuda", "ascend")
DTYPES = ("float32", "bfloat16", "float16", "float64")
MODES = ("plain", "exact")
GRAPH_SETTINGS = ("auto", "on", "off")  # runtime.decode_graphs


class ConfigDeprecationWarning(FutureWarning):
    """A deprecated runtime field or flag was used: it still works, and the warning names the new form."""


@dataclass
class RuntimeConfig:
    backend: str = "auto"
    device: str | None = None  # None: the backend's default device
    dtype: str = "float32"
    mode: str = "plain"
    allow_fallback: bool = False  # fill ops a backend lacks from `reference` (said aloud)
    # engine (vLLM's names): continuous batching under one token budget per step
    max_num_seqs: int = 8  # sequences running at once (cache slots)
    max_num_batched_tokens: int = 2048  # tokens per step: decode tokens + prompt chunks
    max_model_len: int = 4096  # prompt + generated tokens of one sequence
    kv_cache_memory: int | str | None = None  # byte budget of the cache ("2GiB"); None: room for every slot
    block_size: int = 64  # entries per page of the compressed / indexer pools
    prefill_chunk: int = (
        0  # most prompt tokens of one sequence per step (vLLM's long_prefill_token_threshold); 0 = no cap
    )
    # decode steps replayed from graphs the backend captures (CUDA graphs on cuda, ACL graphs on ascend):
    # auto (the backend's graphs where its device has them) | on (else the emulated path's checks) | off
    decode_graphs: str = "auto"
    # settings each backend declares for itself (BackendInfo.options; `dsv4 backends` lists them), e.g.
    # {"ascend": {"weights": "w8a8"}}; each reaches its own backend's make_ops only
    backend_options: dict = field(default_factory=dict)
    # multi-device (v4.dist; vLLM's names): ranks = tensor_parallel_size x data_parallel_size
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False  # routed experts split over all ranks (EP = TP x DP)
    moe_comm: str = "alltoall"  # expert-parallel dispatch: alltoall (uneven all_to_all_single) | allgather
    dist_timeout_s: float = 60.0  # a rank silent this long is dead: the others stop and say which
    # MTP speculative decoding (vLLM's --speculative-config): {"method": "mtp", "num_speculative_tokens": k};
    # None: off. A JSON string is accepted too (the CLI flag's form).
    speculative_config: dict | str | None = None

    RENAMED = {"max_batch": "max_num_seqs", "max_seq_len": "max_model_len"}
    # old field -> its new place under runtime: still read, with a ConfigDeprecationWarning (`upgrade`)
    DEPRECATED = {"cuda_graphs": ("decode_graphs",), "ascend_weights": ("backend_options", "ascend", "weights")}

    @property
    def speculative(self) -> "SpeculativeConfig | None":
        return SpeculativeConfig.parse(self.speculative_config)

    @property
    def kv_cache_bytes(self) -> int | None:
        return parse_bytes(self.kv_cache_memory, "runtime.kv_cache_memory")

    def validate(self, source: str = "runtime") -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"{source}: field 'runtime.backend' must be one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"{source}: field 'runtime.dtype' must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.mode not in MODES:
            raise ConfigError(f"{source}: field 'runtime.mode' must be plain or exact, got {self.mode!r}")
        for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{source}: field 'runtime.{k}' must be a positive integer, got {v!r}")
        self.decode_graphs = _graph_setting(self.decode_graphs)
        if self.decode_graphs not in GRAPH_SETTINGS:
            raise ConfigError(f"{source}: field 'runtime.decode_graphs' must be auto, on or off, "
                              f"got {self.decode_graphs!r}")
        if self.backend_options:  # checked against each backend's declaration (the registry, imported only then)
            import backends

            try:
                self.backend_options = backends.check_options(self.backend_options)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
        for k in ("tensor_parallel_size", "data_parallel_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{source}: field 'runtime.{k}' must be a positive integer, got {v!r}")
        if not isinstance(self.enable_expert_parallel, bool):
            raise ConfigError(f"{source}: field 'runtime.enable_expert_parallel' must be true or false, "
                              f"got {self.enable_expert_parallel!r}")
        if self.moe_comm not in ("alltoall", "allgather"):
            raise ConfigError(
                f"{source}: field 'runtime.moe_comm' must be alltoall or allgather, got {self.moe_comm!r}"
            )
        if (
            isinstance(self.dist_timeout_s, bool)
            or not isinstance(self.dist_timeout_s, (int, float))
            or self.dist_timeout_s <= 0
        ):
            raise ConfigError(f"{source}: field 'runtime.dist_timeout_s' must be a positive number of seconds, "
                              f"got {self.dist_timeout_s!r}")
        if isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 0:
            raise ConfigError(
                f"{source}: field 'runtime.prefill_chunk' must be a non-negative integer, got {self.prefill_chunk!r}"
            )
        try:
            self.kv_cache_bytes
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if (
            SpeculativeConfig.parse(self.speculative_config, source)
            and self.tensor_parallel_size * self.data_parallel_size > 1
        ):
            raise ConfigError(f"{source}: field 'runtime.speculative_config': speculative decoding runs on one device "
                              "for now; drop --speculative-config or run with -tp 1 -dp 1")

    @classmethod
    def upgrade(cls, d: dict, source: str = "runtime") -> dict:
        """A copy of runtime dict `d` with each deprecated field (`DEPRECATED`) moved to its new place,
        after checking its value under the name it was given; each one used is said in one
        ConfigDeprecationWarning. Giving an old and a new field different values is an error."""
        d = dict(d)
        for old, path in cls.DEPRECATED.items():
            if old not in d:
                continue
            value = d.pop(old)
            new = "runtime." + ".".join(path)
            if path == ("decode_graphs",):
                value = _graph_setting(value)
            form = value
            for key in reversed(path[1:]):
                form = f"{{{key}: {form}}}"
            why = _setting_problem(path, value)
            if why is not None:
                raise ConfigError(f"{source}: field 'runtime.{old}' (now {new}) {why}")
            warnings.warn(f"{source}: field 'runtime.{old}' is deprecated; write 'runtime.{path[0]}: {form}' instead",
                          ConfigDeprecationWarning, stacklevel=3)
            node = d
            for i, key in enumerate(path[:-1]):
                child = node.get(key)
                if child is not None and not isinstance(child, dict):
                    raise ConfigError(f"{source}: field 'runtime.{'.'.join(path[:i + 1])}' must be a mapping, "
                                      f"got {child!r}")
                node[key] = node = dict(child or {})
            if path[-1] in node and _graph_setting(node[path[-1]]) != value:
                raise ConfigError(f"{source}: fields 'runtime.{old}' (deprecated) and '{new}' disagree "
                                  f"({value!r} vs {node[path[-1]]!r}); keep only {new}")
            node[path[-1]] = value
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "runtime") -> "RuntimeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = cls.upgrade(d, source)
        for old, new in cls.RENAMED.items():
            if old in d:
                raise ConfigError(f"{source}: field 'runtime.{old}' is now 'runtime.{new}' (vLLM's name); rename it")
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown runtime field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
            )
        rc = cls(**d)
        rc.validate(source)
        return rc


def _graph_setting(value):
    """YAML 1.1 reads a bare on / off as a boolean: back to the word."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def _setting_problem(path: tuple, value) -> str | None:
    """What is wrong with `value` for the runtime field at `path` (a deprecated field's new place)."""
    if path == ("decode_graphs",):
        return None if value in GRAPH_SETTINGS else f"must be auto, on or off, got {value!r}"
    if path[0] == "backend_options":
        import backends

        declared = {o.name: o for o in backends.declared_options(path[1])}
        return declared[path[2]].problem(value) if path[2] in declared else None
    return None


@dataclass
class SpeculativeConfig:
    """MTP speculative decoding, vLLM's --speculative-config keys (serving.md §3)."""

    method: str = "mtp"
    num_speculative_tokens: int = 1  # k: drafts per decoding sequence and step, 1 to 3
    # dsv4's own key: how a sampled request's drafts are drawn from the MTP distribution. "sample"
    # (the default) or "argmax" (for comparison: vLLM measured 10 % acceptance with argmax drafts at
    # T = 1 against 49 % sampled). Greedy requests always draft the argmax. Either way is lossless.
    draft_sampling: str = "sample"

    MAX_TOKENS = 3

    @classmethod
    def parse(cls, value, source: str = "runtime") -> "SpeculativeConfig | None":
        if value is None or value == "":
            return None
        field_ = f"{source}: field 'runtime.speculative_config' (--speculative-config)"
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{field_} is not JSON ({e.msg}); write it as "
                                  "'{\"method\": \"mtp\", \"num_speculative_tokens\": 2}'") from None
        if not isinstance(value, dict):
            raise ConfigError(
                f"{field_} must be a JSON object such as {{\"method\": \"mtp\", \"num_speculative_tokens\": 2}}, "
                f"got {value!r}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{field_} has unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        sc = cls(**value)
        if sc.method != "mtp":
            raise ConfigError(f"{field_}: method must be \"mtp\" (V4's own MTP block drafts), got {sc.method!r}")
        k = sc.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cls.MAX_TOKENS:
            raise ConfigError(
                f"{field_}: num_speculative_tokens must be an integer from 1 to {cls.MAX_TOKENS}, got {k!r}"
            )
        if sc.draft_sampling not in ("sample", "argmax"):
            raise ConfigError(f"{field_}: draft_sampling must be \"sample\" or \"argmax\", got {sc.draft_sampling!r}")
        return sc


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value, field: str) -> int | None:
    """None, a positive int of bytes, or a string like "512MiB" / "2GB" / "1.5GiB" -> bytes."""
    if value is None:
        return None
    if isinstance(value, str):
        import re

        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(
            f"field '{field}' must be a positive number of bytes (e.g. 2147483648 or \"2GiB\"), got {value!r}"
        )
    return value


def resolve_config_path(name_or_path: str) -> Path:
    """`tiny` -> configs/tiny.yaml; a directory -> its config.json; a file -> itself."""
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return p
    cand = REPO_CONFIG_DIR / f"{name_or_path}.yaml"
    if cand.is_file():
        return cand
    avail = sorted(x.stem for x in REPO_CONFIG_DIR.glob("*.yaml")) if REPO_CONFIG_DIR.is_dir() else []
    raise ConfigError(
        f"config '{name_or_path}' not found: give a YAML or config.json path, a checkpoint directory, "
        f"or one of: {', '.join(avail) or '(no configs/ directory next to the package)'}"
    )


def load_config_file(name_or_path: str) -> tuple[ModelConfig | None, dict]:
    """Read a model YAML / HF config.json / runtime YAML. Returns (model config or None, runtime dict)."""
    path = resolve_config_path(name_or_path)
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001 - parse errors become one sentence
        raise ConfigError(f"{path}: cannot parse ({e.__class__.__name__}: {e}); fix the file syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    if path.suffix in (".yaml", ".yml"):
        unknown = set(raw) - {"model", "runtime"}
        if unknown:
            raise ConfigError(
                f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}; use 'model:' and 'runtime:'"
            )
        model = None
        if raw.get("model") is not None:
            md = dict(raw["model"])
            md.setdefault("name", path.stem)
            model = ModelConfig.from_dict(md, source=str(path))
        return model, dict(raw.get("runtime") or {})
    md = dict(raw)
    md.setdefault("name", path.parent.name if path.name == "config.json" else path.stem)
    return ModelConfig.from_dict(md, source=str(path)), {}


def _merge_options(base: dict, over: dict) -> dict:
    """runtime.backend_options of the file with the flags' on top, option by option."""
    out = dict(base)
    for backend, opts in over.items():
        mine = out.get(backend)
        out[backend] = {**mine, **opts} if isinstance(mine, dict) and isinstance(opts, dict) else opts
    return out


def build_runtime(base: dict, cli_overrides: dict | None = None, env: dict | None = None) -> RuntimeConfig:
    """Config file < CLI flags < environment (DSV4_BACKEND), as design.md orders them."""
    source = "runtime configuration"
    d = RuntimeConfig.upgrade(base, source)  # deprecated names in the file, then in the flags: the flags win
    over = RuntimeConfig.upgrade({k: v for k, v in (cli_overrides or {}).items() if v is not None}, source)
    for k, v in over.items():
        if k == "backend_options" and isinstance(d.get(k), dict) and isinstance(v, dict):
            v = _merge_options(d[k], v)
        d[k] = v
    env = os.environ if env is None else env
    if env.get("DSV4_BACKEND"):
        d["backend"] = env["DSV4_BACKEND"]
    return RuntimeConfig.from_dict(d, source=source)


def yarn_inv_freq(rope_dim: int, base: float, rope_scaling: dict | None):
    """Inverse frequencies of the rope slice, with YaRN interpolation when rope_scaling is given (spec §2.4)."""
    import torch

    inv = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    if rope_scaling is None:
        return inv
    factor = float(rope_scaling["factor"])
    L0 = float(rope_scaling["original_max_position_embeddings"])
    bf, bs = float(rope_scaling["beta_fast"]), float(rope_scaling["beta_slow"])

    def corr_dim(nrot: float) -> float:
        return rope_dim * math.log(L0 / (nrot * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(corr_dim(bf)), 0)
    hi = min(math.ceil(corr_dim(bs)), rope_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    return inv * ramp / factor + inv * (1 - ramp)
