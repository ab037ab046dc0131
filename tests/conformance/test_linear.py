"""The projections and experts (linear, grouped_out_proj, moe_experts) over every backend that has
them: reference, cuda (Triton GEMMs; interpreted on CPU without a GPU) and ascend (torch / CANN calls,
over the CPU emulation of CANN), over the one case set (backends/conformance/linear.py), in plain
mode everywhere and in exact mode (FP8 activations, FP8 / FP4 stored weights) where the backend has
it (A2/A3 have no FP8: Ascend refuses act_quant, tests/backends/ascend/test_adapter.py).

Each backend brings the weights into its own form (`prepare_linear` / `prepare_experts`), as the
model does. The result must match the reference in the same working dtype to a bf16 ulp (one FP8 code
with act_quant: `GEMM_TOL`, `GEMM_TOL_ACT_QUANT`), and in plain fp32 the reference in float64 too.
"""

import functools

import pytest
import torch

from backends.conformance import (
    F32,
    F64,
    FP8_MMA_GPU_TOL,
    GEMM_TOL,
    GEMM_TOL_ACT_QUANT,
    REF,
    check_rel,
    impl,
    kernel_args,
    ops_object,
    stored_weight,
)
from tests.conformance.harness import GPU, device_of, params

# plain fp32 against the float64 reference on the same weights: summation order only
TRUTH_TOL = {"linear": 1e-6, "grouped_out_proj": 1e-5, "moe_experts": 1e-5}


def _params(op: str) -> list:
    """(backend, case, dtype, mode): plain everywhere, exact where the backend has FP8 activations."""
    out = []
    for p in params(op):
        backend, case, dtype = p.values
        for mode in ("plain",) if backend == "ascend" else ("plain", "exact"):
            out.append(pytest.param(backend, case, dtype, mode, id=f"{p.id},{mode}", marks=p.marks))
    return out


def _preparers(backend: str):
    """The backend's (prepare_linear(w, dtype), prepare_experts(w1s, w3s, w2s, dtype))."""
    if backend == "reference":
        return REF.prepare_linear, REF.prepare_experts
    if backend == "cuda":
        from backends.cuda.kernels import gemm

        dev = device_of("cuda")(torch.empty(0)).device
        return (functools.partial(gemm.prepare_linear, device=dev), functools.partial(gemm.prepare_experts, device=dev))
    ops = ops_object(backend)
    return ops.prepare_linear, ops.prepare_experts


def _arguments(backend, tagged, dtype, formats):
    """The op's arguments for `backend` in `dtype`: weights first in their stored form (`formats` by
    role; none in plain mode), then through the backend's own prepare_*; the rest as a kernel gets them."""
    prepare_linear, prepare_experts = _preparers(backend)
    dev = device_of(backend)

    def stored(role, w):
        return stored_weight(w.float(), formats.get(role, "dense"))

    out = []
    for role, v in tagged:
        if role == "W":
            out.append(prepare_linear(stored(role, v), dtype))
        elif role in ("experts", "shared") and v is not None:
            w13, w2 = prepare_experts(*[[stored(role, w) for w in part] for part in v], dtype)
            out += [w13, w2] if role == "experts" else [(w13[0], w2[0])]
        elif dtype == F64 and isinstance(v, torch.Tensor) and v.is_floating_point():
            out.append(v.to(F64))  # the float64 reference: every float input in float64
        else:
            out.append(dev(kernel_args([(role, v)], dtype)[0]))
    return out


def _check(op, backend, case, dtype, mode):
    tagged, kwargs = case.inputs(mode=mode)
    formats = case.extra["formats"] if mode == "exact" else {}
    out = impl(op, backend)(*_arguments(backend, tagged, dtype, formats), **kwargs)
    ref = getattr(REF, op)(*_arguments("reference", tagged, dtype, formats), **kwargs)
    act_quant = kwargs["act_quant"]
    tol = (GEMM_TOL_ACT_QUANT if act_quant else GEMM_TOL)[dtype]
    fp8_mma = backend == "cuda" and GPU and act_quant and "fp8" in formats.values()
    tol = max(tol, FP8_MMA_GPU_TOL) if fp8_mma else tol
    check_rel(out, ref.double(), dtype, f"{op} {case.name} vs reference", tol={dtype: tol})
    if dtype == F32 and not act_quant:
        truth = getattr(REF, op)(*_arguments("reference", tagged, F64, formats), **kwargs)
        check_rel(out, truth, dtype, f"{op} {case.name} vs float64 reference", tol={dtype: TRUTH_TOL[op]})


@pytest.mark.parametrize("backend,case,dtype,mode", _params("linear"))
def test_linear(backend, case, dtype, mode):
    _check("linear", backend, case, dtype, mode)


@pytest.mark.parametrize("backend,case,dtype,mode", _params("grouped_out_proj"))
def test_grouped_out_proj(backend, case, dtype, mode):
    _check("grouped_out_proj", backend, case, dtype, mode)


@pytest.mark.parametrize("backend,case,dtype,mode", _params("moe_experts"))
def test_moe_experts(backend, case, dtype, mode):
    _check("moe_experts", backend, case, dtype, mode)
