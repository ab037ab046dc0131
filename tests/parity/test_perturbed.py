"""Deliberately broken backends are caught, and the report names the layer and hook point where
agreement first breaks; clean low-precision runs pass their profiles.

The broken backends are the reference ops with one fault each, built into a Transformer and
recorded through `parity.record.record_bundle`, the code path `dsv4 parity record` runs.
"""

import dataclasses

import pytest
import torch

from backends.reference.ops import ReferenceOps
from parity import record as R
from parity.compare import compare
from v4.model import Transformer
from v4.runtime import random_weights

SEED = 0


@pytest.fixture(scope="module")
def smoke():
    """(prompts, options) of the smoke suite."""
    suite = R.load_suite("smoke")
    built = _built()
    return R.suite_prompts(suite, built.tokenizer, built.cfg.bos_token_id), R.Options(**suite.options)


def _built(dtype="float32", mode="plain"):
    return R.build(None, "tiny", None, {"backend": "reference", "dtype": dtype, "mode": mode}, seed=SEED)


@pytest.fixture(scope="module")
def fp64(smoke):
    return R.record_bundle(_built("float64"), *smoke)


@pytest.fixture(scope="module")
def fp32(smoke):
    return R.record_bundle(_built("float32"), *smoke)


def _perturbed(ops) -> R.Built:
    """A Built whose model computes through `ops` (same config and seeded weights as the clean one)."""
    clean = _built("float32")
    model = Transformer(clean.cfg, random_weights(clean.cfg, SEED), ops, torch.float32, "plain")
    return dataclasses.replace(clean, model=model)


class SinkNegated(ReferenceOps):
    """Attention of one layer runs with its sink negated (the layer is found by its sink tensor)."""

    target = None

    def attention(self, q, window_kv, window_idx, comp_kv, comp_idx, sink, scale, *args, **kw):
        if sink is self.target:
            sink = -sink
        return super().attention(q, window_kv, window_idx, comp_kv, comp_idx, sink, scale, *args, **kw)


class PickDropped(ReferenceOps):
    """The indexer of one CSA layer loses one pick (-1) in the last query row that has one."""

    def __init__(self, csa_layers, layer):
        super().__init__("cpu")
        self.csa_layers, self.layer, self.calls = csa_layers, layer, 0

    def indexer_topk(self, *args, **kw):
        out = super().indexer_topk(*args, **kw)
        layer = self.csa_layers[self.calls % len(self.csa_layers)]  # the model calls them in layer order
        self.calls += 1
        if layer == self.layer:
            rows = (out[:, 0] >= 0).nonzero()
            if rows.numel():
                out = out.clone()
                out[int(rows[-1]), 0] = -1
        return out


def _first_break(a, b, profile="fp32"):
    c = compare(a, b, profile)
    fb = c.first_break
    return c, (fb.name if fb else None)


def test_sink_negated_on_layer_2(fp32, smoke):
    ops = SinkNegated("cpu")
    built = _perturbed(ops)
    ops.target = built.model.blocks[2].sink
    c, where = _first_break(fp32, R.record_bundle(built, *smoke))
    assert not c.passed and c.exit_code == 1
    assert where == "layers.2.attn.output"
    # everything before it agrees
    names = [r.name for r in c.rows]
    assert all(r.passed for r in c.rows[: names.index("layers.2.attn.output")])


def test_indexer_pick_dropped_on_layer_1(fp32, smoke):
    cfg = _built().cfg
    csa = [i for i in range(cfg.num_hidden_layers) if cfg.layer_type(i) == "csa"]
    assert csa == [1, 3]
    c, where = _first_break(fp32, R.record_bundle(_perturbed(PickDropped(csa, 1)), *smoke))
    assert where == "layers.1.attn.indexer_topk"
    row = next(r for r in c.rows if r.name == where)
    assert row.metrics["rows_differ"] >= 1 and row.metrics["min_row"] < 1


def test_expert_weight_scaled_on_layer_3(fp32, smoke):
    built = _perturbed(ReferenceOps("cpu"))
    blk = built.model.blocks[3]
    e = int(fp32.hook(2, "layers.3.ffn.route_ids")[0, 0])  # an expert the prompts use
    inter = blk.w13.shape[1] // 2
    blk.w13[e, :inter] *= 1.5  # W1 of expert e (w13 = [W1; W3])
    c, where = _first_break(fp32, R.record_bundle(built, *smoke))
    assert where == "layers.3.ffn.output"
    # the routing itself is untouched: the gate does not read W1
    assert next(r for r in c.rows if r.name == "layers.3.ffn.route_ids").passed


def test_fp32_against_fp64_passes_the_fp32_profile(fp64, fp32):
    c = compare(fp64, fp32)
    assert c.profile.name == "fp32"
    assert c.passed, [(r.name, r.failed) for r in c.rows if r.failed]
    logits = next(r for r in c.rows if r.name == "logits").metrics
    assert 0 < logits["max_abs"] < 1e-4 and logits["cosine"] > 0.99999 and logits["top1"] == 1.0


def test_bf16_against_fp64_shows_error_and_passes_the_bf16_profile(fp64, smoke):
    bf16 = R.record_bundle(_built("bfloat16"), *smoke)
    c = compare(fp64, bf16)
    assert c.profile.name == "bf16"
    assert c.passed, [(r.name, r.failed) for r in c.rows if r.failed]
    logits = next(r for r in c.rows if r.name == "logits").metrics
    assert logits["max_abs"] > 1e-3 and logits["kl"] > 0 and logits["cosine"] < 0.99999
    # and bf16 is far outside the fp32 profile
    assert not compare(fp64, bf16, "fp32").passed
