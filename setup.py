"""Build script.

A plain ``pip install .`` needs no GPU and no CUDA toolkit: the Triton kernels compile just in
time and the CUDA decode kernels of ``csrc/`` are built on first use with ninja
(``prefixkern.build_cuda()``). ``PREFIXKERN_BUILD_CUDA=1 pip install .`` builds them ahead of
time instead (needs nvcc and a CUDA build of torch).
"""
import os

from setuptools import setup

kwargs = {}
if os.environ.get("PREFIXKERN_BUILD_CUDA", "0") not in ("", "0"):
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    csrc = ["csrc/bindings.cpp", "csrc/prefix_decode.cu", "csrc/merge_attention_states.cu"]
    kwargs = dict(
        ext_modules=[CUDAExtension("prefixkern._prefixkern_cuda", csrc, include_dirs=["csrc"],
                                   extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})],
        cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    )

setup(**kwargs)
