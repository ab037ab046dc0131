"""The KV compressor over every backend with a kernel for it: reference, cuda (Triton; interpreted on
CPU without a GPU) and ascend (Triton-Ascend, interpreted), over the one case set
(backends/conformance/compress.py: prefills at the boundary token counts, windows closing at or just
after a step, mid-window starts, packed sequences, a far position with an idle sequence, the decode
form), in plain mode everywhere and in exact mode (FP4 / FP8 entries) where the backend has it.

Each backend is fed the same inputs and state as the reference in the working dtype: the state after
the call must be bit-identical to the reference's, the emitted entries and the pool equal to fp32
rounding (one bf16 ulp where the pool is bf16), and in plain mode as close to the reference in
float64 as the reference itself is in the working dtype (`check_as_ref`).
"""

from functools import partial

import pytest
import torch

from backends.conformance import BF16, F32, REF, check_as_ref, check_elementwise, impl, kernel_args
from backends.reference.ops import compress_rows_on_host
from tests.conformance.harness import device_of, f64, params
from v4.ops import DecodeRows

STATE, POOL, LAYOUT = (6, 7), 8, 10  # argument positions
# (rtol, atol) against the reference in the working dtype
TOL_SAME = {F32: (1e-5, 1e-5), BF16: (2**-7, 1e-3)}


def _params() -> list:
    """(backend, case, dtype, mode): plain everywhere, exact where the backend has it (Ascend's kernel
    has no FP8 / FP4: tests/backends/ascend/test_compress.py checks that it refuses)."""
    out = []
    for p in params("compress"):
        backend, case, dtype = p.values
        for mode in ("plain",) if backend == "ascend" else ("plain", "exact"):
            out.append(pytest.param(backend, case, dtype, mode, id=f"{p.id},{mode}", marks=p.marks))
    return out


def _copies(args, to=lambda t: t):
    """Own copies of the tensors (the call updates state and pool in place), through `to`."""
    def one(a):
        if isinstance(a, DecodeRows):
            return DecodeRows(to(a.slots.clone()), to(a.positions.clone()))
        return to(a.clone()) if isinstance(a, torch.Tensor) else a
    return [one(a) for a in args]


@pytest.mark.parametrize("backend,case,dtype,mode", _params())
def test_compress(backend, case, dtype, mode):
    tagged, _ = case.inputs(mode=mode)
    args = kernel_args(tagged, dtype)
    fn = impl("compress", backend)
    if backend == "ascend" and isinstance(args[LAYOUT], DecodeRows):
        fn = partial(compress_rows_on_host, fn)  # the Ascend kernel plans on the host, as AscendOps does
    mine = _copies(args, device_of(backend))
    out = fn(*mine)
    ref_args = _copies(args)
    ref = REF.compress(*ref_args)

    assert out.dtype == ref.dtype == dtype
    for k in STATE:
        assert torch.equal(mine[k].cpu(), ref_args[k]), "compressor state differs from the reference's"
    share_off = 0.01 if mode == "exact" else 0.0
    for what, got, want in (("entries", out, ref), ("pool", mine[POOL], ref_args[POOL])):
        check_elementwise(got, want, *TOL_SAME[dtype], f"{what} vs reference", share_off=share_off)
    if mode == "plain":
        truth_args = f64(_copies(args))
        truth = REF.compress(*truth_args)
        if truth.numel():  # a step may close no window
            check_as_ref(out, ref, truth, dtype, "entries vs float64 reference")
        check_as_ref(mine[POOL], ref_args[POOL], truth_args[POOL], dtype, "pool vs float64 reference")
