"""Sizes of the kernel benches (bench/cuda_kernels*.py): V4-Flash, or tiny ones for --smoke. The
conformance tests keep interpreter-sized shapes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Shapes:
    """Everything a case's size depends on: V4-Flash values, or tiny ones for --smoke."""

    heads: int  # attention query heads
    head_dim: int
    topk: int  # CSA top-k compressed entries per query
    window: int  # sliding window
    csa_ratio: int
    hca_ratio: int
    batches: list  # decode batch sizes (queries, one per sequence)
    contexts: list  # decode context lengths
    prefill_queries: int  # attention prefill: queries of one sequence
    prefill_context: int
    idx_heads: int
    idx_dim: int
    block_size: int  # entries per page of the compressed / indexer pools
    hidden: int
    hc_n: int
    prefill_tokens: int  # hc / norm / rope / gate prefill size
    compress_tokens: int
    compress_idx_dim: int
    experts: int
    moe_topk: int
    moe_inter: int
    moe_prefill: list
    moe_decode: list
    linear: dict  # name -> (N, K)
    linear_tokens: list


FLASH = Shapes(
    heads=64, head_dim=512, topk=512, window=128, csa_ratio=4, hca_ratio=128,
    batches=[1, 32, 128], contexts=[8192, 65536, 1048576], prefill_queries=4096, prefill_context=8192,
    idx_heads=64, idx_dim=128, block_size=64,
    hidden=4096, hc_n=4, prefill_tokens=4096,
    compress_tokens=8192, compress_idx_dim=128,
    experts=256, moe_topk=6, moe_inter=2048, moe_prefill=[4096, 16384], moe_decode=[1, 32, 128],
    # Flash projections (q_lora 1024, 64 x 512 heads, o_groups 8 x rank 1024, indexer 64 x 128)
    linear={"wq_a": (1024, 4096), "wq_b": (32768, 1024), "wkv": (512, 4096), "wo_b": (4096, 8192),
            "idx.wq_b": (8192, 1024)},
    linear_tokens=[1, 128, 4096],
)


SMOKE = Shapes(
    heads=16, head_dim=128, topk=16, window=8, csa_ratio=4, hca_ratio=16,
    batches=[1, 3], contexts=[128, 512], prefill_queries=16, prefill_context=128,
    idx_heads=8, idx_dim=32, block_size=16,
    hidden=64, hc_n=4, prefill_tokens=9,
    compress_tokens=64, compress_idx_dim=128,
    experts=8, moe_topk=2, moe_inter=64, moe_prefill=[24], moe_decode=[1, 3],
    linear={"wq_a": (128, 256), "wkv": (64, 256)},
    linear_tokens=[1, 5],
)
