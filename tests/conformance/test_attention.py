"""Sparse attention over every backend with a kernel for it: reference, cuda (Triton; interpreted on
CPU without a GPU) and ascend (Triton-Ascend, interpreted), over the one case set
(backends/conformance/attention.py). The max error relative to max |truth| (the reference in
float64 on the same rounded inputs) stays within the kernel family's bound (`ATTENTION_TOL`)."""

import pytest

from backends.conformance import ATTENTION_TOL, impl, run_attention
from tests.conformance.harness import GPU, device_of, inputs, params


@pytest.mark.parametrize("backend,case,dtype", params("attention"))
def test_attention(backend, case, dtype):
    args, _ = inputs(case, dtype)
    # the kernels take block sizes (none on a GPU: the defaults are what runs there)
    blocks = {} if backend == "reference" or (backend == "cuda" and GPU) else case.extra["blocks"][backend]
    dev = device_of(backend)
    fn = impl("attention", backend)
    run_attention(lambda *a: fn(*a, **blocks), ATTENTION_TOL[backend], *args[:6], args[6], case.name, to_device=dev)
