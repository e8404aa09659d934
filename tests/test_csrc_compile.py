"""Every csrc/ file compiles with nvcc (compile only: this machine has no GPU) without register
spills, so a broken or spilling CUDA kernel fails CI. The GPU suite runs the kernels against the
reference (tests/test_decode.py)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
STUBS = Path(__file__).resolve().parent / "csrc_stubs"


def _flags() -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    include = Path(torch.__file__).parent / "include"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # The stub stands in for the one generated header CPU wheels of torch leave out.
    return ["-std=c++20", "-O2", f"-I{CSRC}", f"-I{include}", f"-I{include / 'torch/csrc/api/include'}",
            f"-I{STUBS}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *COMMON_NVCC_FLAGS]


def test_sources_are_the_ones_the_build_uses():
    from prefixkern import _cuda_build

    assert sorted(p.name for p in [*CSRC.glob("*.cu"), *CSRC.glob("*.cpp")]) == sorted(_cuda_build.SOURCES)
    assert _cuda_build.csrc_dir() == CSRC


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed on this machine")
def test_every_csrc_file_compiles_with_nvcc(tmp_path):
    sources = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))
    assert sources
    arch = os.environ.get("PREFIXKERN_NVCC_ARCH", "sm_90")
    procs = []
    for source in sources:   # in parallel: nvcc spends most of its time parsing torch's headers
        # ptxas reports registers and spills; -keep leaves the PTX for the checks below.
        verbose = ["-Xptxas=-v", "-keep", f"-keep-dir={tmp_path}"] if source.suffix == ".cu" else []
        cmd = ["nvcc", "-c", f"-arch={arch}", *_flags(), *verbose, str(source),
               "-o", str(tmp_path / (source.name + ".o"))]
        procs.append((source, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failures = []
    outputs = {}
    for source, proc in procs:
        output, _ = proc.communicate(timeout=600)
        outputs[source.name] = output
        if proc.returncode != 0:
            failures.append(f"{source.name}:\n{output[-4000:]}")
        # Every instantiation (dtype x head dim) of every kernel must keep its state in registers.
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", output)]
        if any(spills):
            failures.append(f"{source.name} spills registers:\n{output[-4000:]}")
    assert not failures, "\n\n".join(failures)
    if arch == "sm_90":
        _check_decode_kernel_memory_path(tmp_path, outputs["prefix_decode.cu"])


def _check_decode_kernel_memory_path(tmp_path, ptxas_output):
    """What the decode kernels' speed rests on, pinned where a compile shows it: every instance of
    both kernels copies K/V tiles with cp.async (a tile's copies in flight together; the synchronous
    loop it replaced held one 16-byte load per thread in flight and ran at 887 GB/s on an H200); the
    CUDA-core kernel's HEAD_DIM 128 instances (4, 8 and 16 rows per block) keep to 96 registers, so five blocks share an SM; the
    tensor-core kernel multiplies with mma.sync, reads its mma A fragments with ldmatrix, and at
    HEAD_DIM 128 keeps to 80 registers with one K/V stage (six blocks of 128 threads per SM, as many
    as its 36 KiB of shared memory allows) and to 160 with two (three blocks, as its 71 KiB allow)."""
    ptx = "\n".join(path.read_text() for path in tmp_path.glob("prefix_decode*.ptx"))
    entries = re.split(r"\.entry ", ptx)[1:]
    registers = dict(re.findall(r"Compiling entry function '(_ZN10prefixkern\d+prefix_decode_partial\S+)'"
                                r"[^\n]*\n(?:[^\n]*\n)*?[^\n]*Used (\d+) registers", ptxas_output))
    # (kernel, instances per dtype and head dim: the CUDA-core kernel's rows per block 4, 8, 16, the
    # tensor-core kernel's stages 1 and 2; register limit)
    for kernel, per_shape, limit_at_128 in (("28prefix_decode_partial_kernel", 3, lambda name: 96),
                                            ("32prefix_decode_partial_mma_kernel", 2,
                                             lambda name: 160 if "ELi128ELi2E" in name else 80)):
        decode = [entry for entry in entries if entry.startswith(f"_ZN10prefixkern{kernel}")]
        assert len(decode) == 6 * per_shape, (
            f"expected {6 * per_shape} instances (2 dtypes x 3 head dims x {per_shape}) of {kernel}, found {len(decode)}")
        for entry in decode:
            assert "cp.async.cg.shared.global" in entry and "cp.async.wait_group" in entry, entry.split("(")[0]
            if "mma" in kernel:
                assert "mma.sync.aligned.m16n8k16.row.col.f32" in entry, entry.split("(")[0]
                # Its A fragments (K, and V^T transposed) by ldmatrix, one instruction per fragment.
                assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in entry, entry.split("(")[0]
                assert "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in entry, entry.split("(")[0]
        at_128 = {name: int(n) for name, n in registers.items() if kernel in name and "ELi128E" in name}
        assert len(at_128) == 2 * per_shape and all(n <= limit_at_128(name) for name, n in at_128.items()), at_128


def _aten_needs_cpp20() -> bool:
    """Whether the installed torch's headers refuse C++17 (from torch 2.14: ATen.h errors below C++20)."""
    header = Path(torch.__file__).parent / "include" / "ATen" / "ATen.h"
    return header.is_file() and "__cplusplus < 202002L" in header.read_text()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed on this machine")
@pytest.mark.skipif(_aten_needs_cpp20(), reason="this torch's headers need C++20: its JIT build never uses C++17")
def test_the_decode_kernels_compile_as_cpp17(tmp_path):
    """torch's JIT build picks the C++ standard (C++20 in the torch here, C++17 in older releases): the
    kernel sources must not need C++20 features (templated lambdas, concepts)."""
    flags = [flag for flag in _flags() if not flag.startswith("-std=")]
    source = CSRC / "prefix_decode.cu"
    result = subprocess.run(["nvcc", "-c", "-arch=sm_90", "-std=c++17", *flags, str(source), "-o",
                             str(tmp_path / "prefix_decode.o")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
