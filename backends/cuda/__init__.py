"""CUDA backend: Triton kernels for NVIDIA GPUs (Hopper first).

Selected by `runtime.backend: cuda`. With `TRITON_INTERPRET=1` and no GPU the same kernels run in
Triton's interpreter on CPU tensors ("interpreter mode"), which is how CI checks every kernel
against the reference backend; `auto` never picks interpreter mode (it is for checking, not speed).

Ops without a kernel yet are not declared: asking for this backend then needs
`runtime.allow_fallback: true`, and the filled ops are reported.
"""

from __future__ import annotations

import os

from .. import installed as _installed


# The oldest Triton the kernels were run with natively (an H200, bench/results/h200-2026-12-04.md);
# CI runs them in Triton 3.9's interpreter. Older releases lack language features they use.
MIN_TRITON = (3, 6)


def triton_version_reason(version: str) -> str | None:
    """One sentence when this Triton release is older than the kernels need, else None."""
    try:
        have = tuple(int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        return None  # a development build: let it try
    if have >= MIN_TRITON:
        return None
    need = ".".join(map(str, MIN_TRITON))
    return (f"triton {version} is older than the {need} the cuda backend's kernels need "
            f"(pip install 'triton>={need}')")


def interpreter_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _gpu_reason() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return None
        return (
            "torch sees no CUDA GPU (install a CUDA build of torch on a GPU machine, "
            "or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter on CPU)"
        )
    except Exception as e:  # noqa: BLE001
        return f"torch unusable: {e}"


def probe():
    from backends import BackendInfo

    if not _installed("triton"):
        return BackendInfo(
            "cuda", "cuda", False, "triton is not installed (pip install 'dsv4[triton]')", frozenset(), (), ()
        )
    import triton

    too_old = triton_version_reason(triton.__version__)
    if too_old:
        return BackendInfo("cuda", "cuda", False, too_old, frozenset(), (), ())
    from .ops import IMPLEMENTED  # imports the kernels: only once we know this triton can build them
    why = _gpu_reason()
    interp = why is not None and interpreter_mode()
    if why is not None and not interp:
        return BackendInfo("cuda", "cuda", False, why, frozenset(IMPLEMENTED), (), ())
    return BackendInfo(
        name="cuda",
        device_type="cpu (Triton interpreter)" if interp else "cuda",
        available=True,
        reason="",
        ops=frozenset(IMPLEMENTED),
        dtypes=("float32", "bfloat16", "float16"),
        modes=("plain", "exact"),
        notes="interpreter mode: TRITON_INTERPRET=1, kernels run on CPU tensors (for checking, not speed)"
        if interp
        else "Triton kernels",
        auto=not interp,
    )


def make_ops(device=None):
    from .ops import CudaOps

    if device is None:
        device = "cpu" if interpreter_mode() and _gpu_reason() is not None else "cuda"
    return CudaOps(device)
