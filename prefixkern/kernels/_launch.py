"""Host-side launch helpers every kernel file shares: which GPU to launch on, its SM count and
shared memory, and the precision of float32 products."""
from __future__ import annotations

import contextlib
import functools

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
