"""Device math shared by the kernels."""
import os

import triton
import triton.language as tl


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


# Triton's interpreter (3.9) multiplies bfloat16 tiles wrongly in tl.dot (results off by 1e10);
# products of bfloat16 values are exact in float32, so under the interpreter the operands are
# widened first. Compiled kernels keep the bfloat16 tensor-core dot.
_WIDEN_BF16_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def dot(a, b, INPUT_PRECISION: tl.constexpr):
    """``tl.dot`` with float32 accumulation (see ``_WIDEN_BF16_DOT`` for the interpreter)."""
    if _WIDEN_BF16_DOT and (a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16):
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if a.dtype == tl.float32:
        # The precision choice only means something for float32 operands.
        return tl.dot(a, b, input_precision=INPUT_PRECISION)
    return tl.dot(a, b)
