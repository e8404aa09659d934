"""prefixkern: fused kernels for prefix tuning and P-Tuning v2.

Public API:
    prefix_attention(q, k, v, prefix_k, prefix_v, ...)   attention over [prefix ; sequence] KV
"""
from __future__ import annotations

from ._backend import get_backend, use_backend
from .ops.prefix_attention import prefix_attention

__version__ = "0.1.0"

__all__ = ["prefix_attention", "get_backend", "use_backend", "__version__"]
