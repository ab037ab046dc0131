"""Golden bundles: what one recording holds, on disk and in memory.

A bundle is a directory with two files:

    BUNDLE/bundle.json          metadata (UTF-8 JSON, human-readable)
    BUNDLE/tensors.safetensors  every tensor (safetensors; its header metadata repeats the format tag)

A directory keeps the metadata readable with any text tool while the tensors stay in one
safetensors file; copy it with `scp -r` / `tar`. `bundle.json` carries the sha256 of the tensor
file, so a truncated or swapped tensor file is caught before any number is compared.

Tensor keys (prompt i = the i-th prompt in file / suite order; P = recorded logit positions,
N = greedy tokens):

    prompt.{i}.input_ids        int64   [S]        the prompt
    prompt.{i}.logit_positions  int64   [P]        positions whose logits are kept (all: 0..S-1)
    prompt.{i}.logits           float32 [P, vocab] logits at those positions (prefill)
    prompt.{i}.greedy_ids       int64   [N]        greedy continuation (no stop at EOS)
    prompt.{i}.greedy_logits    float32 [N, vocab] row j = the logits that chose greedy_ids[j]
    prompt.{i}.hook.{name}      float32 (ids: int64) one per hook point, prefill only, in the
                                forward order listed in bundle.json "hooks":
        layers.{l}.input                  [S, hc, D]  mHC input streams of block l
        layers.{l}.attn.q                 [S, H, d]
        layers.{l}.attn.kv                [S, d]
        layers.{l}.attn.indexer_scores    [S, K]      score of each pick, -inf for -1 (CSA)
        layers.{l}.attn.indexer_topk      [S, K]      logical entry ids, -1 padded (CSA)
        layers.{l}.attn.compressed        [E, d]      entries emitted by this prompt (CSA/HCA)
        layers.{l}.attn.output            [S, H, d]
        layers.{l}.ffn.route_ids          [S, k]      int64
        layers.{l}.ffn.route_weights      [S, k]
        layers.{l}.ffn.output             [S, D]
        layers.{l}.output                 [S, hc, D]  block output streams
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from v4.errors import DSV4Error

FORMAT = "dsv4-parity-bundle"
VERSION = 1
META_FILE = "bundle.json"
TENSOR_FILE = "tensors.safetensors"
PER_PROMPT = ("input_ids", "logit_positions", "logits", "greedy_ids", "greedy_logits")


class BundleError(DSV4Error):
    """A bundle that cannot be read (missing, damaged, wrong format)."""


class NotComparable(DSV4Error):
    """Two bundles that cannot be compared (different weights, config, prompts, ...)."""


@dataclass
class Bundle:
    path: str
    meta: dict
    tensors: dict

    @property
    def num_prompts(self) -> int:
        return len(self.meta["prompts"])

    @property
    def hooks(self) -> list:
        return list(self.meta.get("hooks") or [])

    def t(self, i: int, key: str) -> torch.Tensor:
        return self.tensors[f"prompt.{i}.{key}"]

    def hook(self, i: int, name: str) -> torch.Tensor:
        return self.tensors[f"prompt.{i}.hook.{name}"]

    def label(self) -> str:
        m = self.meta
        return f"{m['backend']['name']}/{m['dtype']}/{m['mode']}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_mode() -> int:
    """rw for whoever the umask allows (mkstemp's 0600 would make a bundle awkward to share)."""
    m = os.umask(0)
    os.umask(m)
    return 0o666 & ~m


def write(path, tensors: dict, meta: dict) -> Bundle:
    """Write BUNDLE/tensors.safetensors then BUNDLE/bundle.json (with the tensor file's sha256).

    Each file is written to a temporary name and renamed, so a crash leaves no half-written file
    under the final name."""
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tens = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".tmp")
    os.close(fd)
    save_file(tens, tmp, metadata={"format": FORMAT, "version": str(VERSION)})
    os.chmod(tmp, _file_mode())
    os.replace(tmp, root / TENSOR_FILE)
    meta = dict(meta, format=FORMAT, format_version=VERSION, tensors_sha256=_sha256(root / TENSOR_FILE))
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    os.chmod(tmp, _file_mode())
    os.replace(tmp, root / META_FILE)
    return Bundle(str(root), meta, tens)


def read(path) -> Bundle:
    """Read and validate a bundle. Every failure is a BundleError with one sentence."""
    root = Path(path)
    if root.is_file() and root.name in (META_FILE, TENSOR_FILE):
        root = root.parent  # accept either file of the pair too
    if not root.is_dir():
        raise BundleError(
            f"{root}: no such bundle; a bundle is a directory holding {META_FILE} and {TENSOR_FILE} (written by `dsv4 "
            "parity record --out`)"
        )
    mp, tp = root / META_FILE, root / TENSOR_FILE
    for p in (mp, tp):
        if not p.is_file():
            raise BundleError(f"{root}: bundle is incomplete, {p.name} is missing")
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("top level is not an object")
    except (OSError, ValueError) as e:
        raise BundleError(f"{mp}: damaged metadata ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None
    if meta.get("format") != FORMAT:
        raise BundleError(f"{mp}: not a dsv4 parity bundle (format {meta.get('format')!r})")
    if meta.get("format_version") != VERSION:
        raise BundleError(
            f"{mp}: bundle format version {meta.get('format_version')!r}, this dsv4 reads version {VERSION}; "
            "re-record it"
        )
    _check_schema(meta, mp)
    digest = _sha256(tp)
    if digest != meta["tensors_sha256"]:
        raise BundleError(
            f"{tp}: damaged tensor file (sha256 differs from the one {META_FILE} records); copy the bundle again"
        )
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(tp))
    except Exception as e:  # noqa: BLE001 - any parse failure is "damaged", said in one sentence
        raise BundleError(
            f"{tp}: damaged tensor file ({e.__class__.__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        ) from None
    b = Bundle(str(root), meta, tensors)
    _validate(b)
    return b


# bundle.json fields compare relies on: (path, type)
_SCHEMA = (
    (("model",), dict), (("model", "config_hash"), str), (("model", "config"), dict),
    (("model", "config", "vocab_size"), int), (("model", "config", "compress_ratios"), list),
    (("weights",), dict), (("weights", "hash"), str), (("backend",), dict), (("backend", "name"), str),
    (("dtype",), str), (("mode",), str), (("prompts",), list), (("hooks",), list), (("tensors_sha256",), str),
)


def _check_schema(meta: dict, where: Path) -> None:
    for path, typ in _SCHEMA:
        node = meta
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, typ) or isinstance(node, bool):
            raise BundleError(f"{where}: damaged metadata, field '{'.'.join(path)}' is missing or not a {typ.__name__}")
    if not all(isinstance(h, str) for h in meta["hooks"]):
        raise BundleError(f"{where}: damaged metadata, 'hooks' must list hook names")


def _validate(b: Bundle) -> None:
    """Every key the metadata promises is there, with the expected dtype and rank."""
    vocab = b.meta["model"]["config"].get("vocab_size")
    where = Path(b.path) / TENSOR_FILE
    for i in range(b.num_prompts):
        for key in PER_PROMPT:
            k = f"prompt.{i}.{key}"
            if k not in b.tensors:
                raise BundleError(f"{where}: damaged bundle, tensor '{k}' is missing")
        ids, logits = b.t(i, "input_ids"), b.t(i, "logits")
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise BundleError(f"{where}: damaged bundle, prompt.{i}.input_ids must be int64 [S]")
        for key in ("logits", "greedy_logits"):
            t = b.t(i, key)
            if t.dim() != 2 or t.shape[1] != vocab:
                raise BundleError(
                    f"{where}: damaged bundle, prompt.{i}.{key} has shape {tuple(t.shape)}, expected [*, {vocab}]"
                )
        if logits.shape[0] != b.t(i, "logit_positions").numel():
            raise BundleError(f"{where}: damaged bundle, prompt.{i}.logits and logit_positions disagree in length")
        for name in b.hooks:
            if f"prompt.{i}.hook.{name}" not in b.tensors:
                raise BundleError(f"{where}: damaged bundle, hook tensor 'prompt.{i}.hook.{name}' is missing")


def check_comparable(a: Bundle, b: Bundle) -> list[str]:
    """Raise NotComparable (one sentence) unless B can be scored against A. Returns notes about
    differences that are allowed (e.g. one side recorded no hooks)."""
    ma, mb = a.meta, b.meta
    la, lb = f"A ({a.path})", f"B ({b.path})"
    if ma["model"]["config_hash"] != mb["model"]["config_hash"]:
        raise NotComparable(
            f"{la} and {lb} are not comparable: they were recorded with different model configs "
            f"('{ma['model'].get('name')}' {ma['model']['config_hash'][:12]} vs '{mb['model'].get('name')}' "
            f"{mb['model']['config_hash'][:12]})"
        )
    if ma["weights"]["hash"] != mb["weights"]["hash"]:
        raise NotComparable(f"{la} and {lb} are not comparable: they were recorded with different weights "
                            f"({_wdesc(ma['weights'])} vs {_wdesc(mb['weights'])})")
    if ma["mode"] != mb["mode"]:
        raise NotComparable(
            f"{la} ran numerics mode '{ma['mode']}' and {lb} '{mb['mode']}'; parity compares like with like, "
            "so record both with the same --mode"
        )
    va, vb = ma["model"]["config"].get("vocab_size"), mb["model"]["config"].get("vocab_size")
    if va != vb:
        raise NotComparable(f"{la} and {lb} are not comparable: different vocabularies ({va} vs {vb})")
    if a.num_prompts != b.num_prompts:
        raise NotComparable(
            f"{la} and {lb} are not comparable: they hold different prompts ({a.num_prompts} "
            f"vs {b.num_prompts} prompts)"
        )
    for i in range(a.num_prompts):
        x, y = a.t(i, "input_ids"), b.t(i, "input_ids")
        if x.shape != y.shape or not torch.equal(x, y):
            raise NotComparable(f"{la} and {lb} are not comparable: prompt {i} has different input ids "
                                f"({x.numel()} vs {y.numel()} tokens{'' if x.shape != y.shape else ', same length'})")
        if not torch.equal(a.t(i, "logit_positions"), b.t(i, "logit_positions")):
            raise NotComparable(
                f"{la} and {lb} are not comparable: prompt {i} kept logits at different positions (record both with "
                "the same --logits)"
            )
    notes = []
    ha, hb = a.hooks, b.hooks
    if ha and hb and ha != hb:
        missing = [h for h in ha if h not in hb] or [h for h in hb if h not in ha]
        if missing:
            raise NotComparable(f"{la} and {lb} are not comparable: they recorded different hook points "
                                f"(e.g. '{missing[0]}' is in one only; record both with the same --layers)")
    elif bool(ha) != bool(hb):
        notes.append("one bundle was recorded without hook points (--layers none): compared at model level only")
    na, nb = ma.get("greedy_tokens"), mb.get("greedy_tokens")
    if na != nb:
        notes.append(f"greedy continuations differ in length ({na} vs {nb}): the common prefix is compared")
    return notes


def _wdesc(w: dict) -> str:
    src = w.get("source")
    if src == "random":
        return f"random seed {w.get('seed')}, {w['hash'][:12]}"
    return f"checkpoint {w.get('path')}, {w['hash'][:12]}"
