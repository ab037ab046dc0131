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
        self.tok_row = torch.repeat_interleave(torch.arange(len(self.lens), device=dev), rep)  # [T] sequence of each token
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
    """One decode token per sequence, with the layout held in device tensors: the batch of a decode
    step that is captured once as a CUDA graph and replayed with other slots and positions.

    Everything the model derives from it is computed on the device, and every shape depends only on
    the batch size B and on `max_len` (the cache's max_seq_len), never on the positions: no host
    read, no data-dependent shape, so the same kernels with the same launch grids serve every replay.
    Rows past the real batch (padding up to a captured size) point at a scratch cache slot.
    """

    graph_safe = True

    def __init__(self, slots: torch.Tensor, positions: torch.Tensor, max_len: int):
        B = slots.shape[0]
        dev = slots.device
        self.device, self.num_tokens, self.max_len = dev, B, max_len
        self.tok_slot = self.row_slot = slots
        self.positions = positions
        self.tok_start = positions  # each sequence's new tokens start (and end) at its position
        self.tok_row = self.tok_off = self.last_token = torch.arange(B, device=dev)
        self.cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.seqs = DecodeRows(slots, positions)

    def max_visible(self, ratio: int) -> int:
        return self.max_len // ratio
