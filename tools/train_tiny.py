"""Train the tiny V4 of issue 14 on the Python standard library's source and write it as an
official-format checkpoint (tooling: the inference package does not import this).

    python tools/train_tiny.py --out v4/embedded/tiny-v4 --steps 1200 --warmup 40 --lr 3e-3 --minutes 45 --log-every 20

(the shipped run: 37 min on 2 CPU cores; the defaults are these values). Every RNG is seeded; a
rerun on another machine, Python or thread count may differ in the last bits (not checked for
bit-exactness). ``--readme-only`` rewrites ``<out>/README.md`` from the run's JSON files.

What it does, in order:

1. Data. Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (PSF licence), sorted by
   relative path, minus ``site-packages`` / ``dist-packages`` / ``test`` / ``tests`` / ``idlelib``
   directories. Every 40th file (index % 40 == 7 in that order) is held out; the rest is training
   text. The Python version and a sha256 over the sorted (relative name, size) list are written
   into the checkpoint's metadata (``training.json`` and every shard's safetensors metadata).
2. Tokenizer. Byte-level BPE (``tokenizers``), 4096 ids, trained on the training split only. Ids
   0..5 are V4's special tokens as added special tokens: BOS, EOS, ``<｜User｜>``,
   ``<｜Assistant｜>``, ``<think>``, ``</think>`` (the strings of v4.tokenizer / v4.chat.encoding).
   Saved as ``tokenizer.json`` + ``tokenizer_config.json`` (bos / eos).
3. Model. ``configs/tiny-v4.yaml``: every V4 feature (window, CSA + indexer, HCA, sinks, mHC, a
   hash-routed layer, sqrt-softplus MoE with shared expert, one MTP block). Initial values are
   ``v4.weights.init_tensor`` (seeded), except the MoE gate biases (zeros).
4. Training. The model is our own ``v4.model.Transformer`` over the reference backend's ops, run
   under autograd on fp32 leaf tensors: each step builds the Transformer on the parameter dict
   (so the per-expert weights are stacked inside the graph), takes a fresh cache and runs one
   prefill of B packed sequences of L tokens; gradients flow through the cache writes (compressed
   entries, window ring) like through any other tensor. Loss = next-token CE + 0.3 x MTP
   next-next-token CE (+ the indexer's KL loss below). AdamW, linear warm-up then cosine decay,
   gradient clipping at 1.0, every RNG seeded. The loss curve goes to stdout and to
   ``<out>/train_log.json``.

   Ops that cannot carry a gradient, and what is done about each:
   - Lightning indexer top-k (integer picks): the main loss reaches the CSA entries the indexer
     picked, never the indexer. The indexer is trained with the KL objective of the DSA paper:
     for every query, KL(p || softmax(I)), where p is the main attention's distribution over all
     visible compressed entries (softmax per head of q.k * scale over those entries, summed over
     heads, renormalised; detached) and I the indexer scores sum_h w_h relu(q^I_h . k^I_s) over
     the same entries. The indexer runs on detached inputs, so the KL loss trains only the
     indexer's own weights (wq_b, weights_proj, its compressor) and the main loss never does.
   - MoE top-k routing (integer expert ids): the selected experts' gate scores are
     differentiable and get gradients; the gate bias only steers selection, so it is trained
     the auxiliary-loss-free way instead: after every step, bias += 1e-3 * sign(mean load - load)
     per expert (DeepSeek-V3's rule).
   - Hash routing (tid2eid): a fixed table (seeded random), not learned, as in V4.
   - mHC's Sinkhorn normalisation: differentiable, but the reference backend computes it in numpy
     on CPU; under autograd it takes its torch path (same arithmetic).
   - Clamps (SwiGLU limit) pass zero gradient where they clip, as in any framework.
5. Export. ``config.json`` (``ModelConfig.to_hf_dict``, official quantization_config), the
   tokenizer files, one safetensors shard + ``model.safetensors.index.json``; FP8 e4m3 + UE8M0
   128x128 block scales for the linears, FP4 e2m1 + UE8M0 per-32 scales for the routed experts,
   other floats BF16 / F32 exactly as ``v4.weights.init_checkpoint(quant="fp8")`` writes them
   (the same encoders, ``v4.weights._stored_form`` / ``_encode``).
6. Evaluation, through ``v4.weights.load_checkpoint`` and our forward (not the training copy):
   held-out bits per byte vs a unigram baseline (training-split counts, add-one smoothed, same
   tokenizer), MTP next-next-token accuracy, greedy continuations of 3 held-out prompts. Written
   to ``<out>/eval.json`` and ``<out>/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from backends.reference import ops as ref_ops  # noqa: E402
from v4 import weights as W  # noqa: E402
from v4.batch import StepBatch  # noqa: E402
from v4.chat.encoding import ASSISTANT, THINK_END, THINK_START, USER  # noqa: E402
from v4.config import CSA, ModelConfig, load_config_file  # noqa: E402
from v4.model import Transformer  # noqa: E402
from v4.tokenizer import BOS_TEXT, EOS_TEXT  # noqa: E402

SPECIALS = [BOS_TEXT, EOS_TEXT, USER, ASSISTANT, THINK_START, THINK_END]  # ids 0..5
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
HELDOUT_EVERY, HELDOUT_AT = 40, 7
MTP_WEIGHT = 0.3
KL_WEIGHT = 1.0
BIAS_RATE = 1e-3
HELDOUT_PROMPTS = 3
SAMPLE_BYTES = 6000  # per held-out file in the shipped sample (the test's fixed held-out text)
SAMPLE_FILES = 3


# ------------------------------------------------------------------------------------- data
def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not (set(f.relative_to(root).parts[:-1]) & EXCLUDED_DIRS)]
    return root, sorted(files, key=lambda f: f.relative_to(root).as_posix())


def split_files(root: Path, files: list[Path]):
    train, held = [], []
    for i, f in enumerate(files):
        (held if i % HELDOUT_EVERY == HELDOUT_AT else train).append(f)
    listing = "".join(f"{f.relative_to(root).as_posix()}\t{f.stat().st_size}\n" for f in files)
    return train, held, hashlib.sha256(listing.encode()).hexdigest()


def read(f: Path) -> str:
    return f.read_text(encoding="utf-8", errors="replace")


# ------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def token_bytes(tok, vocab: int) -> torch.Tensor:
    """UTF-8 bytes each id stands for (byte-level BPE: one alphabet character per byte; specials 0)."""
    n = torch.zeros(vocab, dtype=torch.float64)
    for i in range(len(SPECIALS), tok.get_vocab_size()):
        n[i] = len(tok.id_to_token(i))
    return n


def encode_docs(tok, texts: list[str], bos: int, eos: int) -> list[list[int]]:
    return [[bos] + e.ids + [eos] for e in tok.encode_batch(texts, add_special_tokens=False)]


# ------------------------------------------------------------------------------------- model
class TrainTransformer(Transformer):
    """Our Transformer with the lightning indexer trained by the KL objective (module docstring).

    `_indexer` does what the inference one does (same ops, same picks) on detached inputs, and also
    keeps the differentiable scores of every visible entry; when the layer's main compressed entries
    are recorded (after the indexer, in `_attention`), the KL against the main attention is added
    to `self.kl`."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.kl = []
        self.route_counts = {}
        self._q, self._iscores = {}, {}
        self.hook = self._on_record

    def _on_record(self, name, t):
        layer, _, what = name.partition(".attn.")
        if what == "q":
            self._q[layer] = t.detach()
        elif what == "compressed" and layer in self._iscores:
            self.kl.append(self._kl(layer, t.detach()))
        elif name.endswith(".ffn.route_ids"):
            self.route_counts[name] = torch.bincount(t.reshape(-1).long(), minlength=self.cfg.n_routed_experts)

    def _indexer(self, b, x, c_q, layout, cache):
        ops, cfg = self.ops, self.cfg
        x, c_q = x.detach(), c_q.detach()
        T, Hi, Di = x.shape[0], cfg.index_n_heads, cfg.index_head_dim
        batch = layout.batch
        lc, inv_freq = cache.layers[b.layer], self.inv_freq["compress"]
        iq = ops.rope(self._lin(c_q, b.idx.wq_b, True).view(T, Hi, Di), batch.positions, inv_freq)
        table = layout.tables[b.ratio]
        self._compress(b.idx, x, batch, lc.index_pool, lc.index_state_kv, lc.index_state_score, table, inv_freq,
                       (b.layer, "index"))
        w = self._lin(x.to(self.acc), b.idx.weights_proj, False) * (Di ** -0.5 * Hi ** -0.5)
        with torch.no_grad():
            topk = ops.indexer_topk(iq, w, lc.index_pool, table.table, batch.tok_slot, batch.positions, b.ratio,
                                    cfg.index_topk, max_visible=layout.max_visible[b.ratio])
        S = layout.max_visible[b.ratio]
        if S:
            ent = torch.arange(S).expand(T, S)
            nvis = (batch.positions + 1) // b.ratio
            rows = layout.entry_rows(torch.where(ent < nvis[:, None], ent, -1), b.ratio).long()  # [T, S]
            keys = lc.index_pool.view(-1, Di)[rows.clamp(min=0)]  # [T, S, Di]
            s = (torch.relu(torch.einsum("thd,tsd->ths", iq, keys)) * w.unsqueeze(-1)).sum(1)  # [T, S]
            self._iscores[b.name] = (s, ent < nvis[:, None], rows)
        return topk

    def _kl(self, layer, entries):
        s, vis, rows = self._iscores.pop(layer)
        q = self._q[layer]  # [T, H, D]
        pool = self._pools[layer]  # the main compressed entries (`entries` just written), same rows as the indexer's
        keys = pool.view(-1, q.shape[-1])[rows.clamp(min=0)].detach()  # [T, S, D]
        logits = torch.einsum("thd,tsd->ths", q, keys) * q.shape[-1] ** -0.5
        logits = logits.masked_fill(~vis[:, None, :], float("-inf"))
        has = vis.any(1)
        p = torch.softmax(logits[has], -1).sum(1)
        p = p / p.sum(-1, keepdim=True)  # [T', S]
        logq = torch.log_softmax(s[has].masked_fill(~vis[has], float("-inf")), -1)
        kl = (p * (torch.log(p.clamp_min(1e-12)) - logq.masked_fill(~vis[has], 0.0))).sum(-1)
        return kl.mean()

    def forward(self, ids, batch, cache, logits="all", mtp_ids=None):
        # the CSA layers' main pools, read by _kl once the layer's entries are written
        self._pools = {b.name: cache.layers[b.layer].pool for b in self.blocks + self.mtp if b.kind == CSA}
        self.kl, self.route_counts = [], {}
        return super().forward(ids, batch, cache, logits, mtp_ids)


def trainable(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    params = {}
    for name, spec in W.expected_tensors(cfg).items():
        t = W.init_tensor(name, spec, cfg, seed)
        if name.endswith("gate.bias"):
            t = torch.zeros_like(t)  # steered by the load-balancing rule, not by gradients
        if spec.role != "index" and not name.endswith("gate.bias"):
            t.requires_grad_(True)
        params[name] = t
    return params


def step_loss(cfg, params, ops, windows: torch.Tensor):
    """windows [B, L + 2] -> (main CE, MTP CE, indexer KL, route counts)."""
    B, L2 = windows.shape
    L = L2 - 2
    model = TrainTransformer(cfg, dict(params), ops)
    cache = model.new_cache(B, L)
    slots = [cache.alloc() for _ in range(B)]
    batch = StepBatch(slots, [0] * B, [L] * B, ops.device)
    cache.reserve_step(batch)
    x, y, y2 = windows[:, :L], windows[:, 1:L + 1], windows[:, 2:]
    logits, mtp = model.forward(x.reshape(-1), batch, cache, "all", y.reshape(-1))
    ce = F.cross_entropy(logits, y.reshape(-1))
    mce = F.cross_entropy(mtp, y2.reshape(-1))
    kl = torch.stack(model.kl).mean() if model.kl else logits.new_zeros(())
    return ce, mce, kl, model.route_counts


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ------------------------------------------------------------------------------------- export
def export(cfg: ModelConfig, params: dict, out: Path, metadata: dict) -> int:
    """The official layout, written with v4.weights' own encoders (as init_checkpoint(quant="fp8"))."""
    import dataclasses

    from safetensors.torch import save_file

    specs = W.expected_tensors(cfg)
    cfg_out = dataclasses.replace(cfg, quantization_config=dict(W.OFFICIAL_QUANT_CONFIG), expert_dtype="fp4")
    fname = "model-00001-of-00001.safetensors"
    tensors = {}
    for name, spec in specs.items():
        value = params[name].detach().contiguous()
        for sname, t in W._encode(name, value, W._stored_form(spec, "fp8")):
            tensors[sname] = t.contiguous()
    for old in out.glob("*.safetensors"):
        old.unlink()
    save_file(
        tensors, str(out / fname), metadata={"format": "pt", "dsv4_training": json.dumps(metadata, sort_keys=True)}
    )
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / W.INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": {k: fname for k in sorted(tensors)}}, indent=2)
        + "\n"
    )
    (out / W.CONFIG_FILE).write_text(json.dumps(cfg_out.to_hf_dict(), indent=2) + "\n")
    return total


# ------------------------------------------------------------------------------------- evaluation
def eval_checkpoint(out: Path, docs: list[list[int]], unigram_logp: torch.Tensor, nbytes: torch.Tensor, chunk: int):
    """Held-out CE (nats/token), bits per byte, unigram ones on the same tokens, MTP accuracy:
    through load_checkpoint + our forward. Each document is cut into chunks of `chunk` tokens
    (each chunk from a fresh cache); every token but a chunk's first is predicted."""
    from v4.weights import load_checkpoint

    cfg, wts = load_checkpoint(out, progress=False)
    model = Transformer(cfg, wts, ref_ops.ReferenceOps())
    nll = uni = byt = 0.0
    n = mtp_ok = mtp_n = 0
    for d in docs:
        for s in range(0, len(d) - 1, chunk):
            ids = torch.tensor(d[s:s + chunk + 1])
            if ids.numel() < 3:
                continue
            inp, tgt = ids[:-1], ids[1:]
            logits, mtp = model.logits(inp, tgt)
            nll += F.cross_entropy(logits, tgt, reduction="sum").item()
            uni -= unigram_logp[tgt].sum().item()
            byt += nbytes[tgt].sum().item()
            n += tgt.numel()
            mtp_ok += (mtp[:-1].argmax(-1) == tgt[1:]).sum().item()
            mtp_n += tgt.numel() - 1
    return {
        "tokens": n, "bytes": int(byt),
        "ce_nats_per_token": nll / n, "unigram_ce_nats_per_token": uni / n,
        "bits_per_byte": nll / math.log(2) / byt, "unigram_bits_per_byte": uni / math.log(2) / byt,
        "mtp_next_next_token_accuracy": mtp_ok / mtp_n, "mtp_tokens": mtp_n,
    }, model, cfg


def greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        nxt = int(model.logits(torch.tensor(out))[-1].argmax())
        if nxt == 1:
            break
        out.append(nxt)
    return out[len(ids):]


# ------------------------------------------------------------------------------------- README
def _readme_intro(meta: dict, ev: dict) -> list[str]:
    """README.md: what tiny-v4 is and how it was made."""
    return [
        "# tiny-v4: a trained tiny DeepSeek V4 (issue 14)",
        "",
        f"A {ev['parameters'] / 1e6:.2f} M-parameter V4 with every feature (sliding window, CSA with the lightning "
        "indexer, HCA, attention sinks, mHC, a hash-routed layer, sqrt-softplus MoE with a shared expert, one MTP "
        "block), trained on the Python standard library's source, stored in the official checkpoint layout: "
        "`config.json`, `tokenizer.json`, `tokenizer_config.json`, one safetensors shard with "
        "`model.safetensors.index.json`; linears FP8 e4m3 with UE8M0 128x128 block scales, routed experts FP4 e2m1 "
        f"with UE8M0 per-32 scales ({ev['checkpoint_bytes'] / 1e6:.2f} MB of tensors). It loads through "
        "`v4.weights.load_checkpoint` like any official checkpoint:",
        "",
        "```",
        "python -m v4 generate --checkpoint v4/embedded/tiny-v4 --prompt \"def main(\" --max-new-tokens 40",
        "```",
        "",
        "It was made, from a repository checkout, by:",
        "",
        "```",
        f"{meta['command']}",
        "```",
        "",
        f"Trained in {meta['train_seconds'] / 60:.1f} min ({meta['steps_run']} of {meta['steps']} steps"
        f"{', stopped early by --minutes' if meta['stopped_early'] else ''}) on {meta['threads']} CPU threads, torch "
        f"{meta['torch']}, Python {meta['python_version']}; batch {meta['batch']} x {meta['seq_len']} tokens, AdamW "
        f"(peak lr {meta['lr']}, {meta['warmup']} warm-up steps, cosine to 10%), seed {meta['seed']}. "
        "Loss = next-token CE "
        f"+ {meta['mtp_weight']} x MTP next-next-token CE + indexer KL (see `tools/train_tiny.py` for how each "
        "non-differentiable op is handled). The whole curve is in `train_log.json`, the run's metadata "
        "(Python version, stdlib file-list sha256, held-out file list) in `training.json` and in the shard's "
        "safetensors metadata.",
        "",
    ]


def _readme_data(meta: dict) -> list[str]:
    """README.md: the data section."""
    return [
        "## Data",
        "",
        f"{meta['data']}: {meta['stdlib_file_count']} files of Python {meta['python_version']}'s stdlib "
        f"(directories {', '.join(meta['excluded_dirs'])} left out), sorted by path; file-list sha256 "
        f"`{meta['stdlib_file_list_sha256']}` ({meta['file_list_hash_of']}). Held out: {meta['heldout_rule']} "
        f"({len(meta['heldout_files'])} files, listed in `training.json`). Another Python version has other files: "
        "the hash says whether a rerun sees the same data. The beginnings of 3 held-out files "
        "(`../tiny-v4-heldout/sample.json`, PSF licence beside it) are the fixed input of "
        "`tests/core/test_embedded_model.py`.",
        "",
    ]


def _readme_curve(log: list[dict]) -> list[str]:
    """README.md: the loss curve section."""

    def avg(recs, k):
        return sum(r[k] for r in recs) / len(recs)

    n = max(1, len(log) // 10)
    rows = [
        f"| {r['step']} | {r['lr']:.2e} | {r['ce']:.3f} | {r['mtp_ce']:.3f} | {r['indexer_kl']:.3f} | "
        f"{r['elapsed_s']:.0f} |"
        for r in log[::n] + ([log[-1]] if (len(log) - 1) % n else [])
    ]
    return [
        "## Loss curve (training batches)",
        "",
        "| step | lr | CE | MTP CE | indexer KL | s |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"First 10 steps: CE {avg(log[:10], 'ce'):.3f}, MTP CE {avg(log[:10], 'mtp_ce'):.3f}; last 10 steps: CE "
        f"{avg(log[-10:], 'ce'):.3f}, MTP CE {avg(log[-10:], 'mtp_ce'):.3f} (nats/token).",
        "",
    ]


def _readme_quality(h: dict, s: dict) -> list[str]:
    """README.md: the held-out quality section."""
    return [
        "## Held-out quality (through `load_checkpoint` and our forward, FP8/FP4 weights as stored)",
        "",
        f"Every held-out file, cut into chunks of 256 tokens, each from a fresh cache: {h['tokens']} predicted "
        f"tokens, {h['bytes']} bytes.",
        "",
        "| | CE (nats/token) | bits per byte |",
        "|---|---|---|",
        f"| tiny-v4 | {h['ce_nats_per_token']:.3f} | {h['bits_per_byte']:.3f} |",
        f"| unigram (training-split counts, add-one) | {h['unigram_ce_nats_per_token']:.3f} | "
        f"{h['unigram_bits_per_byte']:.3f} |",
        "",
        f"MTP next-next-token accuracy (greedy pick of the MTP head = the token two ahead): "
        f"{h['mtp_next_next_token_accuracy']:.3f} over {h['mtp_tokens']} positions.",
        "",
        f"The test's sample ({s['tokens']} tokens): CE {s['ce_nats_per_token']:.3f} vs unigram "
        f"{s['unigram_ce_nats_per_token']:.3f} nats/token.",
        "",
        "## Greedy continuations of held-out prompts (48 tokens at most)",
        "",
    ]


def write_readme(out: Path) -> None:
    """<out>/README.md from training.json, train_log.json and eval.json (all written by main)."""
    meta = json.loads((out / "training.json").read_text())
    log = json.loads((out / "train_log.json").read_text())
    ev = json.loads((out / "eval.json").read_text())
    h, s = ev["heldout"], ev["sample"]

    lines = [*_readme_intro(meta, ev), *_readme_data(meta), *_readme_curve(log), *_readme_quality(h, s)]
    for g in ev["greedy"]:
        lines += [
            f"`{g['file']}`, prompt then continuation:",
            "",
            "```python",
            g["prompt"] + g["continuation"],
            "```",
            "",
        ]
    (out / "README.md").write_text("\n".join(lines))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(ROOT / "v4" / "embedded" / "tiny-v4"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-v4.yaml"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1200, help="optimizer steps (the cosine schedule spans them)")
    ap.add_argument(
        "--minutes", type=float, default=45.0, help="wall-clock cap on training: stops early (and says so) past it"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-chunk", type=int, default=256)
    ap.add_argument("--heldout-sample-out", default=str(ROOT / "v4" / "embedded" / "tiny-v4-heldout"),
                    help="where the small held-out text sample (the test's fixed input) and its licence go")
    ap.add_argument(
        "--readme-only", action="store_true", help="only (re)write <out>/README.md from the run's JSON files"
    )
    return ap


def _train(a, cfg, params: dict, ops, opt, train_p: list, stream: torch.Tensor):
    """The optimizer steps (until --steps or the --minutes cap): (log records, start time, stopped early?)."""
    gen = torch.Generator().manual_seed(a.seed)
    L2 = a.seq_len + 2
    log, t0, stopped_early = [], time.time(), False
    for step in range(a.steps):
        if time.time() - t0 > a.minutes * 60:
            stopped_early = True
            print(f"stopping at step {step}: the --minutes {a.minutes} cap", flush=True)
            break
        lr = lr_at(step, a.steps, a.lr, a.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, stream.numel() - L2, (a.batch,), generator=gen)
        windows = torch.stack([stream[s:s + L2] for s in starts.tolist()])
        ce, mce, kl, routes = step_loss(cfg, params, ops, windows)
        loss = ce + MTP_WEIGHT * mce + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(train_p, 1.0).item()
        opt.step()
        with torch.no_grad():  # auxiliary-loss-free balancing of the top-k routed layers
            for name, c in routes.items():
                bias = name.replace(".ffn.route_ids", ".ffn.gate.bias")
                if bias in params:
                    c = c.double()
                    params[bias] += BIAS_RATE * torch.sign(c.mean() - c).float()
        rec = {"step": step + 1, "lr": lr, "loss": loss.item(), "ce": ce.item(), "mtp_ce": mce.item(),
               "indexer_kl": kl.item(), "grad_norm": gnorm, "elapsed_s": round(time.time() - t0, 1)}
        log.append(rec)
        if step % a.log_every == 0 or step == a.steps - 1:
            print(f"step {step + 1:5d}/{a.steps}  lr {lr:.2e}  ce {rec['ce']:.3f}  mtp {rec['mtp_ce']:.3f}  "
                  f"kl {rec['indexer_kl']:.3f}  |g| {gnorm:.2f}  {rec['elapsed_s']:.0f}s", flush=True)
    return log, t0, stopped_early


def _training_meta(a, argv, root: Path, files: list[Path], held_f: list[Path], list_hash: str, log: list,
                   train_s: float, stopped_early: bool) -> dict:
    meta = {
        "data": "Python standard library *.py (PSF licence)",
        "python_version": platform.python_version(),
        "stdlib_file_count": len(files),
        "stdlib_file_list_sha256": list_hash,
        "file_list_hash_of": "sha256 over '<relative path>\\t<size>\\n' lines, sorted by path",
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "heldout_rule": f"index % {HELDOUT_EVERY} == {HELDOUT_AT} in that order",
        "heldout_files": [f.relative_to(root).as_posix() for f in held_f],
        "seed": a.seed,
        "steps_run": len(log),
        "steps": a.steps,
        "batch": a.batch,
        "seq_len": a.seq_len,
        "lr": a.lr,
        "warmup": a.warmup,
        "weight_decay": a.weight_decay,
        "mtp_weight": MTP_WEIGHT,
        "indexer": "KL objective against the main attention (detached inputs)",
        "kl_weight": KL_WEIGHT,
        "gate_bias": f"aux-loss-free balancing, rate {BIAS_RATE}",
        "train_seconds": round(train_s, 1),
        "stopped_early": stopped_early,
        "torch": torch.__version__,
        "threads": a.threads,
        "command": "python tools/train_tiny.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    return meta


def _write_heldout_sample(sample_dir: Path, root: Path, held_f: list[Path]):
    """The held-out sample the test reads, and the PSF licence beside it: (files picked, {path: text})."""
    sample_dir.mkdir(parents=True, exist_ok=True)
    lic = root / "LICENSE.txt"
    picks = held_f[:: max(1, len(held_f) // SAMPLE_FILES)][:SAMPLE_FILES]
    sample = {f.relative_to(root).as_posix(): read(f)[:SAMPLE_BYTES] for f in picks}
    (sample_dir / "sample.json").write_text(
        json.dumps(
            {
                "python_version": platform.python_version(),
                "note": f"first {SAMPLE_BYTES} characters of held-out stdlib files",
                "files": sample,
            },
            indent=1,
        )
        + "\n"
    )
    if lic.is_file():
        (sample_dir / "LICENSE-PSF.txt").write_text(
            "The text in sample.json is taken from the Python standard library's source "
            f"(Python {platform.python_version()}), distributed under the PSF licence below.\n\n" + read(lic))
    return picks, sample


def _greedy_prompts(model, tok, bos: int, root: Path, picks: list[Path]) -> list[dict]:
    prompts = []
    for f in picks:
        text = read(f)
        cut = text.find("\ndef ")
        cut = cut + 1 if cut >= 0 else 0
        p = text[cut:cut + 60]
        pid = [bos] + tok.encode(p, add_special_tokens=False).ids
        cont = tok.decode(greedy(model, pid, 48))
        prompts.append({"file": f.relative_to(root).as_posix(), "prompt": p, "continuation": cont})
    return prompts


def _print_eval(res: dict, sres: dict, prompts: list[dict]) -> None:
    h = res["heldout"]
    print(
        f"held-out: {h['tokens']} tokens, {h['bytes']} bytes; CE {h['ce_nats_per_token']:.3f} nats/token "
        f"({h['bits_per_byte']:.3f} bits/byte) vs unigram {h['unigram_ce_nats_per_token']:.3f} "
        f"({h['unigram_bits_per_byte']:.3f} bits/byte); MTP next-next-token accuracy "
        f"{h['mtp_next_next_token_accuracy']:.3f}"
    )
    print(
        f"sample (the test's input): CE {sres['ce_nats_per_token']:.3f} vs unigram "
        f"{sres['unigram_ce_nats_per_token']:.3f}"
    )
    for p in prompts:
        print(f"--- {p['file']}\n{p['prompt']}|{p['continuation']}")


def _prepare_data(cfg, out: Path):
    """The stdlib split, the tokenizer (saved in out) and the encoded data: (root, files, held-out files,
    file-list hash, tokenizer, held-out docs, training stream, bytes per token, unigram log-probs)."""
    root, files = stdlib_files()
    train_f, held_f, list_hash = split_files(root, files)
    train_texts, held_texts = [read(f) for f in train_f], [read(f) for f in held_f]
    print(
        f"data: {len(files)} stdlib files ({sum(map(len, train_texts)) / 1e6:.1f} M chars train, "
        f"{len(held_f)} held out, {sum(map(len, held_texts)) / 1e6:.2f} M chars), list sha256 {list_hash[:16]}",
        flush=True,
    )

    tok = train_tokenizer(train_texts, cfg.vocab_size)
    assert tok.get_vocab_size() <= cfg.vocab_size, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TEXT, "eos_token": EOS_TEXT,
        "add_bos_token": True, "add_eos_token": False, "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": False}, indent=2, ensure_ascii=False) + "\n")
    train_docs = encode_docs(tok, train_texts, cfg.bos_token_id, cfg.eos_token_id)
    held_docs = encode_docs(tok, held_texts, cfg.bos_token_id, cfg.eos_token_id)
    stream = torch.tensor([i for d in train_docs for i in d], dtype=torch.long)
    nbytes = token_bytes(tok, cfg.vocab_size)
    counts = torch.bincount(stream, minlength=cfg.vocab_size).double() + 1.0  # add-one smoothing
    unigram_logp = (counts / counts.sum()).log()
    print(f"tokenizer: {tok.get_vocab_size()} ids; train stream {stream.numel()} tokens "
          f"({nbytes[stream].sum().item() / stream.numel():.2f} bytes/token)", flush=True)
    return root, files, held_f, list_hash, tok, held_docs, stream, nbytes, unigram_logp


def _optimizer(a, params: dict):
    """AdamW over the gradient-trained parameters (weight decay on matrices): (those parameters, optimizer)."""
    train_p = [p for p in params.values() if p.requires_grad]
    decay = [p for p in train_p if p.dim() == 2]
    no_decay = [p for p in train_p if p.dim() != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    return train_p, opt


# ------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.readme_only:
        write_readme(Path(a.out))
        return 0
    torch.set_num_threads(a.threads)
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    t_start = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    cfg, _ = load_config_file(a.config)
    cfg.name = "tiny-v4"
    root, files, held_f, list_hash, tok, held_docs, stream, nbytes, unigram_logp = _prepare_data(cfg, out)

    # ---- training ------------------------------------------------------------------------------
    ops = ref_ops.ReferenceOps()
    params = trainable(cfg, a.seed)
    train_p, opt = _optimizer(a, params)
    n_params = sum(p.numel() for p in params.values() if p.is_floating_point())
    print(
        f"model: {n_params / 1e6:.2f} M parameters ({sum(p.numel() for p in train_p) / 1e6:.2f} M trained by gradient)",
        flush=True,
    )
    log, t0, stopped_early = _train(a, cfg, params, ops, opt, train_p, stream)
    train_s = time.time() - t0

    # ---- export --------------------------------------------------------------------------------
    meta = _training_meta(a, argv, root, files, held_f, list_hash, log, train_s, stopped_early)
    size = export(cfg, params, out, meta)
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "train_log.json").write_text(json.dumps(log) + "\n")
    print(f"wrote {out}: {size / 1e6:.2f} MB of tensors", flush=True)

    # ---- the held-out sample the test reads -----------------------------------------------------
    picks, sample = _write_heldout_sample(Path(a.heldout_sample_out), root, held_f)

    # ---- evaluation through the loader --------------------------------------------------------
    res, model, lcfg = eval_checkpoint(out, held_docs, unigram_logp, nbytes, a.eval_chunk)
    sample_docs = encode_docs(tok, list(sample.values()), cfg.bos_token_id, cfg.eos_token_id)
    sres, _, _ = eval_checkpoint(out, sample_docs, unigram_logp, nbytes, a.eval_chunk)
    prompts = _greedy_prompts(model, tok, cfg.bos_token_id, root, picks)
    res = {"heldout": res, "sample": sres, "greedy": prompts, "train_seconds": round(train_s, 1),
           "total_seconds": round(time.time() - t_start, 1), "parameters": n_params, "checkpoint_bytes": size,
           "first_logged": log[0] if log else None, "last_logged": log[-1] if log else None}
    (out / "eval.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    _print_eval(res, sres, prompts)
    write_readme(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
