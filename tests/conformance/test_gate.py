"""The MoE gate across backends: the cuda and ascend kernel families compute the routing scores with the
one shared sqrt-softplus helper (backends/triton_common.py), so on logits around softplus' threshold and
far below it they agree bit for bit with each other and pick the reference's experts."""

import pytest
import torch

from tests.backends.test_triton_common import _apply, _same_bits, tc


def _gate_inputs(z: torch.Tensor):
    """x one-hot per token, so that the logits x W^T are the columns of W exactly, in every kernel."""
    T, E = z.shape
    x = torch.eye(T, dtype=torch.float32)
    return x, z.t().contiguous()  # W [E, T]: logits[t] = W[:, t] = z[t]


def _gate_logits() -> torch.Tensor:
    torch.manual_seed(3)
    T, E = 12, 24
    z = torch.randn(T, E) * 4
    z[0] = torch.linspace(19.5, 20.5, E)  # across the threshold
    z[1] = torch.linspace(-120.0, -30.0, E)  # large negative: softplus = exp(z), down to subnormals
    z[2, :12] = torch.linspace(19.9, 20.1, 12)
    z[2, 12:] = torch.linspace(-95.0, -85.0, 12)
    z[3] = 20.0 + torch.arange(E) * 1e-3
    return z


@pytest.mark.parametrize("hashed", [False, True])
def test_cuda_and_ascend_gates_route_bit_identically_on_extreme_logits(hashed):
    """Both gates compute the scores with the one helper: bit-identical to each other; the same experts
    as the reference, and weights within an ulp or two of its (torch's CPU exp/log/sqrt round their
    own way, so bit equality with the reference is not a property either kernel can have)."""
    from backends.ascend.kernels import gate as agate
    from backends.cuda.kernels import gate as cgate
    from backends.reference.ops import ReferenceOps

    z = _gate_logits()
    x, W = _gate_inputs(z)
    T, E = z.shape
    k = 4
    if hashed:
        torch.manual_seed(4)
        tid2eid = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
        toks, bias = torch.arange(T, dtype=torch.int32), None
    else:
        tid2eid = toks = None
        bias = torch.zeros(E)
    cw, cids = cgate.moe_gate(x, W, bias, tid2eid, toks, k, 1.5)
    aw, aids = agate.moe_gate(x, W, bias, tid2eid, toks, k, 1.5)
    _same_bits(cw, aw)
    assert torch.equal(cids, aids)
    rw, rids = ReferenceOps().moe_gate(x, W, bias, tid2eid, toks, k, 1.5)
    assert torch.equal(cids, rids)
    assert ((cw.double() - rw.double()).abs() <= 4 * rw.double().abs() * 2.0 ** -23 + 2.0 ** -140).all()
    # the scores themselves: sqrt(z) exactly wherever the logit is above the threshold
    s = _apply(tc.OP_SQRT_SOFTPLUS, z.flatten()).view(T, E)
    _same_bits(s[z > 20], torch.sqrt(z[z > 20].double()).float())
