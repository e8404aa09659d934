"""Device math shared by the kernels."""
import triton
import triton.language as tl

from .._backend import triton_interpret


@triton.jit
def tanh(x):
    """float32 tanh, accurate to a few ulp: a series near 0 avoids the cancellation of
    ``(1 - e^-2|x|) / (1 + e^-2|x|)`` there (no libdevice, so the interpreter runs it too)."""
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    far = (1.0 - t) / (1.0 + t)
    x2 = ax * ax
    near = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397))))
    y = tl.where(ax < 0.0625, near, far)
    return tl.where(x < 0.0, -y, y)


@triton.jit
def log2e():
    """log2(e), for scores kept in log2 units. A function rather than a global ``tl.constexpr``:
    Triton re-checks every global constant a kernel reads on each launch (host time), not the
    jit functions it calls."""
    return 1.4426950408889634


@triton.jit
def _compiled_dot(a, b, INPUT_PRECISION: tl.constexpr):
    """``tl.dot`` with float32 accumulation."""
    if a.dtype == tl.float32:
        # The precision choice only means something for float32 operands.
        return tl.dot(a, b, input_precision=INPUT_PRECISION)
    return tl.dot(a, b)


@triton.jit
def _interpreted_dot(a, b, INPUT_PRECISION: tl.constexpr):
    """Triton's interpreter (3.9) multiplies bfloat16 tiles wrongly in tl.dot (results off by
    1e10); products of bfloat16 values are exact in float32, so the operands are widened first."""
    if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return _compiled_dot(a, b, INPUT_PRECISION)


# Chosen once at import (the interpreter is set before triton is imported), so kernels read no
# global constant for it (see log2e). Compiled kernels keep the bfloat16 tensor-core dot.
dot = _interpreted_dot if triton_interpret() else _compiled_dot


@triton.jit
def _compiled_to_bf16(x):
    """float32 -> bfloat16, rounded to nearest even (the GPU's conversion)."""
    return x.to(tl.bfloat16)


@triton.jit
def _interpreted_to_bf16(x):
    """Triton's interpreter (3.9) truncates float32 -> bfloat16; round to nearest even in the bits
    first (NaN aside), so that truncation is exact and the result is the GPU's."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


to_bf16 = _interpreted_to_bf16 if triton_interpret() else _compiled_to_bf16
