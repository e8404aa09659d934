"""Device math shared by the kernels."""
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
