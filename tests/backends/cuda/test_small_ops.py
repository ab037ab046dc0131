"""CUDA-backend Triton kernels for the small ops (rms_norm, rope, mHC, MoE gate) against the reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set here
before triton is imported); with one they run on it. Ground truth is the reference backend in fp64
on the same (already rounded) inputs; each kernel result must be as close to it as the reference
itself is when run in the working dtype (fp32 / bf16), within a small floor.
"""

import pytest
import torch

from backends.cuda.kernels import gate, mhc, norm_rope
from tests.kernel_cases import (
    REF,
    check_as_ref,
    gate_compare,
    gate_scores64,
    gate_truth,
    hc_check,
    hc_params,
    rng,
    tie_free,
)

pytestmark = pytest.mark.gpu  # bench/gpu_check.sh runs these natively on a GPU

DEV = "cuda" if torch.cuda.is_available() else "cpu"
D64 = torch.float64
BF16 = torch.bfloat16
TOKENS = [1, 3, 4, 5, 127, 128, 129]
DTYPES = [torch.float32, BF16]


def dev(t):
    return t.to(DEV)


# ---------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
def test_rms_norm(T, dtype):
    r = rng(T)
    x, w = (r(T, 96, s=3.0) + 0.5).to(dtype), (1 + r(96, s=0.2)).to(dtype)
    out = norm_rope.rms_norm(dev(x), dev(w), 1e-6)
    check_as_ref(out, REF.rms_norm(x, w, 1e-6), REF.rms_norm(x.to(D64), w.to(D64), 1e-6), dtype, "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_unweighted_heads(dtype):
    x = rng(1)(5, 3, 64).to(dtype)  # [T, H, d]: per-head norm, no weight
    out = norm_rope.rms_norm(dev(x), None, 1e-6)
    check_as_ref(out, REF.rms_norm(x, None, 1e-6), REF.rms_norm(x.to(D64), None, 1e-6), dtype, "rms_norm [T,H,d]")


@pytest.mark.parametrize("N", [6000, 8192, 12000])  # 12000: reduction in 8192-wide chunks
def test_rms_norm_wide_rows_blocked(N):
    r = rng(N)
    x, w = r(3, N).to(BF16), r(N).float()  # bf16 activations, fp32 weight
    out = norm_rope.rms_norm(dev(x), dev(w), 1e-6)
    check_as_ref(out, REF.rms_norm(x, w, 1e-6), REF.rms_norm(x.to(D64), w.to(D64), 1e-6), BF16, "rms_norm wide")


# ---------------------------------------------------------------- rope
def _inv_freq(r=64, base=10000.0):
    return (1.0 / base ** (torch.arange(0, r, 2, dtype=D64) / r)).float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
def test_rope(T, dtype):
    r = rng(100 + T)
    x = r(T, 3, 96).to(dtype)  # [T, H, d]: 32 nope dims, 64 rope dims
    pos = torch.randint(0, 70000, (T,), generator=torch.Generator().manual_seed(T))
    inv = _inv_freq()
    for inverse in (False, True):
        out = norm_rope.rope(dev(x), dev(pos), dev(inv), inverse)
        ref = REF.rope(x, pos, inv, inverse)
        check_as_ref(out, ref, REF.rope(x.to(D64), pos, inv, inverse), dtype, f"rope inverse={inverse}")
        # same fp32 formula for the angle: matches the reference in the working dtype tightly
        # (bf16: at most a rounding flip, one unit in the last place)
        tol = dict(rtol=0, atol=4e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-5)
        torch.testing.assert_close(out.cpu(), ref, **tol)
        assert torch.equal(out.cpu()[..., :32], x[..., :32]), "nope dims must be copied unchanged"


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
@pytest.mark.parametrize("T", TOKENS)
def test_hc_pre(T, dtype):
    n, D = 4, 96
    r = rng(200 + T)
    X = r(T, n, D).to(dtype)
    comb = _hc_check(X, *_hc_params(r, n, D, (2 + n) * n), 20, dtype)
    # the last Sinkhorn step normalises columns; rows converge more slowly
    torch.testing.assert_close(comb.cpu().sum(-2), torch.ones(T, n), rtol=0, atol=1e-4)
    torch.testing.assert_close(comb.cpu().sum(-1), torch.ones(T, n), rtol=0, atol=2e-2)


@pytest.mark.parametrize("iters", [1, 2])
def test_hc_pre_few_sinkhorn_iterations(iters):
    n, D = 4, 64
    r = rng(300 + iters)
    _hc_check(r(5, n, D), *_hc_params(r, n, D, (2 + n) * n), iters, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hc_pre_near_real_size(dtype):
    n, D = 4, 1024  # nD = 4096: many K blocks, split across programs
    r = rng(400)
    _hc_check(r(2, n, D).to(dtype), *_hc_params(r, n, D, (2 + n) * n), 20, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
def test_hc_post(T, dtype):
    n, D = 4, 96
    r = rng(500 + T)
    X, y = r(T, n, D).to(dtype), r(T, D).to(dtype)
    post = 2 * torch.sigmoid(r(T, n))
    comb = torch.softmax(r(T, n, n), -1)
    out = mhc.hc_post(dev(y), dev(X), dev(post), dev(comb))
    truth = REF.hc_post(y.to(D64), X.to(D64), post.to(D64), comb.to(D64))
    check_as_ref(out, REF.hc_post(y, X, post, comb), truth, dtype, "hc_post")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 4, 5, 129])
def test_hc_head(T, dtype):
    n, D = 4, 96
    r = rng(600 + T)
    X = r(T, n, D).to(dtype)
    fn, base, scale = _hc_params(r, n, D, n)
    out = mhc.hc_head(dev(X), dev(fn), dev(base), dev(scale), 1e-6, 1e-6)
    truth = REF.hc_head(X.to(D64), fn.to(D64), base.to(D64), scale.to(D64), 1e-6, 1e-6)
    check_as_ref(out, REF.hc_head(X, fn, base, scale, 1e-6, 1e-6), truth, dtype, "hc_head")


# ---------------------------------------------------------------- MoE gate
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
def test_moe_gate_topk_with_bias(T, dtype):
    E, D, k, rs = 64, 96, 6, 1.5
    r = rng(700 + T)
    x, W = r(T, D).to(dtype), r(E, D, s=D ** -0.5)
    bias = r(E, s=0.3)  # as large as the score spread: it changes the selection
    s = gate_scores64(x, W)
    sel = s + bias.to(D64)
    tie_free(sel, k)
    out = gate.moe_gate(dev(x), dev(W), dev(bias), None, None, k, rs)
    gate_compare(out, gate_truth(x, W, bias, None, None, k, rs), sel)
    if T >= 4:
        unbiased = s.topk(k, dim=-1).indices.sort(-1).values
        assert not torch.equal(unbiased, out[1].cpu().long().sort(-1).values), "the bias should steer some picks"


def test_moe_gate_bf16_weight_and_many_experts():
    E, D, k, rs = 384, 256, 8, 2.5  # bf16 x bf16 logits on the 16-bit dot path; E not a block multiple
    r = rng(800)
    x, W, bias = r(5, D).to(BF16), r(E, D, s=D ** -0.5).to(BF16), r(E, s=0.1)
    s = gate_scores64(x, W)
    out = gate.moe_gate(dev(x), dev(W), dev(bias), None, None, k, rs)
    gate_compare(out, gate_truth(x, W, bias, None, None, k, rs), s + bias.to(D64))


@pytest.mark.parametrize("T", [1, 5, 129])
def test_moe_gate_hash(T):
    E, D, k, V, rs = 64, 96, 6, 50, 1.5
    r = rng(900 + T)
    x, W = r(T, D).to(BF16), r(E, D, s=D ** -0.5)
    g = torch.Generator().manual_seed(T)
    tid2eid = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(V)])  # int64 [V, k]
    toks = torch.randint(0, V, (T,), generator=g)
    w, ids = gate.moe_gate(dev(x), dev(W), None, dev(tid2eid), dev(toks), k, rs)
    tw, tids = gate_truth(x, W, None, tid2eid, toks, k, rs)
    assert ids.dtype == torch.int32 and torch.equal(ids.cpu(), tids)  # hash order is the table's
    torch.testing.assert_close(w.cpu().double(), tw, rtol=1e-5, atol=1e-6)


def test_moe_gate_ties_go_to_the_lowest_index():
    E, D, k = 64, 96, 6
    x = torch.zeros(3, D)  # every score is sqrt(ln 2): a full tie
    w, ids = gate.moe_gate(dev(x), dev(torch.randn(E, D)), dev(torch.zeros(E)), None, None, k, 1.5)
    assert torch.equal(ids.cpu(), torch.arange(k, dtype=torch.int32).expand(3, k))
    torch.testing.assert_close(w.cpu(), torch.full((3, k), 1.5 / k))
