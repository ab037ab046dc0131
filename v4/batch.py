"""The packed batch of one model step, in the two forms `Transformer.forward` takes.

- `StepBatch`: any mix of prompt chunks and decode tokens; the host knows the layout (Python ints).
- `DecodeBatch`: one decode token per sequence with the layout in device tensors, the form a
  captured decode step (a CUDA graph) replays with other slots and positions.
"""

from __future__ import annotations

import torch

from .ops import DecodeRows


class StepBatch:
    """Packed tokens of one engine step: sequence b (cache slot slots[b]) contributes lens[b] tokens
    from position starts[b] on. Tokens are laid out sequence after sequence ("TND")."""

    graph_safe = False  # the host knows this layout (Python ints); see DecodeBatch for the other kind

    def __init__(self, slots: list[int], starts: list[int], lens: list[int], device):
        self.slots, self.starts, self.lens = list(slots), list(starts), list(lens)
        self.device = dev = torch.device(device)
        self.offsets = [0]
        for n in self.lens:
            self.offsets.append(self.offsets[-1] + n)
        self.num_tokens = self.offsets[-1]
        self.cu_seqlens = torch.tensor(self.offsets, dtype=torch.int32, device=dev)
        rep = torch.tensor(self.lens, device=dev)
        self.tok_row = torch.repeat_interleave(
            torch.arange(len(self.lens), device=dev), rep
        )  # [T] sequence of each token
        self.row_slot = torch.tensor(self.slots, device=dev)  # [B] cache slot of each sequence
        self.tok_slot = self.row_slot[self.tok_row]  # [T]
        self.tok_start = torch.tensor(self.starts, device=dev)[self.tok_row]  # [T] first new position of its sequence
        self.tok_off = torch.tensor(self.offsets[:-1], device=dev)[self.tok_row]  # [T] its sequence's first row
        self.positions = self.tok_start + torch.arange(self.num_tokens, device=dev) - self.tok_off  # [T]
        self.seqs = list(zip(self.slots, self.starts, self.lens, self.offsets[:-1]))
        self.last_token = torch.tensor([o + n - 1 for o, n in zip(self.offsets[:-1], self.lens)], device=dev)

    def max_visible(self, ratio: int) -> int:
        """Most compressed entries (at `ratio`) any token of this step may see: (last position + 1) // ratio."""
        return max(((s + n) // ratio for _, s, n, _ in self.seqs), default=0)


class DecodeBatch:
    """q decode tokens per sequence (q = 1, or 1 + k speculative drafts), with the layout held in
    device tensors: the batch of a decode step that is captured once as a CUDA graph and replayed
    with other slots and positions. Sequence b's tokens are rows [b*q, (b+1)*q), at positions
    positions[b] .. positions[b] + q - 1.

    Everything the model derives from it is computed on the device, and every shape depends only on
    the batch size B, q and `max_len` (the cache's max_seq_len), never on the positions: no host
    read, no data-dependent shape, so the same kernels with the same launch grids serve every replay.
    Rows past the real batch (padding up to a captured size) point at a scratch cache slot.
    """

    graph_safe = True

    def __init__(self, slots: torch.Tensor, positions: torch.Tensor, max_len: int, q: int = 1):
        B = slots.shape[0]
        dev = slots.device
        self.device, self.num_tokens, self.max_len, self.q = dev, B * q, max_len, q
        self.row_slot = slots
        self.starts = positions  # [B] each sequence's first new position
        self.tok_row = torch.arange(B * q, device=dev) // q  # [T]
        self.tok_slot = slots if q == 1 else slots[self.tok_row]
        self.tok_start = positions if q == 1 else positions[self.tok_row]
        self.positions = positions if q == 1 else self.tok_start + torch.arange(B * q, device=dev) % q
        self.tok_off = self.tok_row * q
        self.last_token = torch.arange(B, device=dev) * q + q - 1
        self.cu_seqlens = (torch.arange(B + 1, device=dev) * q).to(torch.int32)
        # the compressors take one token per row (DecodeRows): a step of q tokens runs them q times
        self.seqs = DecodeRows(slots, positions) if q == 1 else None

    def rows_of(self, j: int) -> DecodeRows:
        """Token j of every sequence, as the compressors take it."""
        return DecodeRows(self.row_slot, self.starts + j)

    def max_visible(self, ratio: int) -> int:
        return self.max_len // ratio
