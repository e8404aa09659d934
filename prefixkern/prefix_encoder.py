"""PrefixEncoder: PEFT's prefix encoder with the same parameters, run once on P rows through
``fused_prefix_mlp`` and returned as ``[L, 2, Hkv, P, D]``, batch-shared."""
from __future__ import annotations

import torch
from torch import nn

from .ops._checks import is_real_number
from .ops.prefix_mlp import fused_prefix_mlp

__all__ = ["PrefixEncoder"]


class PrefixEncoder(nn.Module):
    """Drop-in for ``peft.tuners.prefix_tuning.model.PrefixEncoder`` that returns every layer's
    prefix keys and values at once.

    Parameters are PEFT's, by name and shape, so a state dict moves between the two unchanged:

    ============================  ==========================  ========================
    name                          projection=True             projection=False
    ============================  ==========================  ========================
    ``embedding.weight``          ``[P, Hkv*D]``              ``[P, 2*L*Hkv*D]``
    ``transform.0.weight``/bias   ``[h, Hkv*D]`` / ``[h]``    --
    ``transform.2.weight``/bias   ``[2*L*Hkv*D, h]`` / [N]    --
    ============================  ==========================  ========================

    ``Hkv*D`` is PEFT's ``token_dim`` (for GQA models PEFT sets it to ``num_key_value_heads *
    head_dim``) and h its ``encoder_hidden_size`` (default ``token_dim``). ``transform.1`` is the
    ``Tanh``, kept so the indices match. Parameters stay float32 unless built otherwise.

    ``enc(dtype=None)`` returns ``kv`` ``[L, 2, Hkv, P, D]`` in ``dtype`` (default what PEFT's
    encoder returns: the parameters' dtype, or the autocast dtype inside ``torch.autocast`` with
    projection): layer l's keys ``kv[l, 0]`` and values ``kv[l, 1]``, each ``[Hkv, P, D]``, equal
    to what PEFT's ``get_prompt`` gives every batch row (under autocast, computed as autocast's
    ``nn.Linear`` does; see ``fused_prefix_mlp``). Without projection (P-Tuning v2)
    and with no cast or dropout it is a view of ``embedding.weight``. ``dropout`` (P-Tuning v2's
    prefix dropout) applies in training mode only.

    For encoder-decoder models PEFT (``num_transformer_submodules=2``) reads the same ``2L``
    vectors four per layer: decoder layer l's (self k, self v, cross k, cross v) are
    ``kv.view(2 * L, Hkv, P, D)[(4 * l + j) % (2 * L)]`` for j = 0..3.

    Example::

        >>> enc = PrefixEncoder(num_virtual_tokens=20, num_layers=24, num_kv_heads=2, head_dim=64,
        ...                     projection=True, hidden_size=896).cuda()
        >>> kv = enc(torch.bfloat16)          # [24, 2, 2, 20, 64]
        >>> peft_enc.load_state_dict(enc.state_dict())   # and back: enc.load_state_dict(...)
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, *,
                 projection: bool = False, hidden_size: int | None = None, dropout: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        for name, value in (("num_virtual_tokens", num_virtual_tokens), ("num_layers", num_layers),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not is_real_number(dropout) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        token_dim = num_kv_heads * head_dim
        hidden_size = token_dim if hidden_size is None else hidden_size
        if projection and (isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0):
            raise ValueError(f"hidden_size must be a positive int or None, got {hidden_size!r}")
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.prefix_projection = projection
        self.dropout = float(dropout)
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.float32}
        num_cols = 2 * num_layers * token_dim
        if projection:
            self.hidden_size = hidden_size
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, hidden_size, **factory),
                nn.Tanh(),
                nn.Linear(hidden_size, num_cols, **factory),
            )
        else:
            self.hidden_size = None
            self.embedding = nn.Embedding(num_virtual_tokens, num_cols, **factory)

    @classmethod
    def from_peft(cls, peft_encoder: nn.Module, *, num_layers: int, num_kv_heads: int, head_dim: int,
                  dropout: float = 0.0) -> "PrefixEncoder":
        """Wrap a PEFT ``PrefixEncoder``, sharing (not copying) its ``embedding`` and ``transform``
        modules, so training either one trains both.

        ``num_layers``, ``num_kv_heads``, ``head_dim`` are PEFT config's ``num_layers``,
        ``num_attention_heads`` (after PEFT's GQA adjustment: the KV heads) and
        ``token_dim // num_attention_heads``.
        """
        projection = bool(getattr(peft_encoder, "prefix_projection", False))
        weight = peft_encoder.embedding.weight
        token_dim = num_kv_heads * head_dim
        num_cols = 2 * num_layers * token_dim
        expected_cols = token_dim if projection else num_cols
        if weight.dim() != 2 or weight.shape[1] != expected_cols:
            what = "[P, Hkv*D]" if projection else "[P, 2*L*Hkv*D]"
            raise ValueError(f"peft_encoder.embedding.weight must have shape {what}=[P, {expected_cols}] "
                             f"(L={num_layers}, Hkv={num_kv_heads}, D={head_dim}), got {tuple(weight.shape)}")
        hidden_size = None
        if projection:
            # PEFT in inference mode with prefix_projection builds no transform; its embedding is the prefix.
            if not hasattr(peft_encoder, "transform"):
                raise ValueError("peft_encoder has prefix_projection=True but no transform (inference_mode); "
                                 "its embedding has the shape of the P-Tuning v2 prefix")
            linear1, linear2 = peft_encoder.transform[0], peft_encoder.transform[2]
            hidden_size = linear1.out_features
            if linear2.weight.shape != (num_cols, hidden_size):
                raise ValueError(f"peft_encoder.transform.2.weight must have shape [2*L*Hkv*D, h]=[{num_cols}, "
                                 f"{hidden_size}], got {tuple(linear2.weight.shape)}")
        encoder = cls(weight.shape[0], num_layers, num_kv_heads, head_dim, projection=projection,
                      hidden_size=hidden_size, dropout=dropout, device="meta", dtype=weight.dtype)
        encoder.embedding = peft_encoder.embedding
        if projection:
            encoder.transform = peft_encoder.transform
        return encoder

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[L, 2, Hkv, P, D]`` prefix keys/values in ``dtype`` (default: as PEFT's encoder returns
        them, in the parameters' dtype or, with projection inside ``torch.autocast``, the autocast dtype)."""
        dropout_p = self.dropout if self.training else 0.0
        if self.prefix_projection:
            linear1, linear2 = self.transform[0], self.transform[2]
            return fused_prefix_mlp(
                self.embedding.weight, linear1.weight, linear1.bias, linear2.weight, linear2.bias,
                num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                out_dtype=dtype, dropout_p=dropout_p,
            )
        return fused_prefix_mlp(self.embedding.weight, num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                                head_dim=self.head_dim, out_dtype=dtype, dropout_p=dropout_p)

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, num_layers={self.num_layers}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, projection={self.prefix_projection}, "
                f"hidden_size={self.hidden_size}, dropout={self.dropout}")
