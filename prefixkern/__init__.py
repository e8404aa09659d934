"""prefixkern: fused kernels for prefix tuning and P-Tuning v2.

Public API:
    prefix_attention(q, k, v, prefix_k, prefix_v, ...)   attention over [prefix ; sequence] KV
    fused_prefix_mlp(embedding, w1, b1, w2, b2, ...)     PEFT's prefix MLP, once on P rows -> [L, 2, Hkv, P, D]
    PrefixEncoder(...)                                   PEFT-compatible module around fused_prefix_mlp
"""
from __future__ import annotations

from ._backend import get_backend, use_backend
from .ops.prefix_attention import prefix_attention
from .ops.prefix_mlp import fused_prefix_mlp
from .prefix_encoder import PrefixEncoder

__version__ = "0.1.0"

__all__ = ["prefix_attention", "fused_prefix_mlp", "PrefixEncoder", "get_backend", "use_backend", "__version__"]
