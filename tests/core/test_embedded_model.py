"""The shipped trained tiny V4 (v4/embedded/tiny-v4, made by tools/train_tiny.py; issue 14).

It loads through `load_checkpoint` like any official checkpoint, its weights are stored in the
official FP8 / FP4 forms, and through our forward its cross-entropy on a fixed held-out sample
(text the training never saw) is well below the unigram baseline: random or broken weights fail.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import v4
from backends.reference.ops import ReferenceOps
from v4.dist.shard import SKIP
from v4.model import Transformer
from v4.tokenizer import BOS_TEXT, EOS_TEXT, HFTokenizer, load_tokenizer
from v4.weights import INDEX_FILE, expected_tensors, load_checkpoint, scale_name

EMBEDDED = Path(v4.__file__).resolve().parent / "embedded"
CKPT = EMBEDDED / "tiny-v4"
SAMPLE = EMBEDDED / "tiny-v4-heldout" / "sample.json"
CHUNK = 256  # as tools/train_tiny.py evaluates: chunks of 256 predicted tokens, each from a fresh cache

# Measured by tools/train_tiny.py on the sample at training time (v4/embedded/tiny-v4/eval.json,
# "sample"), nats/token: the trained model, and the unigram baseline (training-split counts, add-one).
# A random-weight checkpoint of the same config scores about 8.9 here.
MEASURED_CE = 2.078391258654583
UNIGRAM_CE = 6.510280864645937


def sample_ce(ckpt: Path) -> tuple[float, int]:
    """Mean next-token CE (nats) of the checkpoint on the held-out sample, through load_checkpoint
    and our forward; each text is BOS + tokens + EOS, cut into chunks of CHUNK predicted tokens."""
    cfg, weights = load_checkpoint(ckpt, progress=False)
    model = Transformer(cfg, weights, ReferenceOps())
    tok = load_tokenizer(cfg, ckpt)
    texts = json.loads(SAMPLE.read_text())["files"].values()
    nll, n = 0.0, 0
    for text in texts:
        ids = tok.encode(text, add_bos=True) + [cfg.eos_token_id]
        for s in range(0, len(ids) - 1, CHUNK):
            chunk = torch.tensor(ids[s:s + CHUNK + 1])
            if chunk.numel() < 3:
                continue
            logits = model.logits(chunk[:-1])
            nll += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
            n += chunk.numel() - 1
    return nll / n, n


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_official_layout_and_tokenizer():
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", INDEX_FILE):
        assert (CKPT / f).is_file(), f
    cfg, _ = load_checkpoint(CKPT, progress=False, select=lambda name: SKIP)  # headers only
    tok = load_tokenizer(cfg, CKPT)
    assert isinstance(tok, HFTokenizer)
    assert tok.tok.token_to_id(BOS_TEXT) == cfg.bos_token_id and tok.tok.token_to_id(EOS_TEXT) == cfg.eos_token_id
    tcfg = json.loads((CKPT / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"]) == (BOS_TEXT, EOS_TEXT)
    for s in ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"):
        assert tok.tok.token_to_id(s) is not None, s
    assert sum(p.stat().st_size for p in CKPT.iterdir()) < 20_000_000


def test_weights_stored_fp8_and_fp4():
    cfg = load_checkpoint(CKPT, progress=False, select=lambda name: SKIP)[0]
    index = json.loads((CKPT / INDEX_FILE).read_text())["weight_map"]
    headers = {f: _header(CKPT / f) for f in set(index.values())}
    stored = {k: v for h in headers.values() for k, v in h.items() if k != "__metadata__"}
    assert set(stored) == set(index)
    fp8 = fp4 = 0
    for name, spec in expected_tensors(cfg).items():
        if spec.role == "fp8able":
            assert stored[name]["dtype"] == "F8_E4M3", name
            assert stored[scale_name(name)]["dtype"] == "F8_E8M0", name
            assert stored[scale_name(name)]["shape"] == [math.ceil(s / 128) for s in spec.shape], name
            fp8 += 1
        elif spec.role == "expert":
            assert stored[name]["dtype"] == "I8" and stored[name]["shape"] == [spec.shape[0], spec.shape[1] // 2], name
            assert stored[scale_name(name)]["dtype"] == "F8_E8M0", name
            assert stored[scale_name(name)]["shape"] == [spec.shape[0], spec.shape[1] // 32], name
            fp4 += 1
    assert fp8 > 0 and fp4 > 0
    meta = json.loads(next(iter(headers.values()))["__metadata__"]["dsv4_training"])
    assert meta["python_version"] and len(meta["stdlib_file_list_sha256"]) == 64


def test_heldout_cross_entropy_well_below_unigram():
    ev = json.loads((CKPT / "eval.json").read_text())["sample"]
    measured, unigram = ev["ce_nats_per_token"], ev["unigram_ce_nats_per_token"]
    assert (measured, unigram) == pytest.approx((MEASURED_CE, UNIGRAM_CE), abs=1e-6)
    ce, n = sample_ce(CKPT)
    assert n == ev["tokens"]
    gap = unigram - measured
    assert gap > 1.0, "the shipped model is not much better than a unigram model"
    assert ce < unigram - 0.5 * gap, (
        f"held-out CE {ce:.3f} nats/token; unigram {unigram:.3f}, measured at training {measured:.3f}"
    )
    assert ce == pytest.approx(measured, abs=0.05)
