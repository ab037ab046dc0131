"""The CUDA backend's ops: Triton kernels behind the op-set signatures of `backends.reference`.

Each op here has the reference op's signature and semantics; `IMPLEMENTED` lists the ops that
have a kernel. An op without one is absent here (not a disguised reference call), and the
registry fills it from reference only when the runtime allows fallback.
"""

from __future__ import annotations

import torch

from .kernels import compress as _compress
from .kernels import gate as _gate
from .kernels import indexer as _indexer
from .kernels import mhc as _mhc
from .kernels import norm_rope as _norm_rope

IMPLEMENTED: tuple[str, ...] = (
    "rms_norm", "rope", "hc_pre", "hc_post", "hc_head", "compress", "indexer_topk", "moe_gate",
)


class CudaOps:
    name = "cuda"

    def __init__(self, device="cuda"):
        self.device = torch.device(device)

    rms_norm = staticmethod(_norm_rope.rms_norm)
    rope = staticmethod(_norm_rope.rope)
    hc_pre = staticmethod(_mhc.hc_pre)
    hc_post = staticmethod(_mhc.hc_post)
    hc_head = staticmethod(_mhc.hc_head)
    compress = staticmethod(_compress.compress)
    indexer_topk = staticmethod(_indexer.indexer_topk)
    moe_gate = staticmethod(_gate.moe_gate)
