"""Our reference backend against transformers' DeepseekV4ForCausalLM (an independent implementation).

transformers builds and randomises the model and writes the checkpoint; our loader reads it.
Plain mode, fp32: logits at every position must agree to 1e-4 relative.
"""

import pytest
import torch

import backends
from tests.conftest import rel_err, run_step
from tests.hf_oracle import build
from v4.model import Transformer
from v4.weights import load_checkpoint

LENGTHS = [1, 3, 4, 5, 16, 17, 64, 130]


@pytest.fixture(scope="module")
def pair(tiny_cfg, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tiny")
    hf = build(tiny_cfg, d, seed=1)
    cfg, w = load_checkpoint(d, progress=False)
    ours = Transformer(cfg, w, backends.get_ops("reference"), torch.float32, "plain")
    return hf, ours


@pytest.mark.parametrize("S", LENGTHS)
def test_logits_every_position_match_transformers(pair, S):
    hf, ours = pair
    ids = torch.randint(0, ours.cfg.vocab_size, (S,), generator=torch.Generator().manual_seed(S))
    with torch.no_grad():
        ref = hf(ids[None], use_cache=False).logits[0]
    got = ours.logits(ids)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-4


def test_mixed_batch_matches_transformers(pair):
    """A packed batch of different lengths: each sequence's logits equal transformers' on it alone."""
    hf, ours = pair
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, ours.cfg.vocab_size, (n,), generator=g) for n in (5, 129, 1, 40)]
    cache = ours.new_cache(len(seqs), 160)
    slots = [cache.alloc() for _ in seqs]
    got, _ = run_step(ours, torch.cat(seqs), cache, slots, [0] * 4, [len(s) for s in seqs])
    off = 0
    for s in seqs:
        with torch.no_grad():
            ref = hf(s[None], use_cache=False).logits[0]
        assert rel_err(got[off:off + len(s)], ref) < 1e-4
        off += len(s)


def test_checkpoint_without_mtp_loads_as_main_stack(pair, tiny_cfg):
    _, ours = pair
    assert ours.cfg.num_nextn_predict_layers == 0 and ours.mtp == []
    assert ours.cfg.layer_types == tiny_cfg.layer_types
