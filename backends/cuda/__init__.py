"""CUDA backend (Triton kernels for NVIDIA GPUs).

The kernels are not written yet, so this backend reports itself unavailable with the reason;
asking for it is an error, never a silent fallback to the reference backend.
"""

from __future__ import annotations

import importlib.util


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # an import hook that refuses the package counts as absent
        return False


def probe():
    from backends import BackendInfo

    reasons = []
    if not _installed("triton"):
        reasons.append("triton is not installed (pip install triton)")
    try:
        import torch

        if not torch.cuda.is_available():
            reasons.append("torch sees no CUDA GPU (install a CUDA build of torch on a GPU machine)")
    except Exception as e:  # noqa: BLE001
        reasons.append(f"torch unusable: {e}")
    reasons.append("the CUDA Triton kernels are not implemented in this release yet; use --backend reference")
    return BackendInfo("cuda", "cuda", False, "; ".join(reasons), frozenset(), (), ())


def make_ops(device=None):
    from v4.errors import BackendUnavailable

    raise BackendUnavailable(probe().reason)
