"""Sparse attention over every backend with a kernel for it: reference, cuda (Triton; interpreted on
CPU without a GPU) and ascend (Triton-Ascend, interpreted), over the one case set
(backends/conformance/attention.py: prefills at the boundary token counts, decode and packed
batches). The max error relative to max |truth| (the reference in float64 on the same rounded
inputs) stays within the kernel family's bound (`ATTENTION_TOL`); cases that name a property
(rows that see only the sink, a silent head, ...) check it too."""

import pytest
import torch

from backends.conformance import ATTENTION_TOL, attention_truth, impl, run_attention
from tests.conformance.harness import GPU, device_of, inputs, params


@pytest.mark.parametrize("backend,case,dtype", params("attention"))
def test_attention(backend, case, dtype):
    (q, wkv, widx, ckv, cidx, sink, scale), _ = inputs(case, dtype)
    # the kernels take block sizes (none on a GPU: the defaults are what runs there)
    blocks = {} if backend == "reference" or (backend == "cuda" and GPU) else case.extra["blocks"].get(backend, {})
    dev = device_of(backend)
    fn = impl("attention", backend)

    def attend(*args):
        return fn(*args, **blocks)

    out = run_attention(attend, ATTENTION_TOL[backend], q, wkv, widx, ckv, cidx, sink, scale, case.name,
                        to_device=dev).cpu()
    extra = case.extra
    for t in extra.get("zero_rows", ()):
        assert (out[t] == 0).all(), f"row {t} sees only the sink: its output must be 0"
    if "silent_head" in extra:
        assert out[:, extra["silent_head"]].abs().max() < 1e-15
    if extra.get("same_without_comp"):
        alone = attend(*map(dev, (q, wkv, widx, None, None, sink)), scale).cpu()
        assert torch.equal(out, alone), "a zero-width compressed list must change nothing"
    if extra.get("output_rounding_only"):
        truth = attention_truth(q, wkv, widx, ckv, cidx, sink, scale)
        assert float((out.double() - truth).abs().max()) <= 2**-8 * float(truth.abs().max())
