"""Host-side launch helpers every kernel file shares: which GPU to launch on, its SM count and
shared memory, and the precision of float32 products."""
from __future__ import annotations

import contextlib
import functools
import os

import torch


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def smem_bytes(index: int) -> int:
    # Opt-in per-block shared memory (227 KiB on H100, 163 KiB on A100); older torch lacks the field.
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", 99 * 1024)


def on_device(device: torch.device):
    """Launch on the tensors' GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def input_precision(dtype: torch.dtype = torch.float32) -> str:
    """Follow PyTorch's float32 matmul setting, so the kernels match what ``nn.Linear`` would do:
    exact float32 products by default, TF32 tensor cores when the user allowed them. Only float32
    operands have a choice; other dtypes get "ieee" so they compile one kernel variant."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


# PREFIXKERN_RAW_LAUNCH=1: `launch_kernel` hands Triton's launcher raw pointers (see there). Off by
# default until a GPU run has checked it bit-equal and timed it (benchmarks/profile_ops.py launch).
RAW_POINTERS = os.environ.get("PREFIXKERN_RAW_LAUNCH", "0") == "1"


def _hooked(hook) -> bool:
    """Whether a Triton launch hook would run: set, and not an empty HookChain (Triton 3.6+)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def launch_kernel(kernel, grid: tuple[int, ...], *args, **meta):
    """``kernel[grid](*args, **meta)``: runtime arguments positional, constexprs and launch options
    by keyword. Returns the compiled kernel, as a Triton launch does.

    With ``RAW_POINTERS`` (on a GPU), Triton binds and specialises the arguments as always
    (``warmup``, which compiles on a miss and launches nothing), then its compiled launcher gets
    each tensor as its device address, an int: it skips the ``data_ptr()`` call and the
    ``cuPointerGetAttribute`` driver query it makes per tensor argument otherwise. The
    specialisation (alignment, divisibility) still comes from the real tensors, so the kernel
    that runs is the one a plain launch would pick."""
    if not RAW_POINTERS:
        return kernel[grid](*args, **meta)
    import triton
    from triton.runtime import driver

    from .._backend import triton_interpret

    # Launch hooks (profilers) read the arguments: give them the plain launch. Triton before 3.4
    # has no `knobs` and another launcher convention: plain launch too.
    knobs = getattr(triton, "knobs", None)
    if triton_interpret() or knobs is None or _hooked(knobs.runtime.launch_enter_hook) \
            or _hooked(knobs.runtime.launch_exit_hook):
        return kernel[grid](*args, **meta)
    compiled = kernel.warmup(*args, grid=grid, **meta)
    if hasattr(compiled, "result"):        # an asynchronous compile hands back a future
        compiled = compiled.result()
    values = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    values += [meta[name] for name in kernel.arg_names[len(args):]]   # the constexprs, in signature order
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    grid = tuple(grid) + (1, 1)
    run = compiled.run           # loads the module on first use, which sets compiled.function
    run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None, *values)
    return compiled
