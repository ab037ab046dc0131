"""Number formats and fake quantisation (v4/quant.py) against hand-computed values.

Expected numbers below are worked out by hand from the format definitions (spec §2.11, §4.3):
e4m3 = 1 sign, 4 exponent (bias 7), 3 mantissa bits, no inf, 0x7F/0xFF NaN, max 448;
UE8M0 byte b = 2^(b-127); e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}.
"""

import math

import pytest
import torch

from v4.quant import (
    E2M1_VALUES,
    QuantizedWeight,
    act_quant_fp8,
    dequant_fp4,
    dequant_fp8_block,
    e4m3_decode,
    e4m3_encode,
    fp4_decode,
    fp4_encode,
    fp4_fake_quant,
    fp4_pack,
    fp4_unpack,
    hadamard,
    kv_fake_quant_fp8,
    pow2_scale,
    quant_fp4,
    quant_fp8_block,
    ue8m0_decode,
    ue8m0_encode,
)


def u8(*vals):
    return torch.tensor(vals, dtype=torch.uint8)


def f32(*vals):
    return torch.tensor(vals, dtype=torch.float32)


# ---------------------------------------------------------------- e4m3


def test_e4m3_decode_bit_patterns():
    bits = u8(0x38, 0x7E, 0x01, 0xB8, 0x08, 0x07, 0x40, 0x3C, 0x00, 0xFE)
    # 0x38 = 0|0111|000 -> 2^0; 0x7E = 0|1111|110 -> 1.75*2^8; 0x01 subnormal 1/8*2^-6;
    # 0x08 smallest normal 2^-6; 0x07 = 7/8*2^-6; 0x40 = 2^1; 0x3C = 1.5*2^0; 0xFE = -448.
    expected = f32(1.0, 448.0, 2.0**-9, -1.0, 2.0**-6, 7 * 2.0**-9, 2.0, 1.5, 0.0, -448.0)
    got = e4m3_decode(bits)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    # same bytes presented as float8 and as int8
    assert torch.equal(e4m3_decode(bits.view(torch.float8_e4m3fn)), expected)
    assert torch.equal(e4m3_decode(bits.view(torch.int8)), expected)
    assert torch.isnan(e4m3_decode(u8(0x7F, 0xFF))).all()
    negzero = e4m3_decode(u8(0x80))
    assert negzero.item() == 0.0 and torch.signbit(negzero).item()


def test_e4m3_encode_rounding_and_saturation():
    x = f32(
        1.0,
        1.0625,  # midway 1.0 (mantissa 000) / 1.125 (001): even -> 1.0
        1.1875,  # midway 1.125 (001) / 1.25 (010): even -> 1.25
        1.0624,
        1.0626,
        1000.0,
        -1000.0,
        464.0,  # beyond max: saturates, no NaN
        2.0**-10,  # midway 0 / 2^-9: even -> 0
        3 * 2.0**-10,  # midway 2^-9 (0x01) / 2^-8 (0x02): even -> 2^-8
        -3.0,
    )
    expected_bits = u8(0x38, 0x38, 0x3A, 0x38, 0x39, 0x7E, 0xFE, 0x7E, 0x00, 0x02, 0xC4)
    q = e4m3_encode(x)
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.view(torch.uint8), expected_bits)
    assert torch.equal(
        e4m3_decode(q),
        f32(1.0, 1.0, 1.25, 1.0, 1.125, 448.0, -448.0, 448.0, 0.0, 2.0**-8, -3.0),
    )


# ---------------------------------------------------------------- ue8m0


def test_ue8m0_decode():
    b = u8(127, 130, 120, 128, 0, 254)
    expected = f32(1.0, 8.0, 2.0**-7, 2.0, 2.0**-127, 2.0**127)
    assert torch.equal(ue8m0_decode(b), expected)
    assert torch.equal(ue8m0_decode(b.view(torch.float8_e8m0fnu)), expected)
    assert math.isnan(ue8m0_decode(u8(255)).item())


def test_ue8m0_encode():
    s = ue8m0_encode(f32(1.0, 8.0, 2.0**-7, 2.0**-127, 2.0**127))
    assert s.dtype == torch.float8_e8m0fnu
    assert s.view(torch.uint8).tolist() == [127, 130, 120, 0, 254]
    for bad in (3.0, 0.0, -2.0, math.inf, math.nan, 2.0**-128):
        with pytest.raises(ValueError):
            ue8m0_encode(f32(1.0, bad))


# ---------------------------------------------------------------- pow2_scale


def test_pow2_scale_fp8_boundaries():
    amax = f32(448.0, 449.0, 224.0, 896.0, 897.0, 1.0, 0.0)
    # 1/448 = 0.00223 lies in (2^-9, 2^-8]; 1e-4/448 = 2.23e-7 lies in (2^-23, 2^-22]
    expected = f32(1.0, 2.0, 0.5, 2.0, 4.0, 2.0**-8, 2.0**-22)
    got = pow2_scale(amax, 448.0, 1e-4)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_pow2_scale_exact_power_boundary():
    k = torch.arange(-20, 21)
    boundary = 448.0 * torch.pow(2.0, k.double())
    exact = torch.pow(2.0, k.double()).float()
    assert torch.equal(pow2_scale(boundary.float(), 448.0, 1e-4), exact)
    # one float32 ulp above the boundary must go up a power
    above = torch.nextafter(boundary.float(), torch.tensor(math.inf))
    assert torch.equal(pow2_scale(above, 448.0, 1e-4), 2 * exact)


def test_pow2_scale_fp4():
    amax = f32(6.0, 6.01, 3.0, 12.0, 1.0, 0.0)
    got = pow2_scale(amax, 6.0, 6 * 2.0**-126)
    assert torch.equal(got, f32(1.0, 2.0, 0.5, 2.0, 0.25, 2.0**-126))


# ---------------------------------------------------------------- fp4 codes


def test_fp4_encode_grid_and_ties():
    x = f32(0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0)
    # ties: .25->0, .75->1.0, 1.25->1.0, 1.75->2.0, 2.5->2.0, 3.5->4.0, 5->4.0; >6 saturates
    expected = [0, 1, 2, 3, 4, 5, 6, 7, 0, 2, 2, 4, 4, 6, 6, 7, 7]
    assert fp4_encode(x).tolist() == expected
    assert fp4_encode(-x[1:]).tolist() == [c | 8 for c in expected[1:]]
    # just off the midpoints
    assert fp4_encode(f32(0.26, 0.74, 1.26, 1.74, 2.51, 3.49, 5.01)).tolist() == [1, 1, 3, 3, 5, 5, 7]
    assert fp4_encode(f32(-6.0, -0.5, -0.1)).tolist() == [15, 9, 8]
    assert fp4_encode(f32(1.0)).dtype == torch.uint8


def test_fp4_decode_table():
    got = fp4_decode(torch.arange(16, dtype=torch.uint8))
    assert got.dtype == torch.float32
    assert got.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert torch.signbit(got[8]).item()
    assert tuple(got.tolist()) == E2M1_VALUES


def test_fp4_pack_nibble_order():
    packed = fp4_pack(u8(1, 2, 15, 2, 2, 15))
    assert packed.dtype == torch.int8
    # element 2k low nibble, 2k+1 high nibble: [1,2] -> 0x21; [15,2] -> 0x2F; [2,15] -> 0xF2
    assert packed.view(torch.uint8).tolist() == [0x21, 0x2F, 0xF2]
    assert packed.tolist() == [0x21, 0x2F, 0xF2 - 256]
    with pytest.raises(ValueError):
        fp4_pack(u8(1, 2, 3))


def test_fp4_unpack():
    assert fp4_unpack(u8(0x2F)).tolist() == [15, 2]
    assert fp4_unpack(torch.tensor([[0x21, 0xF2 - 256]], dtype=torch.int8)).tolist() == [[1, 2, 2, 15]]
    codes = torch.randint(0, 16, (3, 5, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fp4_unpack(fp4_pack(codes)), codes)


# ---------------------------------------------------------------- weight dequantisation


def test_dequant_fp4_hand_row():
    packed = torch.zeros(2, 32, dtype=torch.uint8)
    # row 0, block 0 (scale 2^-1): 0x21 -> [0.5, 1.0]; 0xF7 -> [6, -6]; 0x9C -> [-2, -0.5]
    packed[0, 0], packed[0, 1], packed[0, 2] = 0x21, 0xF7, 0x9C
    # row 0, block 1 (scale 2^2): byte 16 = elements 32, 33: 0x53 -> [1.5, 3.0]
    packed[0, 16] = 0x53
    # row 1 (scale 2^3 on block 0): 0x0E -> [-4, 0]
    packed[1, 0] = 0x0E
    scale = u8(126, 129, 130, 127).view(2, 2).view(torch.float8_e8m0fnu)
    w = dequant_fp4(packed.view(torch.int8), scale)
    assert w.shape == (2, 64) and w.dtype == torch.float32
    expected = torch.zeros(2, 64)
    expected[0, :6] = f32(0.25, 0.5, 3.0, -3.0, -1.0, -0.25)
    expected[0, 32:34] = f32(6.0, 12.0)
    expected[1, 0] = -32.0
    assert torch.equal(w, expected)
    assert torch.equal(dequant_fp4(packed, f32(0.5, 4.0, 8.0, 1.0).view(2, 2)), expected)
    qw = QuantizedWeight("fp4", packed.view(torch.int8), scale)
    assert qw.shape == (2, 64)
    assert torch.equal(qw.dequantize(), expected)


def test_dequant_fp8_block_partial_blocks():
    out, inp = 130, 260  # scale [2, 3]: last block row has 2 rows, last block column 4 columns
    w = torch.full((out, inp), 0x40, dtype=torch.uint8)  # 2.0 everywhere
    w[5, 7] = 0x3C  # 1.5
    w[129, 259] = 0xC4  # 1|1000|100 = -3.0
    scale = u8(127, 128, 129, 126, 125, 130).view(2, 3)  # [[1, 2, 4], [0.5, 0.25, 8]]
    W = dequant_fp8_block(w.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu))
    assert W.shape == (out, inp) and W.dtype == torch.float32
    hand = {
        (0, 0): 2.0, (127, 127): 2.0, (5, 7): 1.5,
        (0, 128): 4.0, (127, 255): 4.0,
        (0, 256): 8.0, (127, 259): 8.0,
        (128, 0): 1.0, (129, 127): 1.0,
        (128, 128): 0.5, (129, 255): 0.5,
        (128, 256): 16.0, (129, 259): -24.0,
    }
    for (i, j), v in hand.items():
        assert W[i, j].item() == v, (i, j)
    # the same scale as raw bytes and as float multipliers
    assert torch.equal(dequant_fp8_block(w, scale), W)
    assert torch.equal(dequant_fp8_block(w, f32(1, 2, 4, 0.5, 0.25, 8).view(2, 3)), W)
    qw = QuantizedWeight("fp8", w.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu))
    assert qw.shape == (out, inp)
    assert torch.equal(qw.dequantize(torch.bfloat16), W.bfloat16())
    with pytest.raises(ValueError):
        dequant_fp8_block(w, u8(127, 127).view(1, 2))


# ---------------------------------------------------------------- weight quantisation round trips


def _spread_weight(out, inp, seed):
    g = torch.Generator().manual_seed(seed)
    mags = 10.0 ** torch.empty(out, 1).uniform_(-4, 3, generator=g)
    return torch.randn(out, inp, generator=g) * mags


def test_quant_fp8_block_round_trip():
    w = _spread_weight(130, 260, seed=1)
    w[:128, 128:256] = 0.0  # an all-zero block takes the floor scale
    q, s = quant_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (2, 3)
    sf = ue8m0_decode(s)
    assert sf[0, 1].item() == 2.0**-22
    deq = dequant_fp8_block(q, s)
    s_full = sf.repeat_interleave(128, 0)[:130].repeat_interleave(128, 1)[:, :260]
    # half an e4m3 ulp: 2^-4 relative in the normal range, 2^-10 * s in the subnormal range
    bound = torch.maximum(w.abs() * 2.0**-4, s_full * 2.0**-10)
    assert ((deq - w).abs() <= bound).all()
    # the scale is the smallest power of two that fits: block amax / s lands in (224, 448]
    for bi in range(2):
        for bj in range(3):
            blk = w[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128]
            if blk.abs().max() > 0:
                r = blk.abs().max().item() / sf[bi, bj].item()
                assert 224.0 < r <= 448.0


def test_quant_fp4_round_trip():
    w = _spread_weight(6, 128, seed=2)
    packed, s = quant_fp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (6, 64)
    assert s.dtype == torch.float8_e8m0fnu and s.shape == (6, 4)
    sf = ue8m0_decode(s)
    deq = dequant_fp4(packed, s)
    v = (w.view(6, 4, 32) / sf[..., None]).view(6, 128)
    dv = (deq.view(6, 4, 32) / sf[..., None]).view(6, 128)
    # half the e2m1 spacing: .25 on [0, 2], .5 on (2, 4], 1 on (4, 6]
    half = torch.where(v.abs() <= 2, 0.25, torch.where(v.abs() <= 4, 0.5, 1.0))
    assert ((dv - v).abs() <= half).all()
    r = w.view(6, 4, 32).abs().amax(-1) / sf
    assert ((r > 3.0) & (r <= 6.0)).all()


def test_quant_fp4_hand_block():
    w = torch.zeros(1, 32)
    w[0, :4] = f32(12.0, 5.0, -1.3, 0.5)  # amax 12 -> scale 2; /2 = 6, 2.5->2, -0.65->-0.5, .25->0
    packed, s = quant_fp4(w)
    assert s.view(torch.uint8).tolist() == [[128]]
    assert fp4_unpack(packed)[0, :4].tolist() == [7, 4, 9, 0]
    assert packed.view(torch.uint8)[0, :2].tolist() == [0x47, 0x09]


# ---------------------------------------------------------------- activation / KV fake quant


def test_act_quant_fp8_hand_vector():
    x = torch.zeros(2, 260)
    # row 0 block 0: amax 896 -> s = 2 (896/448 = 2 exactly)
    x[0, :5] = f32(896.0, 3.0, 3.3, -3.3, 0.01)
    # row 0 block 1: amax 1 -> s = 2^-8
    x[0, 128:131] = f32(1.0, 0.3, -0.3)
    # row 0 final partial block (4 channels): amax 5 -> s = 2^-6
    x[0, 256:258] = f32(5.0, 0.1)
    # row 1 block 0: amax 900 -> s = 4
    x[1, :2] = f32(900.0, -900.0)
    y = act_quant_fp8(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    expected = torch.zeros(2, 260)
    # 3.3/2 = 1.65 -> 1.625 (spacing 1/8); 0.01/2 = 2.56*2^-9 -> 3*2^-9 (subnormal)
    expected[0, :5] = f32(896.0, 3.0, 3.25, -3.25, 3 * 2.0**-8)
    # 0.3*256 = 76.8 -> 80 (spacing 8 on [64,128))
    expected[0, 128:131] = f32(1.0, 80 / 256, -80 / 256)
    # 5*64 = 320 (exact, spacing 32); 0.1*64 = 6.4 -> 6.5 (spacing .5)
    expected[0, 256:258] = f32(5.0, 6.5 / 64)
    # 900/4 = 225 -> 224 (spacing 16 on [128,256))
    expected[1, :2] = f32(896.0, -896.0)
    assert torch.equal(y, expected)


def test_act_quant_fp8_dtype_and_leading_dims():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 256, generator=g) * 5).bfloat16()
    y = act_quant_fp8(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    # each token quantised independently: same as doing rows one by one
    flat = x.reshape(6, 256)
    rows = torch.stack([act_quant_fp8(flat[i : i + 1])[0] for i in range(6)])
    assert torch.equal(y.reshape(6, 256), rows)
    # half an e4m3 ulp is at most 2^-4 relative above the subnormal range
    assert ((y.float() - x.float()).abs() <= x.float().abs() * 2.0**-4 + 2.0**-10).all()
    # fake quant is idempotent
    assert torch.equal(act_quant_fp8(y), y)


def test_kv_fake_quant_fp8():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 192, generator=g)
    x[0, 0, :64] = 0.0
    x[0, 0, 0] = 896.0  # nope block 0: s = 2
    x[0, 0, 64:128] = 0.0
    x[0, 0, 64] = 1.0  # nope block 1: s = 2^-8 (would be 2 with 128-wide blocks)
    x[0, 0, 65] = 0.01  # 0.01*256 = 2.56 -> 2.5 (spacing .25)
    y = kv_fake_quant_fp8(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[..., 128:].view(torch.int32), x[..., 128:].view(torch.int32))
    assert y[0, 0, 0].item() == 896.0
    assert y[0, 0, 64].item() == 1.0
    assert y[0, 0, 65].item() == 2.5 / 256
    assert torch.equal(y[..., :128], act_quant_fp8(x[..., :128], 64))
    xb = x.bfloat16()
    yb = kv_fake_quant_fp8(xb)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb[..., 128:].view(torch.int16), xb[..., 128:].view(torch.int16))


# ---------------------------------------------------------------- Hadamard


def _sylvester(d):
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def test_hadamard_basis_vectors_d4():
    e = torch.eye(4)
    assert torch.equal(hadamard(e[0]), f32(0.5, 0.5, 0.5, 0.5))
    assert torch.equal(hadamard(e[1]), f32(0.5, -0.5, 0.5, -0.5))
    assert torch.equal(hadamard(e[2]), f32(0.5, 0.5, -0.5, -0.5))
    assert torch.equal(hadamard(e[3]), f32(0.5, -0.5, -0.5, 0.5))


def test_hadamard_matches_sylvester_8x8():
    H8 = _sylvester(8)
    assert H8[3].tolist() == [1, -1, -1, 1, 1, -1, -1, 1]  # row 0b011: (-1)^popcount(3 & j)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 8, generator=g)
    torch.testing.assert_close(hadamard(x), x @ H8.T / math.sqrt(8), rtol=1e-6, atol=1e-6)


def test_hadamard_d128_and_involution():
    d = 128
    idx = torch.arange(d)
    popc = torch.zeros(d, d, dtype=torch.long)
    anded = idx[:, None] & idx[None, :]
    for bit in range(7):
        popc += (anded >> bit) & 1
    H = (1 - 2 * (popc % 2)).float()  # (-1)^popcount(i & j), independent of the recursion
    assert torch.equal(H, _sylvester(d))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, d, generator=g)
    torch.testing.assert_close(hadamard(x), x @ H.T / math.sqrt(d), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hadamard(hadamard(x)), x, rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    assert hadamard(xb).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        hadamard(torch.zeros(3, 12))


# ---------------------------------------------------------------- FP4 fake quant


def test_fp4_fake_quant_hand_values():
    x = torch.zeros(1, 96)
    # block 0: amax 12 -> s = 2; 5/2 = 2.5 -> 2 (tie even); 7/2 = 3.5 -> 4 (tie even);
    # -1.3/2 = -.65 -> -.5; .5/2 = .25 -> 0 (tie even)
    x[0, :5] = f32(12.0, 5.0, 7.0, -1.3, 0.5)
    # block 1: amax 1 -> 1/6 in (1/8, 1/4] -> s = 1/4; .3*4 = 1.2 -> 1; .7*4 = 2.8 -> 3; -.9*4 = -3.6 -> -4
    x[0, 32:36] = f32(1.0, 0.3, 0.7, -0.9)
    # block 2 all zero stays zero
    y = fp4_fake_quant(x)
    expected = torch.zeros(1, 96)
    expected[0, :5] = f32(12.0, 4.0, 8.0, -1.0, 0.0)
    expected[0, 32:36] = f32(1.0, 0.25, 0.75, -1.0)
    assert torch.equal(y, expected)
    yb = fp4_fake_quant(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb.float(), expected)
