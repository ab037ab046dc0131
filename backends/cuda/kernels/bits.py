"""Bit-level helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def with_sign_of(mag, bits):
    """fp32 mag (>= 0) with the sign bit of the int32 pattern `bits`, so that -0.0 stays -0.0 (Triton
    3.6 compiles unary minus as 0 - x, which turns -(+0.0) into +0.0; 3.9 and numpy negate)."""
    return (mag.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
