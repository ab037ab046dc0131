"""transformers' DeepseekV4ForCausalLM as an independent test oracle.

Builds the transformers model for one of our ModelConfigs, fills EVERY parameter and buffer with
seeded random values (transformers initialises sinks, biases and tid2eid to zeros, which would hide
bugs), and saves it with save_pretrained so our loader reads the files transformers writes.
"""

from __future__ import annotations

import torch

from v4.config import CSA, HCA, SLIDING, ModelConfig

_TYPES = {SLIDING: "sliding_attention", CSA: "compressed_sparse_attention", HCA: "heavily_compressed_attention"}


def hf_config(cfg: ModelConfig):
    from transformers import DeepseekV4Config

    rs = cfg.rope_scaling
    return DeepseekV4Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        q_lora_rank=cfg.q_lora_rank,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts,
        routed_scaling_factor=cfg.routed_scaling_factor,
        rope_theta=cfg.rope_theta,
        compress_rope_theta=cfg.compress_rope_theta,
        layer_types=[_TYPES[t] for t in cfg.layer_types],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": cfg.hca_ratio or 128},
        mlp_layer_types=["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(cfg.num_hidden_layers)],
        hc_mult=cfg.hc_mult,
        hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        hc_eps=cfg.hc_eps,
        swiglu_limit=cfg.swiglu_limit,
        sliding_window=cfg.sliding_window,
        o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank,
        index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk,
        rms_norm_eps=cfg.rms_norm_eps,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_scaling=None
        if rs is None
        else {
            "type": "yarn",
            **{k: rs[k] for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")},
        },
        num_nextn_predict_layers=0,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )


@torch.no_grad()
def randomise(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)

    def rn(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if "inv_freq" in name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "tid2eid":
            V, k = p.shape
            E = model.config.n_routed_experts
            p.copy_(torch.rand(V, E, generator=g).argsort(-1)[:, :k])
        elif leaf in ("sinks",):
            p.copy_(rn(p.shape))
        elif leaf in ("position_bias", "e_score_correction_bias", "base", "hc_base"):
            p.copy_(rn(p.shape, 0.1))
        elif leaf in ("scale", "hc_scale"):
            p.copy_(rn(p.shape, 0.1, 1.0))
        elif "norm" in name and p.dim() == 1:
            p.copy_(rn(p.shape, 0.1, 1.0))
        elif "embed_tokens" in name:
            p.copy_(rn(p.shape))
        elif p.dim() >= 2:
            p.copy_(rn(p.shape, p.shape[-1] ** -0.5))
        else:
            raise AssertionError(f"unhandled tensor {name} {tuple(p.shape)}")


def build(cfg: ModelConfig, out_dir, seed: int = 0):
    """Random transformers model for cfg, saved (fp32) to out_dir. Returns the model (eval, fp32)."""
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM(hf_config(cfg)).float().eval()
    model.config._attn_implementation = "eager"
    randomise(model, seed)
    model.save_pretrained(out_dir)
    return model
