"""Number formats of the official checkpoints and the run-time quantisation of `exact` mode.

Formats (spec §4.3, §2.11):
- FP8 e4m3 weights with one UE8M0 (power-of-two) scale per 128x128 block.
- FP4 e2m1 routed experts: two values per int8 byte, element 2k in the LOW nibble, one UE8M0
  scale per 32 input channels.
- exact mode: FP8 activation quantisation per token per 128 channels; FP8 fake-quant of the KV
  "nope" dims in blocks of 64; Hadamard + FP4 fake-quant (blocks of 32) in the indexer.

Everything is plain torch and runs on any device. Scales are always powers of two, so dividing
or multiplying by them is exact; the only rounding is the cast onto the e4m3 / e2m1 grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Lower bounds on a block's amax before the scale is derived (spec §2.11): they keep all-zero
# blocks from producing a zero (unencodable) scale.
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = FP4_MAX * 2.0**-126

# Decision points between neighbouring e2m1 magnitudes (codes k and k+1). A value exactly on a
# midpoint goes to the code with an even mantissa bit, i.e. the even code: round-to-nearest-even.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@dataclass
class QuantizedWeight:
    """A weight in its stored low-precision form.

    fmt "fp8": data float8_e4m3fn [out, in], scale [ceil(out/128), ceil(in/128)] (float8_e8m0fnu or float32).
    fmt "fp4": data int8 [out, in // 2] (packed e2m1), scale [out, in // 32] (float8_e8m0fnu or float32).
    """

    fmt: str
    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        out, n = self.data.shape
        return (out, n * 2) if self.fmt == "fp4" else (out, n)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.fmt == "fp8":
            return dequant_fp8_block(self.data, self.scale).to(dtype)
        if self.fmt == "fp4":
            return dequant_fp4(self.data, self.scale).to(dtype)
        raise ValueError(f"unknown quantized format {self.fmt!r}")


# --------------------------------------------------------------------------------------------
# scalar formats


def _exp2_int(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 2**e for integer e, built from the bit pattern.

    torch.exp2/pow are not guaranteed to be exact on every backend; scales must be.
    """
    e = e.to(torch.int32)
    normal = (e + 127).clamp(1, 254) << 23
    # 2^-127 .. 2^-149 are float32 subnormals: a single mantissa bit.
    subnormal = torch.ones_like(e) << (e + 149).clamp(0, 22)
    bits = torch.where(e >= -126, normal, subnormal)
    out = bits.view(torch.float32)
    out = torch.where(e > 127, torch.full_like(out, math.inf), out)
    return torch.where(e < -149, torch.zeros_like(out), out)


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x
    if x.element_size() != 1:
        raise ValueError(f"expected a 1-byte tensor (float8 or uint8), got {x.dtype}")
    return x.view(torch.uint8)


def e4m3_decode(x: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn (or its uint8/int8 bit patterns) -> float32."""
    if x.dtype != torch.float8_e4m3fn:
        x = _as_bytes(x).view(torch.float8_e4m3fn)
    return x.to(torch.float32)


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """float -> float8_e4m3fn, round-to-nearest-even, saturating at +-448.

    The clamp makes saturation explicit: whether torch's own cast saturates or yields NaN for
    out-of-range values (e4m3fn has no inf) has differed across versions and backends.
    NaN inputs stay NaN.
    """
    return x.to(torch.float32).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def ue8m0_decode(b: torch.Tensor) -> torch.Tensor:
    """UE8M0 byte b (float8_e8m0fnu or uint8) -> float32 2**(b-127); b=255 is NaN.

    Works on the raw bytes because float8_e8m0fnu arithmetic/casts are not available everywhere.
    """
    e = _as_bytes(b).to(torch.int32)
    out = _exp2_int(e - 127)
    return torch.where(e == 255, torch.full_like(out, math.nan), out)


def ue8m0_encode(s: torch.Tensor) -> torch.Tensor:
    """Power-of-two float scales -> float8_e8m0fnu (exact). Anything else raises ValueError."""
    s = s.to(torch.float32)
    mant, exp = torch.frexp(s)
    # frexp gives s = mant * 2**exp with mant in [0.5, 1): powers of two have mant == 0.5.
    e = exp.to(torch.int32) - 1
    ok = torch.isfinite(s) & (mant == 0.5) & (e >= -127) & (e <= 127)
    if not bool(ok.all()):
        bad = s[~ok].flatten()[:4].tolist()
        raise ValueError(
            f"ue8m0_encode needs powers of two in [2^-127, 2^127]; got e.g. {bad}"
        )
    return (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def pow2_scale(amax: torch.Tensor, qmax: float, floor: float) -> torch.Tensor:
    """2**ceil(log2(max(amax, floor) / qmax)) in float32.

    The exponent comes from frexp rather than log2 so that an exact power of two (amax = qmax*2^k)
    gives 2^k and not 2^(k+1) through a log2 rounding error. The quotient itself is rounded to
    float32 first (the spec formula divides before taking the log).
    """
    a = amax.to(torch.float32).clamp_min(floor) / qmax
    mant, exp = torch.frexp(a)
    e = exp.to(torch.int32) - (mant == 0.5).to(torch.int32)
    # inf / NaN amax propagate instead of turning into a bogus finite scale.
    return torch.where(torch.isfinite(a), _exp2_int(e), a)


# --------------------------------------------------------------------------------------------
# FP4 e2m1


def fp4_encode(x: torch.Tensor) -> torch.Tensor:
    """float -> uint8 e2m1 codes 0..15 (bit 3 = sign), round-to-nearest-even, saturating at 6.

    The sign follows signbit, so small negatives (and -0.0) give code 8 (-0.0), as a hardware
    cast does. NaN has no e2m1 encoding and maps to +-0.
    """
    x = x.to(torch.float32)
    a = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for k, mid in enumerate(_E2M1_MIDPOINTS):
        # between codes k and k+1 the tie belongs to the even one of the two
        step = (a > mid) if k % 2 == 0 else (a >= mid)
        code += step.to(torch.uint8)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def fp4_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 e2m1 codes 0..15 -> float32."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.to(torch.long)]


def fp4_pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., n] (n even) -> int8 [..., n//2]; element 2k low nibble, 2k+1 high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"fp4_pack needs an even last dim, got {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    if bool((codes > 15).any()):
        raise ValueError("fp4_pack: codes must be in 0..15")
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.view(torch.int8)


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [..., m] -> uint8 codes [..., 2m] (low nibble first)."""
    p = _as_bytes(packed)
    return torch.stack((p & 0x0F, p >> 4), dim=-1).flatten(-2)


# --------------------------------------------------------------------------------------------
# weights


def _scale_multiplier(scale: torch.Tensor) -> torch.Tensor:
    """Scale tensor as stored (float8_e8m0fnu / uint8 bytes) or already float -> float32 multiplier."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        return ue8m0_decode(scale)
    return scale.to(torch.float32)


def dequant_fp8_block(w: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """W[i,j] = e4m3(w[i,j]) * s[i//block, j//block] as float32 [out, in]."""
    out, inp = w.shape
    nb = (-(-out // block), -(-inp // block))
    if tuple(scale.shape) != nb:
        raise ValueError(
            f"fp8 weight {tuple(w.shape)} needs a scale of shape {nb}, got {tuple(scale.shape)}"
        )
    s = _scale_multiplier(scale)
    s = s.repeat_interleave(block, dim=0)[:out].repeat_interleave(block, dim=1)[:, :inp]
    return e4m3_decode(w) * s


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """W[i,j] = e2m1(nibble j of row i) * s[i, j//block] as float32 [out, 2*packed_cols]."""
    out, half = packed.shape
    inp = 2 * half
    if inp % block or tuple(scale.shape) != (out, inp // block):
        raise ValueError(
            f"fp4 weight [{out}, {inp}] (packed {tuple(packed.shape)}) needs a scale of shape "
            f"{(out, inp // block)} and in % {block} == 0, got scale {tuple(scale.shape)}"
        )
    vals = fp4_decode(fp4_unpack(packed)).view(out, inp // block, block)
    return (vals * _scale_multiplier(scale).unsqueeze(-1)).view(out, inp)


def quant_fp8_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> (float8_e4m3fn [out, in], float8_e8m0fnu [ceil(out/block), ceil(in/block)])."""
    out, inp = w.shape
    nbo, nbi = -(-out // block), -(-inp // block)
    wf = w.to(torch.float32)
    # zero padding cannot raise a block's amax, so partial edge blocks get their own true scale
    padded = torch.nn.functional.pad(wf, (0, nbi * block - inp, 0, nbo * block - out))
    amax = padded.view(nbo, block, nbi, block).abs().amax(dim=(1, 3))
    s = pow2_scale(amax, FP8_MAX, FP8_AMAX_FLOOR)
    s_full = s.repeat_interleave(block, dim=0)[:out].repeat_interleave(block, dim=1)[:, :inp]
    return e4m3_encode(wf / s_full), ue8m0_encode(s)


def quant_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] (in % block == 0) -> (int8 packed [out, in//2], float8_e8m0fnu [out, in//block])."""
    out, inp = w.shape
    if inp % block:
        raise ValueError(f"quant_fp4 needs in % {block} == 0, got {tuple(w.shape)}")
    wb = w.to(torch.float32).view(out, inp // block, block)
    s = pow2_scale(wb.abs().amax(dim=-1), FP4_MAX, FP4_AMAX_FLOOR)
    codes = fp4_encode(wb / s.unsqueeze(-1)).view(out, inp)
    return fp4_pack(codes), ue8m0_encode(s)


# --------------------------------------------------------------------------------------------
# run-time fake quantisation (exact mode, spec §2.11)


def _blocked(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """float32 view [..., nblocks, block] of x's last dim, zero-padded; also returns the true length."""
    n = x.shape[-1]
    nb = -(-n // block)
    xf = torch.nn.functional.pad(x.to(torch.float32), (0, nb * block - n))
    return xf.view(*x.shape[:-1], nb, block), n


def _unblocked(xb: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    return xb.flatten(-2)[..., :n].to(dtype)


def _block_fake_quant(x: torch.Tensor, block: int, fmax: float, amax_floor: float, encode, decode) -> torch.Tensor:
    """decode(encode(x / s)) * s in x's dtype, with one power-of-two scale s = pow2_scale(amax, fmax,
    amax_floor) per `block` channels of the last dim (the FP8 and FP4 fake quantisations)."""
    if x.shape[-1] == 0:
        return x.clone()
    xb, n = _blocked(x, block)
    s = pow2_scale(xb.abs().amax(dim=-1, keepdim=True), fmax, amax_floor)
    q = decode(encode(xb / s))
    return _unblocked(q * s, n, x.dtype)


def act_quant_fp8(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """FP8 fake-quant per token per `block` channels: q = e4m3(clamp(x/s, +-448)), returns q*s.

    s = pow2_scale(amax, 448, 1e-4). A trailing partial block has its own scale.
    """
    return _block_fake_quant(x, block, FP8_MAX, FP8_AMAX_FLOOR, e4m3_encode, e4m3_decode)


def kv_fake_quant_fp8(x: torch.Tensor, rope_dim: int = 64, block: int = 64) -> torch.Tensor:
    """FP8 fake-quant of the leading "nope" dims (blocks of `block`); the trailing rope dims pass through."""
    d = x.shape[-1]
    if not 0 <= rope_dim <= d:
        raise ValueError(f"rope_dim {rope_dim} does not fit in last dim {d}")
    nope = act_quant_fp8(x[..., : d - rope_dim], block)
    return torch.cat((nope, x[..., d - rope_dim :]), dim=-1)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Walsh-Hadamard transform of the last dim (power of two), Sylvester order, scaled by d^-1/2.

    Sylvester order means H[i, j] = (-1)^popcount(i & j); one butterfly per index bit yields
    exactly that. Orthonormal and symmetric, hence its own inverse.
    """
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"hadamard needs a power-of-two last dim, got {d}")
    y = x.to(torch.float32).reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) * d**-0.5).to(x.dtype)


def fp4_fake_quant(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """FP4 e2m1 fake-quant per `block` channels of the last dim with s = pow2_scale(amax, 6, 6*2^-126)."""
    return _block_fake_quant(x, block, FP4_MAX, FP4_AMAX_FLOOR, fp4_encode, fp4_decode)
