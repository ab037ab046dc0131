"""The CUDA backend's ops: Triton kernels behind the op-set signatures of `backends.reference`.

Each op here has the reference op's signature and semantics; `IMPLEMENTED` lists the ops that
have a kernel. Until an op has one it is absent here (not a disguised reference call), and the
registry fills it from reference only when the runtime allows fallback.
"""

from __future__ import annotations

import torch

from backends.reference.ops import ReferenceOps

IMPLEMENTED: tuple[str, ...] = ()


class CudaOps:
    name = "cuda"

    def __init__(self, device="cuda"):
        self.device = torch.device(device)
        # weights are prepared the way the reference does until `linear` has its own kernel
        self._ref = ReferenceOps(self.device)

    def prepare_linear(self, w, dtype):
        return self._ref.prepare_linear(w, dtype)
