"""Build script.

A plain ``pip install .`` needs no GPU and no CUDA toolkit: the Triton kernels compile just in
time and the CUDA decode kernels of ``csrc/`` are built on first use with ninja
(``prefixkern.build_cuda()``). ``PREFIXKERN_BUILD_CUDA=1 pip install .`` builds them ahead of
time instead (needs nvcc and a CUDA build of torch).
"""
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_csrc(build_py):
    """Ship csrc/ inside the package (prefixkern/_csrc) so a wheel can build the CUDA kernels on
    first use; an editable install reads csrc/ in place."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "prefixkern" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in Path("csrc").iterdir():
            if source.suffix in (".cu", ".cuh", ".cpp", ".h"):
                shutil.copy2(source, target / source.name)


kwargs = {"cmdclass": {"build_py": build_py_with_csrc}}
if os.environ.get("PREFIXKERN_BUILD_CUDA", "0") not in ("", "0"):
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    csrc = ["csrc/bindings.cpp", "csrc/prefix_decode.cu", "csrc/merge_attention_states.cu"]
    kwargs = dict(
        ext_modules=[CUDAExtension("prefixkern._prefixkern_cuda", csrc, include_dirs=["csrc"],
                                   extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})],
        cmdclass={"build_py": build_py_with_csrc,
                  "build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    )

setup(**kwargs)
