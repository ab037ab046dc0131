"""CUDA-backend Triton kernels for the small ops: what is specific to the CUDA kernels' tiling (wide
rms_norm rows in 8192-wide chunks, hc_pre's K blocks split across programs) and rope's layouts.
The per-op cases over every backend are tests/conformance/test_ops.py.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set here
before triton is imported); with one they run on it. Ground truth is the reference backend in fp64
on the same (already rounded) inputs; each kernel result must be as close to it as the reference
itself is when run in the working dtype (fp32 / bf16), within a small floor.
"""

import pytest
import torch

from backends.cuda.kernels import mhc, norm_rope
from backends.conformance import (
    REF,
    check_as_ref,
    hc_check,
    hc_params,
    rng,
)

pytestmark = pytest.mark.gpu  # bench/gpu_check.sh runs these natively on a GPU

DEV = "cuda" if torch.cuda.is_available() else "cpu"
D64 = torch.float64
BF16 = torch.bfloat16
DTYPES = [torch.float32, BF16]


def dev(t):
    return t.to(DEV)


# ---------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("N", [6000, 8192, 12000])  # 12000: reduction in 8192-wide chunks
def test_rms_norm_wide_rows_blocked(N):
    r = rng(N)
    x, w = r(3, N).to(BF16), r(N).float()  # bf16 activations, fp32 weight
    out = norm_rope.rms_norm(dev(x), dev(w), 1e-6)
    check_as_ref(out, REF.rms_norm(x, w, 1e-6), REF.rms_norm(x.to(D64), w.to(D64), 1e-6), BF16, "rms_norm wide")


# ---------------------------------------------------------------- rope
def _inv_freq(r=64, base=10000.0):
    return (1.0 / base ** (torch.arange(0, r, 2, dtype=D64) / r)).float()


@pytest.mark.parametrize("shape", [(5, 64), (4, 128), (3, 2, 64)])
def test_rope_2d_and_rope_only(shape):
    x = rng(7)(*shape)
    pos = torch.tensor([0, 1, 5, 1000, 65535][: shape[0]])
    inv = _inv_freq(64, 160000.0)
    out = norm_rope.rope(dev(x), dev(pos), dev(inv))
    torch.testing.assert_close(out.cpu(), REF.rope(x, pos, inv), rtol=0, atol=4e-6)


def test_rope_inverse_round_trip():
    x = rng(3)(129, 4, 128)
    pos = torch.arange(129) * 37
    inv = _inv_freq()
    back = norm_rope.rope(norm_rope.rope(dev(x), dev(pos), dev(inv)), dev(pos), dev(inv), inverse=True)
    torch.testing.assert_close(back.cpu(), x, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- mHC
def _hc_params(r, n, D, rows):
    return hc_params(r, n, D, rows, n_scale=rows // n)  # these tests feed 2 + n scales (hc_pre reads 3)


def _hc_check(X, fn, base, scale, iters, dtype):
    return hc_check(mhc.hc_pre, X, fn, base, scale, iters, dtype, to_device=dev)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_pre_near_real_size(dtype):
    n, D = 4, 1024  # nD = 4096: many K blocks, split across programs
    r = rng(400)
    _hc_check(r(2, n, D).to(dtype), *_hc_params(r, n, D, (2 + n) * n), 20, dtype)
