"""The op-set contract between the model core and the backends.

The model computes through one object with the 12 ops of `OP_NAMES` plus the two weight hooks
`prepare_linear` / `prepare_experts`; `backends.get_ops` builds it. This module says what that
object looks like (`Ops`), and holds the types and the precision rule every backend shares
(`CompressSpec`, `DecodeRows`, `acc`), so that neither the core nor a backend has to import
another backend to speak the contract. `backends/reference/ops.py` is the executable definition
of each op's semantics; `Ops` is its shape only.

Layout conventions (design.md): packed token-major tensors `[T, ...]`; int32 index tensors with
-1 for unused slots; compressed entries in paged pools `[num_blocks, block, dim]` addressed through
per-sequence block tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

# The op set of design.md, in the order a block uses them.
OP_NAMES = (
    "rms_norm",
    "rope",
    "hc_pre",
    "hc_post",
    "hc_head",
    "compress",
    "indexer_topk",
    "attention",
    "moe_gate",
    "moe_experts",
    "linear",
    "grouped_out_proj",
)


def acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for a working dtype: float64 for float64, float32 for everything else
    (what the official code computes in fp32 is computed in `acc(dtype)`, so an fp64 run is a real
    fp64 reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class CompressSpec:
    """Static description of one compressor instance."""

    ratio: int  # m: tokens per entry
    dim: int  # c: entry width
    overlap: bool  # CSA-style: entry w pools windows w-1 (first half) and w (second half)
    quant: str  # "none" | "fp8" (main, nope dims) | "fp4" (indexer: Hadamard + FP4)
    rope_dim: int
    eps: float


@dataclass
class DecodeRows:
    """`compress`'s batch layout for a decode step kept on the device: row b of kv / score is the
    one new token of sequence `slots[b]`, at position `positions[b]`.

    The list form of `seqs` ([(slot, start, n, offset), ...]) is read on the host; this form is what
    a captured decode step (CUDA graph) hands over, since its layout changes from replay to replay
    without the host seeing it. Rows may repeat a slot only if that slot is scratch (padding rows).
    """

    slots: torch.Tensor  # [B] int
    positions: torch.Tensor  # [B] int

    def as_list(self) -> list:
        """The equivalent list form (reads the device: for backends that plan on the host)."""
        return [(s, p, 1, b) for b, (s, p) in enumerate(zip(self.slots.tolist(), self.positions.tolist()))]


class Ops(Protocol):
    """What the model computes through (the signatures of `ReferenceOps`, which defines the semantics).

    Documentation and a type for checkers, not a base class: `ReferenceOps`, `CudaOps` and
    `AscendOps` match it structurally. An implementation may add parameters of its own after these,
    with defaults (the reference's `attention(chunk=64)`, the CUDA kernels' keyword-only tile sizes).
    Besides these, `backends.get_ops` sets `impl` ({op: backend}) and `fallback` (ops filled from
    reference) on the object it returns, and an object whose every op is graph-safe for a
    `DecodeBatch` step says so with `capturable = True` (read with `getattr(ops, "capturable", False)`).
    """

    name: str  # registry name of the backend
    device: torch.device

    # ------------------------------------------------------------------ weights
    def prepare_linear(self, w, dtype: torch.dtype):
        """Stored weight [N, K] (float tensor or `v4.quant.QuantizedWeight`) -> the form `linear` takes."""

    def prepare_experts(self, w1s: list, w3s: list, w2s: list, dtype: torch.dtype):
        """E stored W1 [I, D], W3 [I, D], W2 [D, I] -> (w13 ~[E, 2I, D], w2 ~[E, D, I]) for `moe_experts`."""

    # ------------------------------------------------------------------ basic
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """x [..., D], weight [D] or None (unweighted) -> [..., D] in x's dtype."""

    def rope(
        self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False
    ) -> torch.Tensor:
        """x [T, ..., d], positions [T], inv_freq [r/2] -> x with its last r dims rotated (interleaved pairs)."""

    def linear(self, x: torch.Tensor, w: torch.Tensor, act_quant: bool = False) -> torch.Tensor:
        """x [..., K], w from `prepare_linear` ([N, K]) -> x W^T [..., N]."""

    def grouped_out_proj(self, o: torch.Tensor, wo_a: torch.Tensor, wo_b: torch.Tensor, groups: int,
                         act_quant: bool = False) -> torch.Tensor:
        """o [T, H*d], wo_a [G*R, H*d/G], wo_b [D, G*R] (prepared) -> [T, D]."""

    # ------------------------------------------------------------------ mHC
    def hc_pre(self, X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
               sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        """X [T, n, D] -> (u [T, D], post [T, n], comb [T, n, n])."""

    def hc_post(self, y: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """y [T, D], X [T, n, D], post [T, n], comb [T, n, n] -> X' [T, n, D]."""

    def hc_head(self, X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                hc_eps: float, norm_eps: float) -> torch.Tensor:
        """X [T, n, D] -> [T, D]."""

    # ------------------------------------------------------------------ compression
    def compress(self, kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, spec: CompressSpec,
                 norm_weight: torch.Tensor, inv_freq: torch.Tensor,
                 state_kv: torch.Tensor, state_score: torch.Tensor,
                 pool: torch.Tensor, block_table: torch.Tensor,
                 seqs) -> torch.Tensor:
        """kv, score [T, k*c]; state [slots, k*m, k*c]; pool [blocks, block, c]; seqs list or `DecodeRows`
        -> new entries [E, c] (for `DecodeRows`: [B, c], zeros where none closed); pool and state updated."""

    # ------------------------------------------------------------------ indexer
    def indexer_topk(self, q: torch.Tensor, weights: torch.Tensor, k_pool: torch.Tensor,
                     block_table: torch.Tensor, tok_slot: torch.Tensor, positions: torch.Tensor,
                     ratio: int, topk: int, max_visible: int | None = None) -> torch.Tensor:
        """q [T, H, d], weights [T, H], k_pool [blocks, block, d], tok_slot/positions [T]
        -> int32 [T, topk] (-1 = none)."""

    # ------------------------------------------------------------------ attention
    def attention(self, q: torch.Tensor, window_kv: torch.Tensor, window_idx: torch.Tensor,
                  comp_kv: torch.Tensor | None, comp_idx: torch.Tensor | None,
                  sink: torch.Tensor, scale: float) -> torch.Tensor:
        """q [T, H, d], window_kv [Nw, d], window_idx [T, Kw], comp_kv [Nc, d], comp_idx [T, Kc], sink [H]
        -> [T, H, d]."""

    # ------------------------------------------------------------------ MoE
    def moe_gate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 tid2eid: torch.Tensor | None, token_ids: torch.Tensor | None, topk: int, route_scale: float):
        """x [T, D], weight [E, D] -> (weights [T, k] acc dtype, expert ids [T, k] int32)."""

    def moe_experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    w13: torch.Tensor, w2: torch.Tensor, shared: tuple | None, limit: float,
                    act_quant: bool = False) -> torch.Tensor:
        """x [T, D], ids/weights [T, k], (w13, w2) from `prepare_experts`, shared (w13, w2) or None -> [T, D]."""
