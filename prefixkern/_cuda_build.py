"""Builds the CUDA C++ kernels of ``csrc/`` just in time with ninja
(``torch.utils.cpp_extension.load``), once per machine: the build is cached under
``$PREFIXKERN_CUDA_CACHE`` (default ``~/.cache/prefixkern/cuda``) by torch's source hashing.

``build_cuda()`` builds (or loads) it explicitly and raises on failure; ``cuda_ops()`` is what
the ops use: the loaded ``torch.ops.prefixkern_cuda`` namespace, or None with one warning when
the build is impossible here (no GPU, no nvcc, a compiler error), so callers fall back to Triton.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

SOURCES = ("bindings.cpp", "prefix_decode.cu", "merge_attention_states.cu")


def csrc_dir() -> Path:
    """``csrc/`` beside the package (editable installs, a source checkout) or shipped inside it."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "csrc", package / "_csrc"):
        if all((candidate / name).exists() for name in SOURCES):
            return candidate
    raise FileNotFoundError(f"prefixkern's CUDA sources {SOURCES} were found neither in {package.parent / 'csrc'} "
                            f"nor in {package / '_csrc'}")


def build_dir() -> Path:
    root = Path(os.environ.get("PREFIXKERN_CUDA_CACHE", Path.home() / ".cache" / "prefixkern" / "cuda"))
    tag = f"torch{torch.__version__.split('+')[0]}_cu{(torch.version.cuda or 'none').replace('.', '')}"
    path = root / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def _arch_flags() -> list[str]:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []       # torch's own handling of the variable
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def _ahead_of_time_library() -> Path | None:
    """The library ``PREFIXKERN_BUILD_CUDA=1 pip install .`` built into the package, if any."""
    found = sorted(Path(__file__).resolve().parent.glob("_prefixkern_cuda*.so"))
    return found[0] if found else None


def build_cuda(verbose: bool = False):
    """Compile (first call on a machine) or load the CUDA decode kernels; returns
    ``torch.ops.prefixkern_cuda``. Raises RuntimeError with the reason when it cannot."""
    if not torch.cuda.is_available():
        raise RuntimeError("prefixkern.build_cuda needs a CUDA GPU")
    if hasattr(torch.ops.prefixkern_cuda, "prefix_decode_partial"):
        return torch.ops.prefixkern_cuda
    prebuilt = _ahead_of_time_library()
    if prebuilt is not None:
        torch.ops.load_library(str(prebuilt))
        _register_fakes()
        return torch.ops.prefixkern_cuda
    from torch.utils.cpp_extension import load

    source_dir = csrc_dir()
    load(
        name="prefixkern_cuda",
        sources=[str(source_dir / name) for name in SOURCES],
        extra_include_paths=[str(source_dir)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo", *_arch_flags()],
        build_directory=str(build_dir()),
        is_python_module=False,
        verbose=verbose,
    )
    _register_fakes()
    return torch.ops.prefixkern_cuda


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing of the CUDA ops."""
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("prefixkern_cuda::prefix_decode_partial")
    def _(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, num_splits, tensor_cores=False,
          stages=1):
        splits = torch.library.get_ctx().new_dynamic_size()
        batch, heads, seq_q, head_dim = q.shape
        return (q.new_empty((splits, batch, heads, seq_q, head_dim), dtype=torch.float32),
                q.new_empty((splits, batch, heads, seq_q), dtype=torch.float32))

    @torch.library.register_fake("prefixkern_cuda::merge_attention_states")
    def _(out_partial, lse_partial, out_dtype):
        return out_partial.new_empty(out_partial.shape[1:], dtype=out_dtype), lse_partial.new_empty(lse_partial.shape[1:])

    if hasattr(torch.ops.prefixkern_cuda, "prefix_decode_attention"):   # (not in libraries built before it)
        @torch.library.register_fake("prefixkern_cuda::prefix_decode_attention")
        def _(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, num_splits, tensor_cores=False,
              stages=1):
            return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)

    _register_fakes.done = True


def self_check(ops, tensor_cores: bool = False, device: torch.device | None = None) -> None:
    """Run the built kernels once on a small GQA case with padding and a per-task prefix against
    the reference; raise if they disagree (a miscompiled or broken build must not serve decoding).
    ``tensor_cores``: check the mma.sync kernel instead of the CUDA-core one, with one K/V stage, and
    with the stages decoding will ask for: the launcher's choice (``stages=0``; on this case two
    stages wherever the GPU gives a block their shared memory, 135 KiB at head dim 256, which some
    sm_80+ GPUs do not), or two where ``PREFIXKERN_DECODE_STAGES=2`` forces them. ``device``: the
    current GPU unless given (tests run the check with stand-in ops on the CPU)."""
    from . import reference

    gen = torch.Generator(device="cpu").manual_seed(0)
    device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    stages = decode_stages_setting()
    stages = stages if stages in (1, 2) else 0      # (a bad setting fails at decoding's first call)
    # Every head dim (their instances map threads to output columns differently); 305 keys in two
    # splits put two or more K/V tiles in a split at each of them (tiles of 128, 64 and 32 keys),
    # so the online softmax rescales within a split.
    for dtype, head_dim in ((torch.bfloat16, 128), (torch.float16, 64), (torch.bfloat16, 256)):
        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        q, k, v = randn(3, 8, 2, head_dim), randn(3, 2, 300, head_dim), randn(3, 2, 300, head_dim)
        pk, pv = randn(2, 2, 5, head_dim), randn(2, 2, 5, head_dim)
        index = torch.tensor([1, 0, 1], device=device)
        mask = torch.ones(3, 300, dtype=torch.bool, device=device)
        mask[0, :9] = False
        scale = head_dim ** -0.5
        want = reference.prefix_attention(q, k, v, pk, pv, causal=True, softmax_scale=scale, key_padding_mask=mask,
                                          prefix_index=index)
        parts, lses = ops.prefix_decode_partial(q, k, v, pk, pv, index, mask, scale, 2, tensor_cores)
        outputs = {"partial + merge": (ops.merge_attention_states(parts, lses, dtype)[0], want)}
        if tensor_cores and stages != 1:
            # (305 keys in two splits of 192: 3 tiles of 64 a block, 12 blocks; the rule picks two stages)
            parts, lses = ops.prefix_decode_partial(q, k, v, pk, pv, index, mask, scale, 2, True, stages)
            outputs[f"partial + merge, stages={stages}"] = (ops.merge_attention_states(parts, lses, dtype)[0], want)
        fused = getattr(ops, "prefix_decode_attention", None)
        if fused is not None:   # both query positions (8 rows a block), and the last alone (4 rows)
            outputs["one call"] = (fused(q, k, v, pk, pv, index, mask, scale, 2, tensor_cores)[0], want)
            outputs["one call, q_len 1"] = (fused(q[:, :, 1:], k, v, pk, pv, index, mask, scale, 0, tensor_cores)[0],
                                            want[:, :, 1:])
        for name, (out, expected) in outputs.items():
            err = (out.float() - expected.float()).abs().max().item()
            if not err <= 3e-2:
                kernel = "tensor-core" if tensor_cores else "CUDA"
                raise RuntimeError(f"the {kernel} decode kernel disagrees with the reference ({name}, {dtype}, "
                                   f"D={head_dim}: max error {err:.3g})")


# PREFIXKERN_DECODE_STAGES's values: the tensor-core decode kernel's K/V stages, 0 the launcher's
# choice per call (see ops/decode_attention.py).
DECODE_STAGES_VALUES = {"auto": 0, "0": 0, "1": 1, "2": 2}


def decode_stages_setting(value: str | None = None) -> int | str:
    """``PREFIXKERN_DECODE_STAGES`` (or ``value``) as 0, 1 or 2; a value it cannot read comes back
    as given, for the caller's error (decoding raises it at its first call, naming the variable)."""
    raw = os.environ.get("PREFIXKERN_DECODE_STAGES", "auto") if value is None else value
    return DECODE_STAGES_VALUES.get(raw.strip().lower(), raw)


@functools.lru_cache(maxsize=None)
def cuda_ops():
    """The CUDA ops, or None (warned once) when they cannot be built here or fail their self-check."""
    if os.environ.get("PREFIXKERN_NO_CUDA_EXT", "0") not in ("", "0"):
        return None
    try:
        ops = build_cuda()
        self_check(ops)
        return ops
    except Exception as exc:   # no nvcc, no GPU, a compiler error, a failed self-check: fall back, once
        warnings.warn(f"prefixkern: the CUDA decode kernels are not used ({type(exc).__name__}: {exc}); "
                      "decoding falls back to the Triton kernels", RuntimeWarning, stacklevel=2)
        return None


@functools.lru_cache(maxsize=None)
def tensor_cores_usable(device_index: int) -> bool:
    """Whether the tensor-core decode kernel serves GPU ``device_index``: an sm_80+ GPU, the CUDA ops
    built, and its self-check passed. Otherwise False, with one warning naming why (decoding then
    runs the CUDA-core kernel)."""
    ops = cuda_ops()
    if ops is None:
        return False
    major, minor = torch.cuda.get_device_capability(device_index)
    reason = None
    if major < 8:
        reason = f"it needs an sm_80 or newer GPU, this one is sm_{major}{minor}"
    else:
        try:
            with torch.cuda.device(device_index):
                self_check(ops, tensor_cores=True)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
    if reason is not None:
        warnings.warn(f"prefixkern: the tensor-core decode kernel is not used ({reason}); decoding runs the "
                      "CUDA-core kernel", RuntimeWarning, stacklevel=2)
        return False
    return True
