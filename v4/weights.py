"""Checkpoints: the official tensor set of a config, a streaming safetensors loader, a random-weight writer.

Names are the official HF / demo names without a `model.` prefix (spec §4.1), e.g.
`layers.3.attn.wq_a.weight`, `mtp.0.e_proj.weight`, `hc_head_fn`.

- `expected_tensors(cfg)`: every tensor of the checkpoint for `cfg`, with shape and storage role.
- `load_checkpoint(path, cfg=None)`: validates all shard headers against `expected_tensors` first
  (names, shapes, dtypes, `.scale` companions; nothing is read before that), then streams the
  shards one tensor at a time. FP8 / FP4 weights come back as `QuantizedWeight`, everything else as
  a tensor in its stored dtype. With `select` (a rank's `rank_slice`) it reads only that rank's
  slices of the unsharded checkpoint.
- `init_checkpoint(cfg, out_dir, quant=...)`: a seeded random-weight checkpoint in the official
  layout, written shard by shard (bf16, fp32, or the official fp8 / fp4 forms).
- `canonical_name(name)`: the official name of a stored tensor name (aliases that transformers'
  `save_pretrained` writes, legacy spellings); None for tensors that are ignored.
- `checkpoint_hash(path)`: a cheap fingerprint of a checkpoint's weights (headers, sizes, samples).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .config import CSA_RATIO, ModelConfig
from .errors import CheckpointError
from .quant import QuantizedWeight, quant_fp4, quant_fp8_block

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"  # the checkpoint when there is no index (transformers' rule)
CONFIG_FILE = "config.json"
FP8_BLOCK = 128
FP4_BLOCK = 32

ROLES = ("float", "fp32", "fp8able", "expert", "index")

# The official quantization_config of the FP8 releases (spec §1.1).
OFFICIAL_QUANT_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "scale_fmt": "ue8m0",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}

# safetensors dtype string -> torch dtype, a family a line; the bytes per element are the dtype's itemsize
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
_TORCH_TO_ST = {dtype: name for name, dtype in _ST_DTYPES.items()}

FLOAT_DTYPES = ("F32", "BF16", "F16")
SCALE_DTYPES = ("F8_E8M0", "F32")
INDEX_DTYPES = ("I64", "I32")


# ---------------------------------------------------------------------------------------------
# The official tensor set
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: logical shape ([out, in] for linears) and storage role.

    role: "float" (F32/BF16/F16), "fp32" (stored F32 officially; BF16/F16 accepted, upcast at use),
    "fp8able" (float, or F8_E4M3 + 128x128-block `.scale`), "expert" (float, FP8 block-scaled, or
    FP4 packed I8 [out, in/2] + per-32 `.scale`), "index" (I64 / I32).
    dims: for each dimension, the formula in config.json field names that gives it (for messages).
    """

    shape: tuple[int, ...]
    role: str
    dims: tuple[str, ...] = ()

    @property
    def quantizable(self) -> bool:
        return self.role in ("fp8able", "expert")


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _cfg_namespace(cfg: ModelConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _dim_fields(expr: str, cfg: ModelConfig) -> list[str]:
    names = ModelConfig.field_names()
    out = []
    for m in _IDENT.findall(expr):
        if m in names and m not in out:
            out.append(m)
    return out


def _field_values(expr: str, cfg: ModelConfig) -> str:
    """'num_attention_heads*head_dim//o_groups' -> 'num_attention_heads=64, head_dim=512, o_groups=8'."""
    parts = []
    for f in _dim_fields(expr, cfg):
        v = getattr(cfg, f)
        if f == "compress_ratios":
            idx = re.search(r"compress_ratios\[(\d+)\]", expr)
            parts.append(f"compress_ratios[{idx.group(1)}]={v[int(idx.group(1))]}" if idx else f"compress_ratios={v}")
        else:
            parts.append(f"{f}={v}")
    return ", ".join(parts)


class _SpecTable:
    """Collects TensorSpecs in order; dims are ints or formulas in config.json field names."""

    def __init__(self, cfg: ModelConfig):
        self.ns = _cfg_namespace(cfg)
        self.specs: dict[str, TensorSpec] = {}
        self.memo: dict[str, tuple[int, str]] = {}

    def value(self, d: str) -> tuple[int, str]:
        if d not in self.memo:
            self.memo[d] = (int(eval(d, {"__builtins__": {}}, self.ns)), d.replace("//", "/"))  # noqa: S307 - our own formulas
        return self.memo[d]

    def add(self, name: str, role: str, *dims) -> None:
        shape, exprs = [], []
        for d in dims:
            if isinstance(d, int):
                shape.append(d)
                exprs.append(str(d))
            else:
                v, e = self.value(d)
                shape.append(v)
                exprs.append(e)
        self.specs[name] = TensorSpec(tuple(shape), role, tuple(exprs))


_D = "hidden_size"
_HC_ROWS = "(2+hc_mult)*hc_mult"
_HC_COLS = "hc_mult*hidden_size"


def expected_tensors(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of the official checkpoint for `cfg` (scales of FP8/FP4 weights not listed)."""
    table = _SpecTable(cfg)
    add, D = table.add, _D
    add("embed.weight", "float", "vocab_size", D)
    for layer in range(cfg.num_hidden_layers):
        _block_tensors(add, cfg, f"layers.{layer}.", layer, mtp=False)
    for j in range(cfg.num_nextn_predict_layers):
        p = f"mtp.{j}."
        add(f"{p}e_proj.weight", "fp8able", D, D)
        add(f"{p}h_proj.weight", "fp8able", D, D)
        add(f"{p}enorm.weight", "float", D)
        add(f"{p}hnorm.weight", "float", D)
        _block_tensors(add, cfg, p, cfg.num_hidden_layers + j, mtp=True)
        add(f"{p}norm.weight", "float", D)
        _hc_head_tensors(add, p)
    add("norm.weight", "float", D)
    _hc_head_tensors(add, "")
    add("head.weight", "float", "vocab_size", D)
    return table.specs


def _hc_head_tensors(add, prefix: str) -> None:
    add(f"{prefix}hc_head_fn", "fp32", "hc_mult", _HC_COLS)
    add(f"{prefix}hc_head_base", "fp32", "hc_mult")
    add(f"{prefix}hc_head_scale", "fp32", 1)


def _block_tensors(add, cfg: ModelConfig, prefix: str, layer: int, mtp: bool) -> None:
    """One transformer block's tensors (a main layer's or an MTP module's)."""
    add(f"{prefix}attn_norm.weight", "float", _D)
    add(f"{prefix}ffn_norm.weight", "float", _D)
    for unit in ("attn", "ffn"):
        add(f"{prefix}hc_{unit}_fn", "fp32", _HC_ROWS, _HC_COLS)
        add(f"{prefix}hc_{unit}_base", "fp32", _HC_ROWS)
        add(f"{prefix}hc_{unit}_scale", "fp32", 3)
    _attention_tensors(add, cfg, f"{prefix}attn.", layer)
    _ffn_tensors(add, cfg, f"{prefix}ffn.", layer, mtp)


def _attention_tensors(add, cfg: ModelConfig, a: str, layer: int) -> None:
    D = _D
    add(f"{a}wq_a.weight", "fp8able", "q_lora_rank", D)
    add(f"{a}q_norm.weight", "float", "q_lora_rank")
    add(f"{a}wq_b.weight", "fp8able", "num_attention_heads*head_dim", "q_lora_rank")
    add(f"{a}wkv.weight", "fp8able", "head_dim", D)
    add(f"{a}kv_norm.weight", "float", "head_dim")
    add(f"{a}wo_a.weight", "fp8able", "o_groups*o_lora_rank", "num_attention_heads*head_dim//o_groups")
    add(f"{a}wo_b.weight", "fp8able", D, "o_groups*o_lora_rank")
    add(f"{a}attn_sink", "fp32", "num_attention_heads")
    ratio = cfg.layer_ratio(layer)
    r = f"compress_ratios[{layer}]"
    if ratio > 0:
        kc = "2*head_dim" if ratio == CSA_RATIO else "head_dim"
        add(f"{a}compressor.wkv.weight", "float", kc, D)
        add(f"{a}compressor.wgate.weight", "float", kc, D)
        add(f"{a}compressor.ape", "fp32", r, kc)
        add(f"{a}compressor.norm.weight", "float", "head_dim")
    if ratio == CSA_RATIO:
        ix = f"{a}indexer."
        add(f"{ix}wq_b.weight", "fp8able", "index_n_heads*index_head_dim", "q_lora_rank")
        add(f"{ix}weights_proj.weight", "float", "index_n_heads", D)
        add(f"{ix}compressor.wkv.weight", "float", "2*index_head_dim", D)
        add(f"{ix}compressor.wgate.weight", "float", "2*index_head_dim", D)
        add(f"{ix}compressor.ape", "fp32", r, "2*index_head_dim")
        add(f"{ix}compressor.norm.weight", "float", "index_head_dim")


def _ffn_tensors(add, cfg: ModelConfig, f: str, layer: int, mtp: bool) -> None:
    D = _D
    add(f"{f}gate.weight", "float", "n_routed_experts", D)
    if not mtp and cfg.is_hash_layer(layer):
        add(f"{f}gate.tid2eid", "index", "vocab_size", "num_experts_per_tok")
    else:
        add(f"{f}gate.bias", "fp32", "n_routed_experts")
    for e in range(cfg.n_routed_experts):
        add(f"{f}experts.{e}.w1.weight", "expert", "moe_intermediate_size", D)
        add(f"{f}experts.{e}.w2.weight", "expert", D, "moe_intermediate_size")
        add(f"{f}experts.{e}.w3.weight", "expert", "moe_intermediate_size", D)
    if cfg.n_shared_experts == 1:
        add(f"{f}shared_experts.w1.weight", "fp8able", "moe_intermediate_size", D)
        add(f"{f}shared_experts.w2.weight", "fp8able", D, "moe_intermediate_size")
        add(f"{f}shared_experts.w3.weight", "fp8able", "moe_intermediate_size", D)


def scale_name(weight_name: str) -> str:
    """`x.weight` -> `x.scale` (the companion of an FP8 / FP4 weight)."""
    return (weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name) + ".scale"


def fp8_scale_shape(shape: Iterable[int]) -> tuple[int, int]:
    out, inp = shape
    return (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK))


def fp4_shapes(shape: Iterable[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Logical [out, in] -> (packed data shape, scale shape)."""
    out, inp = shape
    return (out, inp // 2), (out, inp // FP4_BLOCK)


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

_ALIASES = {
    "embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}
# transformers writes the attention kv_norm back as `attn.norm` (its reverse mapping is lossy).
_KV_NORM_ALIAS = re.compile(r"^((?:layers|mtp)\.\d+\.attn\.)norm\.weight$")
# MTP shares the main embedding and head; copies of them under mtp.* are dropped (as convert.py does).
_MTP_SHARED = re.compile(r"^mtp\.\d+\.(embed|embed_tokens|head|lm_head)\.weight$")


def canonical_name(name: str) -> str | None:
    """Official name of a stored tensor name; None if the tensor is to be ignored."""
    n = name[len("model."):] if name.startswith("model.") else name
    if _MTP_SHARED.match(n):
        return None
    n = _ALIASES.get(n, n)
    m = _KV_NORM_ALIAS.match(n)
    if m:
        n = f"{m.group(1)}kv_norm.weight"
    # legacy spellings that the official convert.py also folds
    if n.endswith(".weight_scale_inv"):
        n = n[: -len(".weight_scale_inv")] + ".scale"
    if n.endswith(".gate.e_score_correction_bias"):
        n = n[: -len("e_score_correction_bias")] + "bias"
    return n


# ---------------------------------------------------------------------------------------------
# safetensors headers
# ---------------------------------------------------------------------------------------------


@dataclass
class _HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _read_raw_header(path: Path) -> tuple[bytes, bytes, int, int]:
    """The header's 8-byte length prefix, its JSON bytes, the length the prefix declares and the file size; a
    length that cannot fit the file is refused before it is read, so a corrupt prefix never asks for gigabytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: shard is truncated or corrupt ({size} bytes, too short for a safetensors header); "
                    "re-download or re-write it"
                )
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 1 << 31:
                raise CheckpointError(
                    f"{path}: shard is truncated or corrupt (header length {n} exceeds the file size {size}); "
                    "re-download or re-write it"
                )
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(
            f"{path}: cannot read shard ({e.strerror or e}); check the file and its permissions"
        ) from None
    return head, raw, n, size


def _check_header_entry(path: Path, name: str, info, data_len: int) -> _HeaderEntry:
    """One tensor's header entry, checked: readable fields, a dtype this loader reads, and offsets that span
    exactly its bytes inside the data section (data_len bytes)."""
    try:
        dtype = str(info["dtype"])
        shape = tuple(int(x) for x in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{path}: shard is corrupt (bad header entry for tensor {name}); re-download or re-write it"
        ) from None
    if dtype not in _ST_DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name} has dtype {dtype}, which this loader does not read; "
            "convert the checkpoint to BF16/F32/FP8"
        )
    nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
    if end > data_len:
        raise CheckpointError(
            f"{path}: shard is truncated or corrupt (tensor {name} ends at byte {end} of the data section "
            f"but the file holds only {data_len}); re-download or re-write it"
        )
    if begin < 0 or end - begin != nbytes:
        raise CheckpointError(
            f"{path}: shard is corrupt (tensor {name} {dtype} {list(shape)} needs {nbytes} bytes "
            f"but its offsets span {end - begin}); "
            f"re-download or re-write it"
        )
    return _HeaderEntry(dtype, shape, begin, end)


def _read_header(path: Path) -> tuple[dict[str, _HeaderEntry], bytes, int]:
    """Parse and check a safetensors header. Returns (entries, raw header bytes incl. length, file size)."""
    head, raw, n, size = _read_raw_header(path)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: shard is corrupt (unreadable safetensors header: {e}); re-download or re-write it"
        ) from None
    data_len = size - 8 - n
    # checked in header order, so the first bad entry is the one reported
    entries = {name: _check_header_entry(path, name, info, data_len)
               for name, info in header.items() if name != "__metadata__"}
    return entries, head + raw, size


def _read_index(path: Path) -> dict[str, str]:
    try:
        idx = json.loads(path.read_text())
        wm = idx["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise ValueError("weight_map must map tensor names to shard file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{path}: cannot read the shard index ({why}); fix or delete {INDEX_FILE}") from None
    return wm


def _shard_files(root: Path, warn: bool = True) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files of a checkpoint directory and the index map (None without an index).

    transformers' rule: the index names the shards when there is one; otherwise `model.safetensors`
    alone is the checkpoint (other *.safetensors beside it, such as a dump of logits, are ignored,
    with a warning when `warn`); with neither, every *.safetensors file in the directory is a shard.
    """
    index_path = root / INDEX_FILE
    if index_path.is_file():
        wm = _read_index(index_path)
        files: list[str] = []
        for shard in wm.values():
            if shard not in files:
                files.append(shard)
        files.sort()
        for shard in files:
            if not (root / shard).is_file():
                first = next(k for k, v in wm.items() if v == shard)
                raise CheckpointError(
                    f"{root / shard}: shard file is missing ({INDEX_FILE} lists it for {first} and others); "
                    f"download the complete checkpoint"
                )
        return [root / s for s in files], wm
    files = sorted(root.glob("*.safetensors"))
    single = root / SINGLE_FILE
    if single.is_file():
        stray = [f.name for f in files if f.name != SINGLE_FILE]
        if stray and warn:
            warnings.warn(
                f"{root}: ignoring {', '.join(stray)} because there is no {INDEX_FILE} and {SINGLE_FILE} is then "
                f"the whole checkpoint (transformers' rule); write an index to load several shards",
                stacklevel=3,
            )
        return [single], None
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors files and no {INDEX_FILE}; point at a checkpoint directory")
    return files, None


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(x)) for x in shape) + "]"


def _structure_hint(name: str, cfg: ModelConfig, where: str) -> str:
    """Which config field decides whether `name` exists."""
    m = re.match(r"^layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        return f"num_hidden_layers={cfg.num_hidden_layers} in {where}"
    m = re.match(r"^mtp\.(\d+)\.", name)
    if m and int(m.group(1)) >= cfg.num_nextn_predict_layers:
        return f"num_nextn_predict_layers={cfg.num_nextn_predict_layers} in {where}"
    layer = None
    if m := re.match(r"^layers\.(\d+)\.", name):
        layer = int(m.group(1))
    elif m := re.match(r"^mtp\.(\d+)\.", name):
        layer = cfg.num_hidden_layers + int(m.group(1))
    if layer is not None and (".attn.compressor." in name or ".attn.indexer." in name):
        return f"compress_ratios[{layer}]={cfg.layer_ratio(layer)} in {where}"
    if name.endswith(".gate.tid2eid") or name.endswith(".gate.bias"):
        return f"num_hash_layers={cfg.num_hash_layers} in {where}"
    if ".experts." in name:
        return f"n_routed_experts={cfg.n_routed_experts} in {where}"
    if ".shared_experts." in name:
        return f"n_shared_experts={cfg.n_shared_experts} in {where}"
    return ""


def _check_float(name: str, file: str, dtype: str, allowed=FLOAT_DTYPES, what: str = "a float tensor") -> None:
    if dtype not in allowed:
        raise CheckpointError(
            f"tensor {name} in {file} has dtype {dtype} but {what} ({', '.join(allowed)}) is expected; "
            f"the file does not hold the official DeepSeek-V4 layout, re-export it"
        )


_Found = dict[str, tuple[Path, str, _HeaderEntry]]  # canonical name -> (shard, stored name, header entry)


def load_checkpoint(
    path,
    cfg: ModelConfig | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    select=None,
    report: dict | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor | QuantizedWeight]]:
    """Load a safetensors checkpoint directory into {official name: Tensor | QuantizedWeight}.

    With an accelerator `device`, each tensor goes there as soon as it is read, so host RAM holds
    one tensor at a time rather than the checkpoint.

    All headers are checked against `expected_tensors(cfg)` before any data is read; then the shards
    are streamed one tensor at a time. Returns the config actually used (MTP dropped when the
    checkpoint has no `mtp.*` tensors) and the weights.

    select: None reads everything. Otherwise a function official name -> WHOLE | SKIP | Slice
    (`v4.dist.shard`, e.g. `lambda n: rank_slice(n, cfg, place)`): SKIP tensors are not read and
    not returned; a Slice reads only that part of the stored tensor (`v4.dist.sliced_read`: FP8 /
    FP4 slices on scale-cell boundaries stay QuantizedWeight, others come back dequantised to
    float32). The header checks still cover every tensor.
    report: a dict to fill with bytes_read (stored bytes of the data and scales read, slices
    counted by their own size), bytes_total (stored bytes of all expected tensors and their scales)
    and tensors (stored tensors read, scales included).
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(
            f"{root}: checkpoint directory does not exist; give the directory holding config.json and *.safetensors"
        )
    cfg, cfg_where = _checkpoint_config(root, cfg)
    files, index_map = _shard_files(root)
    found, index_canon = _read_headers(root, files, index_map)
    cfg = _drop_absent_mtp(root, cfg, found)
    specs = expected_tensors(cfg)
    scales = _check_names(found, specs, index_canon, cfg, cfg_where)
    forms = _check_layout(found, specs, scales, cfg, cfg_where)
    plans = _plan_reads(specs, forms, select)
    out, total, bytes_read = _stream_tensors(files, found, scales, forms, plans, progress, device)
    if report is not None:
        stored_bytes = (found[k][2].end - found[k][2].begin for k in (*specs, *scales.values()))
        report.update(bytes_read=bytes_read, bytes_total=sum(stored_bytes), tensors=total)
    ordered = {k: out[k] for k in specs if k in plans}
    return cfg, ordered


def _checkpoint_config(root: Path, cfg: ModelConfig | None) -> tuple[ModelConfig, str]:
    """The config to load with (the given one, or the directory's config.json) and where it came from."""
    if cfg is not None:
        return cfg, "the given config"
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{root}: no {CONFIG_FILE} in the checkpoint directory; copy the model's config.json there or pass a config"
        )
    try:
        raw_cfg = json.loads(cfg_path.read_text())
        if not isinstance(raw_cfg, dict):
            raise ValueError("top level is not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot parse ({e}); fix the file") from None
    raw_cfg.setdefault("name", root.name)
    return ModelConfig.from_dict(raw_cfg, source=str(cfg_path)), str(cfg_path)


def _read_headers(root: Path, files: list[Path], index_map: dict[str, str] | None) -> tuple[_Found, dict[str, str]]:
    """Read every header; map canonical names to (file, stored name, entry), and to the index's shard."""
    found: _Found = {}
    for fpath in files:
        entries, _, _ = _read_header(fpath)
        for stored, ent in entries.items():
            canon = canonical_name(stored)
            if canon is None:
                continue
            if canon in found:
                other = found[canon]
                raise CheckpointError(
                    f"tensor {canon} is stored twice: as {other[1]} in {other[0].name} "
                    f"and as {stored} in {fpath.name}; "
                    f"remove one of them"
                )
            found[canon] = (fpath, stored, ent)

    index_canon: dict[str, str] = {}
    if index_map is not None:
        for stored, shard in index_map.items():
            canon = canonical_name(stored)
            if canon is not None:
                index_canon[canon] = shard
                if canon not in found:
                    raise CheckpointError(
                        f"tensor {canon} is missing from {root / shard} although {INDEX_FILE} "
                        "says that shard holds it; "
                        f"the shard is incomplete, re-download it"
                    )
    return found, index_canon


def _drop_absent_mtp(root: Path, cfg: ModelConfig, found: _Found) -> ModelConfig:
    """MTP may be absent (transformers writes none): then load without it, with a warning."""
    if cfg.num_nextn_predict_layers > 0 and not any(k.startswith("mtp.") for k in found):
        msg = (
            f"{root}: checkpoint has no mtp.* tensors although num_nextn_predict_layers="
            f"{cfg.num_nextn_predict_layers}; loading without the MTP block(s) (num_nextn_predict_layers=0)"
        )
        warnings.warn(msg, stacklevel=3)
        cfg = dataclasses.replace(
            cfg, num_nextn_predict_layers=0, compress_ratios=list(cfg.compress_ratios[: cfg.num_hidden_layers])
        )
    return cfg


def _check_names(
    found: _Found, specs: dict[str, TensorSpec], index_canon: dict[str, str], cfg: ModelConfig, cfg_where: str
) -> dict[str, str]:
    """Names: no unknown tensors, no orphan scales, nothing missing. Returns {weight name: scale name}."""
    scales: dict[str, str] = {}
    for canon, (fpath, stored, _) in found.items():
        if canon in specs:
            continue
        if canon.endswith(".scale"):
            wname = canon[: -len(".scale")] + ".weight"
            if wname in specs and specs[wname].quantizable:
                if wname not in found:
                    raise CheckpointError(
                        f"tensor {stored} in {fpath.name} is a .scale without its weight {wname}; "
                        f"the checkpoint is incomplete, re-download it"
                    )
                scales[wname] = canon
                continue
        hint = _structure_hint(canon, cfg, cfg_where)
        raise CheckpointError(
            f"unknown tensor {stored} in {fpath.name} (not part of the DeepSeek-V4 checkpoint for this config"
            + (f"; check {hint}" if hint else "")
            + "); the config may not describe these weights"
        )
    for canon, spec in specs.items():
        if canon not in found:
            if canon in index_canon:  # pragma: no cover - caught above
                where = f"{INDEX_FILE} says {index_canon[canon]} should hold it"
            else:
                where = "not found in any shard"
            hint = _structure_hint(canon, cfg, cfg_where)
            raise CheckpointError(
                f"tensor {canon} is missing ({where}); the checkpoint is incomplete or the config does not match it"
                + (f" (check {hint})" if hint else "")
            )
    return scales


def _check_layout(
    found: _Found, specs: dict[str, TensorSpec], scales: dict[str, str], cfg: ModelConfig, cfg_where: str
) -> dict[str, str]:
    """Shapes and dtypes of every tensor and its scale. Returns {canonical: "plain" | "fp8" | "fp4"}."""
    forms: dict[str, str] = {}
    for canon, spec in specs.items():
        fpath, stored, ent = found[canon]
        form = _read_form(canon, spec, ent.dtype, fpath.name)
        _check_shape(canon, spec, ent, form, fpath.name, cfg, cfg_where)
        sname = scales.get(canon)
        if form == "plain" and sname is not None:
            sp, sst, _ = found[sname]
            raise CheckpointError(
                f"tensor {sst} in {sp.name} is a .scale for {canon}, which is stored as {ent.dtype} (not FP8/FP4); "
                f"remove the scale or store the weight quantised"
            )
        if form != "plain":
            if sname is None:
                raise CheckpointError(
                    f"tensor {canon} in {fpath.name} is {ent.dtype} but has no {scale_name(canon)} companion; "
                    f"the checkpoint is incomplete, re-download it"
                )
            _check_scale(canon, spec, form, sname, found[sname])
        forms[canon] = form
    return forms


def _read_form(canon: str, spec: TensorSpec, dtype: str, file: str) -> str:
    """"plain" | "fp8" | "fp4" from a tensor's stored dtype; an error for a dtype its role does not allow."""
    if spec.role == "index":
        _check_float(canon, file, dtype, INDEX_DTYPES, "an integer index tensor")
        return "plain"
    if dtype in FLOAT_DTYPES:
        return "plain"
    if dtype == "F8_E4M3" and spec.quantizable:
        return "fp8"
    if dtype == "I8" and spec.role == "expert":
        return "fp4"
    allowed = {
        "float": "a float tensor (F32, BF16 or F16)",
        "fp32": "an F32 tensor (BF16 / F16 accepted)",
        "fp8able": "a float tensor (F32, BF16, F16) or F8_E4M3 with a .scale",
        "expert": "a float tensor (F32, BF16, F16), F8_E4M3 with a .scale, or packed FP4 (I8) with a .scale",
    }[spec.role]
    raise CheckpointError(
        f"tensor {canon} in {file} has dtype {dtype} but {allowed} is expected; "
        f"the file does not hold the official DeepSeek-V4 layout, re-export it"
    )


def _check_shape(
    canon: str, spec: TensorSpec, ent: _HeaderEntry, form: str, file: str, cfg: ModelConfig, cfg_where: str
) -> None:
    """The stored shape (packed [out, in/2] for FP4) against the config's."""
    exp = spec.shape
    got = ent.shape
    want = exp
    if form == "fp4":
        if exp[1] % FP4_BLOCK:
            raise CheckpointError(
                f"tensor {canon} in {file} is packed FP4 but its input size {exp[1]} ({spec.dims[1]}) "
                f"is not a multiple of {FP4_BLOCK}; store it as BF16 instead"
            )
        want = fp4_shapes(exp)[0]
    if tuple(got) != tuple(want):
        bad_dims = [i for i in range(min(len(got), len(want))) if got[i] != want[i]]
        if len(got) != len(want):
            bad_dims = list(range(len(want)))
        exprs = [spec.dims[i] for i in bad_dims if i < len(spec.dims)]
        fields = ", ".join(v for v in (_field_values(e, cfg) for e in exprs) if v)
        packed = " (packed FP4: [out, in/2])" if form == "fp4" else ""
        raise CheckpointError(
            f"tensor {canon} in {file} has shape {_fmt_shape(got)} but {_fmt_shape(want)}{packed} is expected"
            + (f"; {fields} in {cfg_where} may contradict the weights" if fields else "")
        )


def _check_scale(canon: str, spec: TensorSpec, form: str, sname: str, scale_found: tuple) -> None:
    """The dtype and shape of an FP8 / FP4 weight's `.scale`."""
    sp, sst, sent = scale_found
    exp = spec.shape
    swant = fp8_scale_shape(exp) if form == "fp8" else fp4_shapes(exp)[1]
    _check_float(sname, sp.name, sent.dtype, SCALE_DTYPES, "a scale tensor")
    if tuple(sent.shape) != tuple(swant):
        raise CheckpointError(
            f"tensor {sname} in {sp.name} has shape {_fmt_shape(sent.shape)} but {_fmt_shape(swant)} "
            f"is expected for the {form.upper()} scale of {canon} {_fmt_shape(exp)}; "
            "the checkpoint does not match the config"
        )


def _plan_reads(specs: dict[str, TensorSpec], forms: dict[str, str], select) -> dict:
    """What to read: all of it, or this rank's slices ({canonical: ReadPlan}, SKIP tensors left out)."""
    from .dist.sliced_read import SKIP, WHOLE, plan_read

    plans = {}
    for canon, spec in specs.items():
        answer = WHOLE if select is None else select(canon)
        if answer != SKIP:
            plans[canon] = plan_read(canon, forms[canon], spec.shape, answer)
    return plans


def _stream_tensors(
    files: list[Path], found: _Found, scales: dict[str, str], forms: dict[str, str], plans: dict, progress: bool, device
) -> tuple[dict, int, int]:
    """Stream the planned tensors shard by shard. Returns (weights, stored tensors read, bytes read)."""
    by_file: dict[Path, list[tuple[str, str, tuple | None]]] = {}
    for canon, plan in plans.items():
        fpath, stored, _ = found[canon]
        by_file.setdefault(fpath, []).append((stored, canon, plan.data))
        if canon in scales:
            sp, sst, _ = found[scales[canon]]
            by_file.setdefault(sp, []).append((sst, scales[canon], plan.scale))
    total = sum(len(v) for v in by_file.values())
    bytes_read = 0

    from tqdm.auto import tqdm

    raw: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor | QuantizedWeight] = {}
    pbar = tqdm(total=total, desc="loading weights", unit="tensor", disable=None if progress else True, file=sys.stderr)
    try:
        for fpath in files:
            todo = by_file.get(fpath)
            if not todo:
                continue
            pbar.set_postfix_str(fpath.name, refresh=False)
            bytes_read += _read_shard(fpath, todo, device, raw, pbar)
            _pair_ready(raw, forms, scales, plans, out)
    finally:
        pbar.close()
    assert not raw, f"internal: unpaired tensors {sorted(raw)[:3]}"
    return out, total, bytes_read


def _read_shard(fpath: Path, todo: list, device, raw: dict[str, torch.Tensor], pbar) -> int:
    """Read one shard's planned tensors into `raw`; returns the bytes read."""
    from safetensors import safe_open

    from .dist.sliced_read import read_stored

    bytes_read = 0
    try:
        handle = safe_open(str(fpath), framework="pt", device=str(device))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(
            f"{fpath}: cannot open shard ({e.__class__.__name__}: {e}); the shard is corrupt, re-download it"
        ) from None
    with handle as fh:
        for stored, canon, index in todo:
            try:
                t = read_stored(fh, stored, index)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(
                    f"{fpath}: cannot read tensor {stored} ({e.__class__.__name__}: {e}); the shard is corrupt, "
                    "re-download it"
                ) from None
            raw[canon] = t
            bytes_read += t.numel() * t.element_size()
            pbar.update(1)
    return bytes_read


def _pair_ready(raw: dict, forms: dict[str, str], scales: dict[str, str], plans: dict, out: dict) -> None:
    """Pair weights with scales as soon as both are in, moving them from `raw` to `out`."""
    from .dist.sliced_read import finish

    for canon in list(raw):
        if canon.endswith(".scale"):
            continue
        form = forms.get(canon)
        if form is None:
            continue
        if form == "plain":
            out[canon] = finish(form, raw.pop(canon), None, plans[canon])
        elif scales[canon] in raw:
            out[canon] = finish(form, raw.pop(canon), raw.pop(scales[canon]), plans[canon])


# ---------------------------------------------------------------------------------------------
# Random-weight checkpoints
# ---------------------------------------------------------------------------------------------

QUANT_MODES = ("bf16", "fp32", "fp8")


def _stored_form(spec: TensorSpec, quant: str) -> str:
    """How a tensor is written: "bf16" | "fp32" | "i64" | "fp8" | "fp4"."""
    if spec.role == "index":
        return "i64"
    if quant == "fp32" or spec.role == "fp32":
        return "fp32"
    if quant == "fp8" and spec.role == "fp8able":
        return "fp8"
    if quant == "fp8" and spec.role == "expert":
        return "fp4"
    return "bf16"


def _stored_entries(name: str, spec: TensorSpec, form: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """[(stored name, safetensors dtype, shape)] for one logical tensor."""
    if form == "fp8":
        return [(name, "F8_E4M3", spec.shape), (scale_name(name), "F8_E8M0", fp8_scale_shape(spec.shape))]
    if form == "fp4":
        d, s = fp4_shapes(spec.shape)
        return [(name, "I8", d), (scale_name(name), "F8_E8M0", s)]
    dt = {"bf16": "BF16", "fp32": "F32", "i64": "I64"}[form]
    return [(name, dt, spec.shape)]


def _tensor_seed(seed: int, name: str) -> int:
    h = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def init_tensor(name: str, spec: TensorSpec, cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    """The fp32 (int64 for tid2eid) random value of one tensor; depends only on (seed, name, shape)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(_tensor_seed(seed, name))
    shape = spec.shape

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        t = torch.randn(shape, generator=g, dtype=torch.float32)
        if std != 1.0:
            t.mul_(std)
        if mean != 0.0:
            t.add_(mean)
        return t

    leaf = name.rsplit(".", 1)[-1] if not name.endswith(".weight") else name[: -len(".weight")].rsplit(".", 1)[-1]
    if spec.role == "index":  # tid2eid: k distinct experts per token
        r = torch.rand((shape[0], cfg.n_routed_experts), generator=g)
        return torch.argsort(r, dim=1)[:, : shape[1]].contiguous().to(torch.int64)
    if name == "embed.weight":
        return normal(1.0)
    if re.search(r"(^|\.)hc_(attn|ffn|head)_fn$", name):
        return normal(1.0 / math.sqrt(shape[1]))
    if re.search(r"(^|\.)hc_(attn|ffn|head)_base$", name):
        return normal(0.1)
    if re.search(r"(^|\.)hc_(attn|ffn|head)_scale$", name):
        return normal(0.1, 1.0)
    if name.endswith("attn_sink"):
        return normal(1.0)
    if name.endswith(".ape") or name.endswith("gate.bias"):
        return normal(0.1)
    if len(shape) == 1 and (leaf.endswith("norm") or leaf in ("enorm", "hnorm")):
        return normal(0.1, 1.0)
    if len(shape) == 2:  # linear [out, in] (head included)
        return normal(1.0 / math.sqrt(shape[1]))
    raise AssertionError(f"internal: no init rule for {name} {shape}")  # pragma: no cover


def _encode(name: str, value: torch.Tensor, form: str) -> list[tuple[str, torch.Tensor]]:
    if form == "fp8":
        data, scale = quant_fp8_block(value)
        return [(name, data), (scale_name(name), scale)]
    if form == "fp4":
        data, scale = quant_fp4(value)
        return [(name, data), (scale_name(name), scale)]
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "i64": torch.int64}[form]
    return [(name, value.to(dt).contiguous())]


_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _written_config(cfg: ModelConfig, quant: str) -> ModelConfig:
    """The config.json `init_checkpoint` writes beside the weights of `quant`."""
    if quant == "fp8":
        for fname in ("hidden_size", "moe_intermediate_size"):
            v = getattr(cfg, fname)
            if v % FP4_BLOCK or v % 2:
                raise CheckpointError(
                    f"cannot write FP4 routed experts: {fname}={v} is not a multiple of {FP4_BLOCK}; "
                    f"change {fname} or use quant='bf16'"
                )
        return dataclasses.replace(cfg, quantization_config=dict(OFFICIAL_QUANT_CONFIG), expert_dtype="fp4")
    return dataclasses.replace(cfg, quantization_config=None, expert_dtype=None)


_Unit = tuple[str, TensorSpec, str, int]  # (name, spec, stored form, stored bytes)


def _plan_shards(
    specs: dict[str, TensorSpec], quant: str, max_shard_bytes: int
) -> tuple[list[_Unit], list[list[_Unit]]]:
    """Plan shards (sizes are known from shapes, so N is known before writing): (units, shards)."""
    units: list[_Unit] = []
    for name, spec in specs.items():
        form = _stored_form(spec, quant)
        nbytes = sum(math.prod(s) * _ST_DTYPES[dt].itemsize for _, dt, s in _stored_entries(name, spec, form))
        units.append((name, spec, form, nbytes))
    shards: list[list[_Unit]] = [[]]
    cur = 0
    for u in units:
        if shards[-1] and cur + u[3] > max_shard_bytes:
            shards.append([])
            cur = 0
        shards[-1].append(u)
        cur += u[3]
    return units, shards


def _write_shard(path: Path, fname: str, shard: list[_Unit], cfg: ModelConfig, seed: int, weight_map: dict[str, str],
                 pbar) -> int:
    """Encode and write one shard, recording its tensors in weight_map; returns their bytes."""
    from safetensors.torch import save_file

    total_size = 0
    tensors: dict[str, torch.Tensor] = {}
    for name, spec, form, nbytes in shard:
        value = init_tensor(name, spec, cfg, seed)
        for sname, t in _encode(name, value, form):
            tensors[sname] = t
            weight_map[sname] = fname
            total_size += t.numel() * t.element_size()
        del value
        pbar.update(1)
    expect = {sn: (dt, tuple(s)) for name, spec, form, _ in shard for sn, dt, s in _stored_entries(name, spec, form)}
    for sname, t in tensors.items():
        got = (_TORCH_TO_ST.get(t.dtype), tuple(t.shape))
        if got != expect[sname]:  # pragma: no cover - guards the codec contract
            raise RuntimeError(f"internal: {sname} encoded as {got}, expected {expect[sname]}")
    save_file(tensors, str(path), metadata={"format": "pt"})
    del tensors
    return total_size


def init_checkpoint(
    cfg: ModelConfig,
    out_dir,
    quant: str = "bf16",
    seed: int = 0,
    max_shard_bytes: int = 2**30,
    progress: bool = True,
) -> Path:
    """Write a seeded random-weight checkpoint for `cfg` in the official layout; returns the directory.

    quant: "bf16" (floats BF16, fp32 extras F32), "fp32" (all floats F32), or "fp8" (the official
    forms: FP8 e4m3 + UE8M0 128x128 scales, routed experts FP4 + UE8M0 per-32 scales). Each tensor's
    value depends only on (seed, name, shape), so the same seed gives the same model for any shard
    size and any quant (bf16 = round(fp32); fp8/fp4 = quant(fp32)).
    """
    if quant not in QUANT_MODES:
        raise CheckpointError(f"unknown quant {quant!r} for init_checkpoint; use one of {', '.join(QUANT_MODES)}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    cfg.validate()
    cfg_out = _written_config(cfg, quant)

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{out}: cannot create the output directory ({e.strerror or e})") from None

    units, shards = _plan_shards(expected_tensors(cfg), quant, max_shard_bytes)
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for old in out.glob("model-*-of-*.safetensors"):  # stale shards of an earlier write
        if _SHARD_RE.match(old.name) and old.name not in names:
            old.unlink()

    from tqdm.auto import tqdm

    weight_map: dict[str, str] = {}
    total_size = 0
    pbar = tqdm(
        total=len(units), desc="writing weights", unit="tensor", disable=None if progress else True, file=sys.stderr
    )
    try:
        for fname, shard in zip(names, shards):
            pbar.set_postfix_str(fname, refresh=False)
            total_size += _write_shard(out / fname, fname, shard, cfg, seed, weight_map, pbar)
    finally:
        pbar.close()

    (out / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        + "\n"
    )
    (out / CONFIG_FILE).write_text(json.dumps(cfg_out.to_hf_dict(), indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------

_SAMPLE = 1 << 16


def checkpoint_hash(path) -> str:
    """sha256 over the index, every shard's name, size and header, and 64 KiB samples of its data
    (start, middle, end). Cheap (reads < 200 KiB per shard); distinguishes different seeds."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory does not exist")
    files, _ = _shard_files(root, warn=False)
    h = hashlib.sha256()
    if (root / INDEX_FILE).is_file():
        h.update(b"index\0" + (root / INDEX_FILE).read_bytes())
    for fpath in files:
        _, header, size = _read_header(fpath)
        h.update(f"shard\0{fpath.name}\0{size}\0".encode())
        h.update(header)
        start = len(header)
        data_len = size - start
        with open(fpath, "rb") as fh:
            for off in sorted({0, max(0, data_len // 2 - _SAMPLE // 2), max(0, data_len - _SAMPLE)}):
                fh.seek(start + off)
                h.update(fh.read(min(_SAMPLE, data_len - off)))
    return h.hexdigest()
