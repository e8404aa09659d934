"""prefixkern: fused kernels for prefix tuning and P-Tuning v2.

Public API:
    prefix_attention(q, k, v, prefix_k, prefix_v, ...)   attention over [prefix ; sequence] KV
    prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, ...)
                                                         the same on packed sequences (no padding)
    fused_prefix_mlp(embedding, w1, b1, w2, b2, ...)     PEFT's prefix MLP, once on P rows -> [L, 2, Hkv, P, D]
    PrefixEncoder(...)                                   PEFT-compatible module around fused_prefix_mlp
    patch(peft_model) / unpatch(peft_model)              PEFT prefix tuning on HF models through the kernels
    prefix_per_row(peft_model, adapter_names)            rows of one batch reading different trained prefixes
    prefix_decode_attention(q, k, v, prefix_k, prefix_v)  a generation step (CUDA C++ kernel, Triton fallback)
    merge_attention_states(out_partial, lse_partial)     log-sum-exp merge of partial attention
    build_cuda()                                         build/load the CUDA kernels of csrc/ now
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._backend import get_backend, use_backend
from .ops.prefix_attention import prefix_attention, prefix_attention_varlen
from .ops.decode_attention import merge_attention_states, prefix_decode_attention
from .ops.prefix_mlp import fused_prefix_mlp
from .prefix_encoder import PrefixEncoder

if TYPE_CHECKING:   # what type checkers and IDEs see; at run time loaded on first use (__getattr__)
    from ._cuda_build import build_cuda
    from .integrations.hf import is_patched, load_resumable, patch, prefix_per_row, save_resumable, unpatch


def __getattr__(name):
    # The HF integration imports transformers/peft; load it only when asked for.
    if name == "build_cuda":
        from ._cuda_build import build_cuda

        return build_cuda
    if name in ("patch", "unpatch", "is_patched", "prefix_per_row", "save_resumable", "load_resumable"):
        from .integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'prefixkern' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = ["prefix_attention", "prefix_attention_varlen", "prefix_decode_attention", "merge_attention_states", "build_cuda", "fused_prefix_mlp",
           "PrefixEncoder", "get_backend", "use_backend", "patch", "unpatch",
           "is_patched", "prefix_per_row", "save_resumable", "load_resumable", "__version__"]
