"""Reference backend: pure PyTorch on any torch device; defines the semantics of every op."""

from __future__ import annotations


def probe():
    from backends import OP_NAMES, BackendInfo

    return BackendInfo(
        name="reference",
        device_type="any torch device",
        available=True,
        reason="",
        ops=frozenset(OP_NAMES),
        dtypes=("float32", "bfloat16", "float16", "float64"),
        modes=("plain", "exact"),
        notes="pure PyTorch; the definition the other backends are checked against",
    )


def make_ops(device=None):
    from .ops import ReferenceOps

    return ReferenceOps(device or "cpu")
