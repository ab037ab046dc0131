"""Record a golden bundle: run prompts through one model (backend + dtype + mode) and keep the
input ids, logits, a greedy continuation and the tensors at the model's hook points.

`record(model, prompts, options)` takes a built `v4.model.Transformer`, so tests can record a
deliberately perturbed backend through exactly the code path `dsv4 parity record` uses.

How prompts run: the prompts of one batch group (the `batch` key of a prompt; each prompt without
one is its own group) go through the engine (`v4.engine.LLM`) together: the step budget holds
every prompt of the group, so they are prefilled in one packed step per prefill chunk, then
decoded greedily, one packed step per token (a prompt that finishes its prefill early starts
decoding in the same steps as the others' chunks). Hooks keep the prompt tokens only; they see
packed `[T, ...]` tensors, which are split back per prompt by the batch offsets (compressed
entries: by the number each sequence emitted).
A batched recording therefore holds the same per-prompt tensors as recording each prompt alone,
up to the rounding of differently shaped matmuls.
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import v4
from v4.config import RuntimeConfig
from v4.engine import DECODE_LABEL, LLM, SamplingParams, graph_mode
from v4.errors import DSV4Error, InputError

SUITES_DIR = Path(__file__).resolve().parent / "suites"
# Held-out text (Python stdlib source the shipped tiny-v4 never trained on, PSF licence beside it):
# prompts cut from it give a trained model the peaked distributions real text gives it.
HELDOUT_SAMPLE = Path(v4.__file__).resolve().parent / "embedded" / "tiny-v4-heldout" / "sample.json"
TOKEN_LO, TOKEN_HI = 3, 259  # generated prompts use byte-level ids: valid for every vocab >= 259


class RecordError(DSV4Error):
    """The backend produced something the recorder cannot split per prompt (a backend bug)."""


# ---------------------------------------------------------------------------------------- prompts
@dataclass
class Prompt:
    ids: list
    text: str | None = None
    batch: str | None = None
    name: str | None = None


@dataclass
class Options:
    greedy_tokens: int = 8
    layers: str = "all"  # "all" | "none" | comma-separated block indices, e.g. "0,2"
    logits: str = "all"  # "all" | "last:K"
    prefill_chunk: int = 0  # 0 = whole prompt (or batch) in one step
    batching: bool = True  # False: every prompt alone, ignoring batch groups
    block_size: int = 64
    decode_graphs: str = "off"  # greedy continuation as captured graphs: runtime.decode_graphs (auto | on | off)
    speculative_config: str | dict | None = None  # greedy continuation with MTP speculative decoding (runtime field)

    def validate(self):
        if self.greedy_tokens < 0:
            raise InputError(f"--greedy must be >= 0, got {self.greedy_tokens}")
        if self.prefill_chunk < 0:
            raise InputError(f"prefill_chunk must be >= 0, got {self.prefill_chunk}")
        if self.logits != "all":
            if not self.logits.startswith("last:") or not self.logits[5:].isdigit() or int(self.logits[5:]) < 1:
                raise InputError(f"--logits must be 'all' or 'last:K' with K >= 1, got {self.logits!r}")
        if self.layers not in ("all", "none"):
            try:
                [int(x) for x in self.layers.split(",")]
            except ValueError:
                raise InputError(f"--layers must be all, none or block indices like 0,2; got {self.layers!r}") from None

    def layer_set(self, n_layers: int) -> set:
        if self.layers == "all":
            return set(range(n_layers))
        if self.layers == "none":
            return set()
        return {int(x) for x in self.layers.split(",")}


@dataclass
class Suite:
    name: str
    description: str
    config: str | None
    options: dict = field(default_factory=dict)
    prompts: list = field(default_factory=list)  # raw specs


def generated_ids(length: int, seed: int, bos: int) -> list:
    """A prompt of `length` ids: BOS then byte-level ids from Python's seeded Mersenne Twister
    (`random.random()` is reproducible across platforms and Python versions, unlike torch's RNG
    across torch versions), so every machine builds the same suite prompts."""
    if length < 1:
        raise InputError(f"a generated prompt needs length >= 1, got {length}")
    r = random.Random(seed)
    return [bos] + [TOKEN_LO + int(r.random() * (TOKEN_HI - TOKEN_LO)) for _ in range(length - 1)]


def heldout_text() -> str:
    """The held-out sample's files joined with newlines, in the order sample.json stores them."""
    try:
        files = json.loads(HELDOUT_SAMPLE.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{HELDOUT_SAMPLE}: cannot read the held-out sample ({e.__class__.__name__}); "
                         "reinstall dsv4 or use 'text' / 'length' prompts") from None
    return "\n".join(files.values())


def heldout_ids(offset: int, length: int, tokenizer, bos: int, where: str = "prompt") -> list:
    """BOS + the first length-1 tokens (the model's tokenizer) of the held-out text from character
    `offset` on: exactly `length` ids, real text for any model (byte-level or BPE)."""
    text = heldout_text()
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < len(text):
        raise InputError(f"{where}: 'heldout' must be a character offset in [0, {len(text)}), got {offset!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise InputError(f"{where}: a held-out prompt needs an integer 'length' >= 1, got {length!r}")
    ids = tokenizer.encode(text[offset:], add_bos=False)[: length - 1]
    if len(ids) < length - 1:
        raise InputError(f"{where}: the held-out text from offset {offset} has only {len(ids)} tokens, "
                         f"{length - 1} needed; use a smaller 'heldout' offset or 'length'")
    return [bos] + ids


def _prompt_from_spec(spec: dict, tokenizer, bos: int, where: str) -> Prompt:
    if not isinstance(spec, dict):
        raise InputError(f"{where}: each prompt must be a JSON object like {{\"ids\": [...]}} or {{\"text\": \"...\"}}")
    keys = [k for k in ("ids", "text", "heldout") if k in spec] or [k for k in ("length",) if k in spec]
    if len(keys) != 1:
        raise InputError(f"{where}: a prompt needs exactly one of 'ids', 'text', 'heldout' (+ 'length') or 'length' "
                         f"(+ 'seed'), got keys {sorted(spec)}")
    batch = spec.get("batch")
    batch = None if batch is None else str(batch)
    if "ids" in spec:
        ids = spec["ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InputError(f"{where}: 'ids' must be a list of integers")
        return Prompt(list(ids), None, batch, spec.get("name"))
    if "text" in spec:
        if not isinstance(spec["text"], str):
            raise InputError(f"{where}: 'text' must be a string")
        return Prompt(tokenizer.encode(spec["text"]), spec["text"], batch, spec.get("name"))
    if "heldout" in spec:
        n = spec.get("length")
        return Prompt(heldout_ids(spec["heldout"], n, tokenizer, bos, where), None, batch,
                      spec.get("name") or f"heldout{spec['heldout']}-len{n}")
    n = spec["length"]
    if isinstance(n, bool) or not isinstance(n, int):
        raise InputError(f"{where}: 'length' must be an integer")
    return Prompt(generated_ids(n, int(spec.get("seed", 0)), bos), None, batch, spec.get("name") or f"len{n}")


def load_prompts_file(path, tokenizer, bos: int) -> list:
    """JSONL: one object per line, {"ids": [...]}, {"text": "..."}, {"heldout": OFFSET, "length": N}
    (BOS + N-1 tokens of the held-out text from that character offset) or {"length": N, "seed": S};
    optional "batch" (prompts with the same value run packed together) and "name". Blank lines
    and lines starting with # are skipped."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"{p}: cannot read prompts file ({e.strerror or e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            spec = json.loads(line)
        except ValueError as e:
            raise InputError(f"{p}:{n}: not a JSON object ({e})") from None
        out.append(_prompt_from_spec(spec, tokenizer, bos, f"{p}:{n}"))
    if not out:
        raise InputError(f"{p}: no prompts in the file")
    return out


def load_suite(name_or_path: str) -> Suite:
    """`smoke` -> parity/suites/smoke.yaml; a path -> that YAML."""
    import yaml

    p = Path(name_or_path)
    if not p.is_file():
        p = SUITES_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        avail = sorted(x.stem for x in SUITES_DIR.glob("*.yaml"))
        raise InputError(f"suite '{name_or_path}' not found; give a YAML path or one of: {', '.join(avail)}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{p}: cannot parse suite ({e.__class__.__name__})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("prompts"), list):
        raise InputError(f"{p}: a suite needs a 'prompts:' list")
    known = {"name", "description", "config", "prompts", "greedy_tokens", "layers", "logits", "prefill_chunk"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"{p}: unknown suite key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    opts = {k: raw[k] for k in ("greedy_tokens", "layers", "logits", "prefill_chunk") if k in raw}
    if "layers" in opts:
        opts["layers"] = str(opts["layers"])
    return Suite(raw.get("name", p.stem), raw.get("description", ""), raw.get("config"), opts, raw["prompts"])


def suite_prompts(suite: Suite, tokenizer, bos: int) -> list:
    return [
        _prompt_from_spec(s, tokenizer, bos, f"suite {suite.name}, prompt {i}") for i, s in enumerate(suite.prompts)
    ]


# ---------------------------------------------------------------------------------------- model
@dataclass
class Built:
    model: object
    cfg: object
    runtime: object
    tokenizer: object
    weights: dict  # {"source": "random"|"checkpoint", "seed"|"path", "hash"}
    ranks: object = None  # v4.dist.launch.RankContext of rank 0 when recording across devices (TP / EP / DP)


def config_hash(cfg) -> str:
    """sha256 of the canonical HF config dict (the config's name does not count)."""
    return hashlib.sha256(json.dumps(cfg.to_hf_dict(), sort_keys=True).encode()).hexdigest()


def tensors_hash(tensors: dict) -> str:
    """sha256 over sorted (name, dtype, shape, bytes) of in-memory weights (seeded random weights).
    A checkpoint is hashed by `v4.weights.checkpoint_hash` instead (sampled, cheap), so the same
    values from a checkpoint and from --seed-weights hash differently: that is conservative."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build(checkpoint=None, config=None, runtime_file=None, overrides=None, seed: int = 0) -> Built:
    """`v4.runtime.load`, but keeping the weights' hash for the bundle."""
    import backends
    from v4 import weights
    from v4.model import Transformer
    from v4.runtime import DTYPES, default_checkpoint, random_weights, resolve
    from v4.tokenizer import load_tokenizer

    checkpoint = default_checkpoint(checkpoint, config)  # no model named: the shipped tiny-v4, as the CLI
    cfg, rt = resolve(checkpoint, config, runtime_file, overrides)
    if rt.tensor_parallel_size * rt.data_parallel_size > 1:
        return _build_ranks(checkpoint, config, runtime_file, overrides, seed, cfg, rt)
    ops = backends.get_ops(rt.backend, rt.device, rt.allow_fallback, rt.mode, rt.dtype, rt.backend_options)
    if checkpoint is not None:
        cfg, tensors = weights.load_checkpoint(checkpoint, cfg, progress=False)
        winfo = {"source": "checkpoint", "path": str(checkpoint), "hash": weights.checkpoint_hash(checkpoint)}
    else:
        tensors = random_weights(cfg, seed)
        winfo = {"source": "random", "seed": seed, "hash": tensors_hash(tensors)}
    model = Transformer(cfg, tensors, ops, DTYPES[rt.dtype], rt.mode)
    return Built(model, cfg, rt, load_tokenizer(cfg, checkpoint), winfo)


def _build_ranks(checkpoint, config, runtime_file, overrides, seed, cfg, rt) -> Built:
    """Rank 0 of a multi-device recording (the other ranks are spawned, or started by torchrun).
    The weights' hash is that of the whole model, so the bundle compares with a one-device one."""
    from v4 import weights
    from v4.dist.launch import LoadArgs, start
    from v4.runtime import random_weights

    ctx = start(LoadArgs(checkpoint, config, runtime_file, dict(overrides or {}), seed), rt, progress=False)
    if ctx.rank != 0:
        return Built(None, cfg, rt, None, {}, ctx)
    if checkpoint is not None:
        winfo = {"source": "checkpoint", "path": str(checkpoint), "hash": weights.checkpoint_hash(checkpoint)}
    else:
        winfo = {"source": "random", "seed": seed, "hash": tensors_hash(random_weights(cfg, seed))}
    L = ctx.loaded
    return Built(L.model, L.cfg, rt, L.tokenizer, winfo, ctx)


# ---------------------------------------------------------------------------------------- environment
def device_name(device) -> str:
    dev = torch.device(device)
    try:
        if dev.type == "cuda":
            return torch.cuda.get_device_name(dev)
        if dev.type == "npu" and hasattr(torch, "npu"):  # only when torch_npu was already loaded by the backend
            return torch.npu.get_device_name(dev)
    except Exception:  # noqa: BLE001 - a name is nice to have, never worth a failure
        pass
    if dev.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "cpu"
    return str(dev)


def library_versions() -> dict:
    """Versions from installed distributions' metadata: never imports a kernel stack."""
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__}
    for dist in ("dsv4", "safetensors", "numpy", "triton", "torch-npu", "triton-ascend", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


# ---------------------------------------------------------------------------------------- recording
def _groups(prompts: list, batching: bool) -> list:
    """Prompt indices grouped into packed batches, in order of first appearance."""
    groups, by_key = [], {}
    for i, p in enumerate(prompts):
        if not batching or p.batch is None:
            groups.append([i])
        elif p.batch in by_key:
            by_key[p.batch].append(i)
        else:
            by_key[p.batch] = [i]
            groups.append(by_key[p.batch])
    return groups


def _hook_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.is_floating_point() else torch.int64


@torch.no_grad()
def record(model, prompts: list, opts: Options | None = None, ranks=None) -> tuple[dict, dict]:
    """Run `prompts` (list of Prompt) through `model`. Returns (tensors, info) where tensors use
    the bundle keys (see parity/bundle.py) and info holds the hook order and timings.
    ranks: rank 0's RankContext of a multi-device run: every prompt runs on data-parallel group 0
    (whose logits and hooks this process sees) while the other groups join each step's expert exchange."""
    opts = opts or Options()
    opts.validate()
    cfg = model.cfg
    for i, p in enumerate(prompts):
        if not p.ids:
            raise InputError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in p.ids if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise InputError(
                f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size}) of model '{cfg.name}'"
            )
    keep_layers = opts.layer_set(cfg.num_hidden_layers)
    last_k = None if opts.logits == "all" else int(opts.logits[5:])
    N = opts.greedy_tokens
    tensors: dict = {}
    hook_order: list = []
    per_prompt_hooks = {i: {} for i in range(len(prompts))}
    t_start = time.perf_counter()
    saved_hook = model.hook
    try:
        for group in _groups(prompts, opts.batching):
            _record_group(model, prompts, group, opts, keep_layers, last_k, N, tensors, hook_order, per_prompt_hooks,
                          ranks)
    finally:
        model.hook = saved_hook
    for i, hooks in per_prompt_hooks.items():
        for name in hook_order:
            parts = hooks.get(name)
            tensors[f"prompt.{i}.hook.{name}"] = torch.cat(parts) if parts else torch.zeros(0)
    info = {"hooks": hook_order, "record_s": time.perf_counter() - t_start}
    return tensors, info


def decode_mode(opts: Options, model) -> str:
    """How the greedy continuation decodes (v4.engine.graph_mode). `decode_graphs: on` means "where the
    backend can capture": `parity run` passes one setting to every backend, and each bundle's
    options.decode says how that recording decoded."""
    if opts.decode_graphs == "on" and not getattr(model.ops, "capturable", False):
        return "off"
    return graph_mode(opts.decode_graphs, model)


def _group_engine(model, opts, n_seqs: int, lens: list[int], N: int, ranks):
    """The engine one batch group records with (sized for it; on the ranks' engines when distributed)."""
    # the greedy continuation decodes the way this runtime serves: captured graphs when it would
    graphs = "on" if N > 1 and decode_mode(opts, model) != "off" else "off"
    rt = RuntimeConfig(max_num_seqs=n_seqs, max_num_batched_tokens=sum(lens), max_model_len=max(lens) + N + 2,
                       block_size=opts.block_size, prefill_chunk=opts.prefill_chunk,
                       speculative_config=opts.speculative_config)
    if ranks is None:
        return LLM(model, rt, graphs=graphs, buckets=[n_seqs], logits="all")
    return ranks.engine(rt, logits="all", assign="first")


def _store_group(tensors, group, seqs, wanted, logit_rows, g_ids, g_logits, N: int, vocab_size: int) -> None:
    """A recorded group's per-prompt tensors, under the bundle's names."""
    for r, i in enumerate(group):
        pos = list(wanted[r])
        tensors[f"prompt.{i}.input_ids"] = torch.tensor(seqs[r], dtype=torch.int64)
        tensors[f"prompt.{i}.logit_positions"] = torch.tensor(pos, dtype=torch.int64)
        tensors[f"prompt.{i}.logits"] = torch.stack(logit_rows[r]).to("cpu", torch.float32)
        tensors[f"prompt.{i}.greedy_ids"] = torch.tensor(g_ids[r][:N], dtype=torch.int64)
        tensors[f"prompt.{i}.greedy_logits"] = torch.stack(g_logits[r][:N]) if N else torch.zeros(0, vocab_size)


def _record_group(model, prompts, group, opts, keep_layers, last_k, N, tensors, hook_order, per_prompt_hooks,
                  ranks=None):
    cfg = model.cfg
    seqs = [prompts[i].ids for i in group]
    lens = [len(s) for s in seqs]
    llm = _group_engine(model, opts, len(group), lens, N, ranks)
    # at least one token, so that the prompt is computed when greedy_tokens is 0 (the token is dropped)
    params = SamplingParams(temperature=0.0, max_tokens=max(N, 1), ignore_eos=True)
    rid = {llm.add_request(s, params): r for r, s in enumerate(seqs)}
    running = {i: llm.sequence(i) for i in rid}
    wanted = [range(0, n) if last_k is None else range(max(0, n - last_k), n) for n in lens]
    logit_rows = [[] for _ in group]
    g_ids = [[] for _ in group]
    g_logits = [[] for _ in group]
    step_hooks: list = []

    def hook(name: str, t: torch.Tensor):
        layer = int(name.split(".")[1])
        if layer in keep_layers:
            step_hooks.append((name, t.detach().to("cpu", _hook_dtype(t), copy=True)))

    model.hook = hook if keep_layers else None
    while llm.has_unfinished():
        step_hooks.clear()
        outputs = llm.step()
        rec = llm.last_step
        rows = [rid[i] for i, _, _ in rec.scheduled]
        starts = [s for _, s, _ in rec.scheduled]
        step_lens = [n for _, _, n in rec.scheduled]
        for name, _ in step_hooks:
            if name not in hook_order:
                hook_order.append(name)
        prompt_rows = [j for j, (r, s) in enumerate(zip(rows, starts)) if s < lens[r]]  # decode rows are not kept
        _split_hooks(cfg, step_hooks, rows, starts, step_lens, rec.offsets + [rec.logits.shape[0]], group,
                     per_prompt_hooks, keep=prompt_rows)
        for j, (r, s, n) in enumerate(zip(rows, starts, step_lens)):
            o = rec.offsets[j]
            logit_rows[r] += [rec.logits[o + pos - s] for pos in range(s, min(s + n, lens[r])) if pos in wanted[r]]
        for out in outputs:
            r = rid[out.request_id]
            j = rows.index(r)
            g_ids[r] += out.new_token_ids
            # a verified speculative step emits one token per row from its first verified row on
            first = rec.offsets[j] + step_lens[j] - 1 - rec.drafts[j]
            g_logits[r] += [rec.logits[first + i].to("cpu", torch.float32) for i in range(len(out.new_token_ids))]
        if all(running[i].num_computed >= lens[r] for i, r in rid.items()):
            model.hook = None  # every prompt is in: the greedy continuation records no hooks
    _store_group(tensors, group, seqs, wanted, logit_rows, g_ids, g_logits, N, cfg.vocab_size)


def _split_hooks(cfg, step_hooks, rows, starts, step_lens, offsets, group, per_prompt_hooks, keep=None):
    """Packed hook tensors -> per-prompt pieces of the batch rows in `keep` (default all).
    Token-major tensors split by the batch offsets; compressed entries (emitted per sequence in
    batch order) by the count each sequence emitted: a sequence at start s with n new tokens closes
    (s + n) // m - s // m windows of ratio m."""
    for name, t in step_hooks:
        if name.endswith(".attn.compressed"):
            m = cfg.layer_ratio(int(name.split(".")[1]))
            counts = [(s + n) // m - s // m for s, n in zip(starts, step_lens)]
            if sum(counts) != t.shape[0]:
                raise RecordError(f"{name}: the backend emitted {t.shape[0]} compressed entries but the step closes "
                                  f"{sum(counts)} windows; its compress op is wrong")
            bounds = [0]
            for c in counts:
                bounds.append(bounds[-1] + c)
        else:
            bounds = offsets
        for j in (range(len(rows)) if keep is None else keep):
            per_prompt_hooks[group[rows[j]]].setdefault(name, []).append(t[bounds[j]:bounds[j + 1]])


def record_bundle(built: Built, prompts: list, opts: Options | None = None, suite: str | None = None,
                  prompts_file: str | None = None, out=None):
    """record() + metadata -> a Bundle, written to `out` when given. What `dsv4 parity record`
    runs; tests hand it a Built whose model carries deliberately perturbed ops."""
    from . import bundle

    opts = opts or Options()
    tensors, info = record(built.model, prompts, opts, built.ranks)
    meta = make_meta(built, prompts, opts, info, suite, prompts_file)
    if out is not None:
        return bundle.write(out, tensors, meta)
    return bundle.Bundle("(memory)", meta, tensors)


def _spec_meta(opts: Options) -> dict | None:
    """How the greedy continuation decoded speculatively (None: one token per step)."""
    from v4.config import SpeculativeConfig

    spec = SpeculativeConfig.parse(opts.speculative_config, "parity record")
    return None if spec is None else dataclasses.asdict(spec)


def _device_label(model) -> str:
    name = device_name(model.device)
    if getattr(model.ops, "emulated", False):  # say it wherever the device is named: not a real NPU
        return f"emulated on CPU ({name}; CANN ops emulated, Triton-Ascend kernels interpreted)"
    return name


def make_meta(built: Built, prompts: list, opts: Options, info: dict, suite: str | None = None,
              prompts_file: str | None = None) -> dict:
    """bundle.json content (format fields and the tensor digest are added by bundle.write)."""
    from datetime import datetime, timezone

    m, cfg, rt = built.model, built.cfg, built.runtime
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": cfg.name, "config_hash": config_hash(cfg), "config": cfg.to_hf_dict()},
        "weights": built.weights,
        "backend": {
            "name": m.ops.name,
            "impl": getattr(m.ops, "impl", {}),
            "fallback": list(getattr(m.ops, "fallback", ())),
            "device": str(m.device),
            "device_name": _device_label(m),
            "emulated": bool(getattr(m.ops, "emulated", False)),
        },
        "dtype": rt.dtype,
        "mode": rt.mode,
        "parallel": {
            "tensor_parallel_size": rt.tensor_parallel_size,
            "data_parallel_size": rt.data_parallel_size,
            "enable_expert_parallel": rt.enable_expert_parallel,
            "moe_comm": rt.moe_comm,
        },
        "versions": library_versions(),
        "suite": suite,
        "prompts_file": prompts_file,
        "options": {
            "greedy_tokens": opts.greedy_tokens,
            "layers": opts.layers,
            "logits": opts.logits,
            "prefill_chunk": opts.prefill_chunk,
            "batching": opts.batching,
            "block_size": opts.block_size,
            "decode": DECODE_LABEL[decode_mode(opts, m)],
            "speculative_config": _spec_meta(opts),
        },
        "greedy_tokens": opts.greedy_tokens,
        "prompts": [
            {
                "index": i,
                "tokens": len(p.ids),
                "name": p.name,
                "text": p.text,
                "batch": p.batch if opts.batching else None,
            }
            for i, p in enumerate(prompts)
        ],
        "hooks": info["hooks"],
        "record_s": round(info["record_s"], 3),
    }
