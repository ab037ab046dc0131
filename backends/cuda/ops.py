"""The CUDA backend's ops: Triton kernels behind the op-set signatures of `backends.reference`.

Each op here has the reference op's signature and semantics; `IMPLEMENTED` lists the ops that
have a kernel. An op without one is absent here (not a disguised reference call), and the
registry fills it from reference only when the runtime allows fallback.
"""

from __future__ import annotations

import torch

from .kernels import attention as _attention
from .kernels import compress as _compress
from .kernels import gate as _gate
from .kernels import gemm as _gemm
from .kernels import indexer as _indexer
from .kernels import mhc as _mhc
from .kernels import norm_rope as _norm_rope

# The ops that are a kernel module's function as it stands (no state of the instance), a module a line:
# one table gives both CudaOps' methods (set below the class) and IMPLEMENTED, so they cannot disagree.
_KERNEL_OPS = {
    "rms_norm": _norm_rope.rms_norm, "rope": _norm_rope.rope,
    "hc_pre": _mhc.hc_pre, "hc_post": _mhc.hc_post, "hc_head": _mhc.hc_head,
    "compress": _compress.compress,
    "indexer_topk": _indexer.indexer_topk,
    "attention": _attention.attention,
    "moe_gate": _gate.moe_gate,
    "moe_experts": _gemm.moe_experts, "linear": _gemm.linear, "grouped_out_proj": _gemm.grouped_out_proj,
}
IMPLEMENTED: tuple[str, ...] = tuple(_KERNEL_OPS)


class CudaOps:
    """The ops with a kernel: those below, and _KERNEL_OPS's functions as static methods (set after the class)."""

    name = "cuda"
    # every op is graph-safe for a `DecodeBatch` step (no host reads, shapes from shapes only), so
    # v4.graphs may capture the decode step: as a CUDA graph on a GPU (`graph_capture`), under the
    # HostSyncGuard emulation in Triton's interpreter on CPU
    capturable = True

    def __init__(self, device="cuda"):
        self.device = torch.device(device)

    def graph_capture(self, device):
        """Decode graphs on `device` (v4.graphs.GraphCapture): CUDA graphs on a GPU; None elsewhere
        (Triton's interpreter on CPU has no graphs: `decode_graphs: on` runs the emulation there)."""
        if torch.device(device).type != "cuda":
            return None
        from v4.graphs import StreamCapture

        return StreamCapture("cuda", torch.cuda, torch.cuda.CUDAGraph, device, "CUDA graph")

    # weights stay in their stored form (bf16 / FP8 blocks / FP4) and are dequantised in-kernel
    def prepare_linear(self, w, dtype):
        return _gemm.prepare_linear(w, dtype, self.device)

    def prepare_experts(self, w1s, w3s, w2s, dtype):
        return _gemm.prepare_experts(w1s, w3s, w2s, dtype, self.device)


for _op, _kernel in _KERNEL_OPS.items():
    setattr(CudaOps, _op, staticmethod(_kernel))
