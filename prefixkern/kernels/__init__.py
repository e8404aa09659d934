"""@triton.jit kernels and their launchers only: no autograd, no Hugging Face."""
