"""The MTP block against an oracle assembled from transformers' own modules.

transformers has no MTP model, but the MTP block is an ordinary V4 block (sliding-only, gated MoE)
followed by an mHC head and a norm. So: a one-layer transformers model supplies the block, the
head collapse and the norm (weights and code); the MTP input mixing (spec §2.10) is written out
below from its equation.
"""

import dataclasses

import torch

import backends
from tests.conftest import rel_err
from tests.hf_oracle import build
from v4.model import Transformer
from v4.runtime import random_weights
from v4.weights import load_checkpoint


def test_mtp_logits_match_transformers_block(tiny_cfg, tmp_path):
    cfg = tiny_cfg
    L = cfg.num_hidden_layers
    # one sliding layer with a gated (non-hash) MoE: the MTP block's shape
    one = dataclasses.replace(
        cfg, num_hidden_layers=1, compress_ratios=[0, 0], num_hash_layers=0, num_nextn_predict_layers=1
    )
    hf = build(one, tmp_path, seed=9)
    _, hw = load_checkpoint(tmp_path, progress=False)

    w = random_weights(cfg, seed=2)
    for name, t in hw.items():
        if name.startswith("layers.0."):
            w["mtp.0." + name[len("layers.0."):]] = t
        elif name.startswith("hc_head_") or name == "norm.weight":
            w["mtp.0." + name] = t
    model = Transformer(cfg, dict(w), backends.get_ops("reference"), torch.float32, "plain")

    S = 40
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (S,), generator=g)
    nxt = torch.randint(3, cfg.vocab_size, (S,), generator=g)
    seen = {}
    model.hook = lambda name, t: seen.__setitem__(name, t.clone())
    _, mtp = model.logits(ids, mtp_next_ids=nxt)
    X = seen[f"layers.{L - 1}.output"]  # the main stack's final streams [S, n, D]

    with torch.no_grad():
        eps = cfg.rms_norm_eps
        rms = lambda x, wt: wt * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)  # noqa: E731
        e = rms(w["embed.weight"].float()[nxt], w["mtp.0.enorm.weight"].float())
        h = rms(X, w["mtp.0.hnorm.weight"].float())
        X0 = (e @ w["mtp.0.e_proj.weight"].float().t()).unsqueeze(1) + h @ w["mtp.0.h_proj.weight"].float().t()

        pos = torch.arange(S)[None]
        rot = {k: hf.model.rotary_emb(X0, position_ids=pos, layer_type=k) for k in ("main", "compress")}
        d = pos[0][:, None] - pos[0][None, :]
        mask = torch.where((d >= 0) & (d < cfg.sliding_window), 0.0, float("-inf"))[None, None]
        X1 = hf.model.layers[0](X0[None], input_ids=nxt[None], position_embeddings=rot, position_ids=pos,
                                attention_mask=mask, cache=None)
        ref = hf.model.norm(hf.model.hc_head(X1))[0] @ w["head.weight"].float().t()

    assert rel_err(mtp, ref) < 1e-4
