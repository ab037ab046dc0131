"""The conformance cases: one case set for every op, read by the tests (tests/conformance/), by
`dsv4 parity ops` (parity/opcheck.py) and by the kernel benches (bench/cuda_kernels*.py).

- `CASES[op]`: the op's `Case`s (case.py), one list per op, in one module per op family
  (norm_rope, mhc, gate, indexer, attention, compress, linear).
- checks.py: the tolerance rules of the kernel tests (`check_as_ref`, `check_rel`, `hc_check`,
  `gate_compare`, `check_indexer_topk`, ...).
- inputs.py: input builders shared with the backend-specific tests and the benches (`layer_inputs`,
  `indexer_case`, `paged_table`, ...).
- sizes.py: the benches' sizes (V4-Flash, --smoke).
- `impl(op, backend)`: the op in the reference backend, or a backend's Triton kernel for it.

No Triton and no kernel module is imported at module level (callers decide TRITON_INTERPRET first);
`impl` imports the kernels when asked.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

from . import attention, compress, gate, indexer, linear, mhc, norm_rope
from .case import BF16, DTYPES, F32, F64, LENGTHS, Case, kernel_args, randn  # noqa: F401
from .checks import (  # noqa: F401
    ATTENTION_TOL,
    FLOOR,
    FP8_MMA_GPU_TOL,
    GEMM_TOL,
    GEMM_TOL_ACT_QUANT,
    REF,
    attention_truth,
    check_as_ref,
    check_elementwise,
    check_indexer_topk,
    check_rel,
    entry_scores64,
    gate_compare,
    gate_scores64,
    gate_truth,
    hc_check,
    run_attention,
    tie_free,
)
from .inputs import (  # noqa: F401
    W,
    cpu64,
    csa_logical,
    gen,
    hc_params,
    indexer_case,
    layer_inputs,
    paged_table,
    qs,
    random_table,
    rng,
    stored_weight,
)
from .sizes import FLASH, SMOKE, Shapes  # noqa: F401

_FAMILIES = (norm_rope, mhc, gate, indexer, attention, compress, linear)
CASES: dict[str, list[Case]] = {op: cases for m in _FAMILIES for op, cases in m.CASES.items()}

# which backend has a kernel for which op: the tests run every case over each of them
KERNEL_MODULES = {
    "rms_norm": {"cuda": "backends.cuda.kernels.norm_rope"},
    "rope": {"cuda": "backends.cuda.kernels.norm_rope"},
    "hc_pre": {"cuda": "backends.cuda.kernels.mhc", "ascend": "backends.ascend.kernels.mhc"},
    "hc_post": {"cuda": "backends.cuda.kernels.mhc", "ascend": "backends.ascend.kernels.mhc"},
    "hc_head": {"cuda": "backends.cuda.kernels.mhc", "ascend": "backends.ascend.kernels.mhc"},
    "moe_gate": {"cuda": "backends.cuda.kernels.gate", "ascend": "backends.ascend.kernels.gate"},
    "indexer_topk": {"cuda": "backends.cuda.kernels.indexer", "ascend": "backends.ascend.kernels.indexer"},
    "attention": {"cuda": "backends.cuda.kernels.attention", "ascend": "backends.ascend.kernels.attention"},
    "compress": {"cuda": "backends.cuda.kernels.compress", "ascend": "backends.ascend.kernels.compress"},
    # the projections: Ascend runs them as torch / CANN calls of its ops object ("ops"), no kernel of its own
    "linear": {"cuda": "backends.cuda.kernels.gemm", "ascend": "ops"},
    "grouped_out_proj": {"cuda": "backends.cuda.kernels.gemm", "ascend": "ops"},
    "moe_experts": {"cuda": "backends.cuda.kernels.gemm", "ascend": "ops"},
}


def backends_of(op: str) -> list[str]:
    return ["reference", *KERNEL_MODULES[op]]


def impl(op: str, backend: str) -> Callable:
    """The op's function in `backend`: the reference op, the backend's Triton kernel (imported here), or
    its ops object's method where KERNEL_MODULES says "ops"."""
    if backend == "reference":
        return getattr(REF, op)
    where = KERNEL_MODULES[op][backend]
    if where == "ops":
        return getattr(ops_object(backend), op)
    return getattr(importlib.import_module(where), op)


@functools.cache
def ops_object(backend: str):
    """The backend's ops on CPU: Ascend's over the CPU emulation of its CANN calls (backends/ascend/emulation.py),
    the layout decisions the NPU run makes included."""
    if backend != "ascend":
        raise ValueError(f"no CPU ops object for backend {backend!r}")
    from backends.ascend import emulation
    from backends.ascend.ops import AscendOps

    return AscendOps("cpu", npu=emulation)
