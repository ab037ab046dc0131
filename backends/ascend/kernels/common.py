"""Lowering cases of the shared @triton.jit helpers (backends/triton_common.py), which both kernel
families inline: `apply_kernel` runs one helper elementwise in the persistent-loop shape, and each
case below compiles it for one helper, so a helper that leaves the Ascend-legal subset fails here
by name rather than inside a model kernel. The numerics are tests/backends/test_triton_common.py's."""

from __future__ import annotations

from ... import triton_common as tc
from .launch import LoweringCase

_F32 = {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"}
_BLOCK = 1024

LOWERING_CASES = [
    LoweringCase(f"common_{name}", tc.apply_kernel, dict(_F32, **sig), dict(OP=op, RNE_BF16=rne, BLOCK=_BLOCK))
    for name, op, sig, rne in (
        ("round_bf16", tc.OP_ROUND_BF16, {}, False),
        ("cast_rne_bf16", tc.OP_CAST_BF16, {"out_ptr": "*bf16"}, True),
        ("cast_bf16", tc.OP_CAST_BF16, {"out_ptr": "*bf16"}, False),
        ("round_to_bf16", tc.OP_ROUND_TO_BF16, {}, True),
        ("exp2i", tc.OP_EXP2I, {"x_ptr": "*i32"}, False),
        ("ceil_log2", tc.OP_CEIL_LOG2, {"out_ptr": "*i32"}, False),
        ("round_e4m3", tc.OP_E4M3, {}, False),
        ("round_e2m1", tc.OP_E2M1, {}, False),
        ("sqrt_softplus", tc.OP_SQRT_SOFTPLUS, {}, False),
    )
]
