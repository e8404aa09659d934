"""prefix_attention: attention over ``[prefix KV ; sequence KV]`` without the concatenation."""
from __future__ import annotations

import math

import torch

from .. import reference
from .._backend import use_triton
from ._checks import check_prefix_attention_args


# --------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, which traces them through their fake implementations.
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("prefixkern::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    prefix_index: torch.Tensor | None, key_padding_mask: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
    seed: torch.Tensor | None, causal: bool, softmax_scale: float, dropout_p: float, softcap: float | None,
    window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel forward: ``(out [B, Hq, S, D], lse [B, Hq, S] float32)``."""
    from ..kernels.prefix_attention_fwd import prefix_attention_forward
    from ..kernels._launch import on_device

    with on_device(q.device):
        return prefix_attention_forward(
            q, k, v, prefix_k, prefix_v, prefix_index=prefix_index, key_padding_mask=key_padding_mask,
            causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p, seed=seed, alibi_slopes=alibi_slopes,
            softcap=softcap, window=window,
        )


@prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, alibi_slopes, seed, causal, softmax_scale,
      dropout_p, softcap, window):
    batch, num_heads, seq_len_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, num_heads, seq_len_q), dtype=torch.float32)


@torch.library.custom_op("prefixkern::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
    prefix_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, prefix_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, alibi_slopes: torch.Tensor | None, seed: torch.Tensor | None,
    causal: bool, softmax_scale: float, dropout_p: float, softcap: float | None, window: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel backward: ``(dq, dk, dv, dprefix_k, dprefix_v)``."""
    from ..kernels.prefix_attention_bwd import prefix_attention_backward
    from ..kernels._launch import on_device

    with on_device(q.device):
        return prefix_attention_backward(
            dout, q, k, v, prefix_k, prefix_v, out, lse, prefix_index=prefix_index,
            key_padding_mask=key_padding_mask, causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p,
            seed=seed, alibi_slopes=alibi_slopes, softcap=softcap, window=window,
        )


@prefix_attention_bwd.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, out, lse, prefix_index, key_padding_mask, alibi_slopes, seed, causal,
      softmax_scale, dropout_p, softcap, window):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), prefix_k.new_empty(prefix_k.shape), \
        prefix_v.new_empty(prefix_v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, alibi_slopes, seed, causal, softmax_scale,
     dropout_p, softcap, window) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, prefix_index, key_padding_mask, alibi_slopes, seed)
    ctx.options = (causal, softmax_scale, dropout_p, softcap, window)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, prefix_k, prefix_v, out, lse, prefix_index, key_padding_mask, alibi_slopes, seed = ctx.saved_tensors
    grads = prefix_attention_bwd(grad_out, q, k, v, prefix_k, prefix_v, out, lse, prefix_index, key_padding_mask,
                                 alibi_slopes, seed, *ctx.options)
    return (*grads,) + (None,) * 9


prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    prefix_index: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
):
    """Attention of ``q`` over the keys ``[prefix_k ; k]`` and values ``[prefix_v ; v]``.

    For batch row b, query head h and its KV head g = h // (Hq // Hkv)::

        keys   = [prefix_k[g] (P rows) ; k[b, g] (S_kv rows)]
        out[b, h, i] = softmax(scale * q[b, h, i] . keys^T + bias) @ [prefix_v[g] ; v[b, g]]

    Args:
        q: ``[B, Hq, S, D]``, float16 / bfloat16 / float32, any strides.
        k, v: ``[B, Hkv, S_kv, D]``, q's dtype and device, any strides. ``Hq % Hkv == 0``
            (GQA/MQA read the shared KV head directly; nothing is repeated).
        prefix_k, prefix_v: ``[Hkv, P, D]`` shared by the whole batch, ``[B, Hkv, P, D]`` one
            per row, or ``[T, Hkv, P, D]`` one per task, picked per row by ``prefix_index``.
            The prefix carries no rotary position: it is used as stored.
        causal: sequence key j is visible to query i iff ``j <= i + (S_kv - S)``: the mask is
            aligned to the bottom-right corner, so when the query is shorter than the keys
            (decoding with a cache) the last query sees every key. For S=2, S_kv=5::

                query 0 sees sequence keys 0 1 2 3 .
                query 1 sees sequence keys 0 1 2 3 4

            The P prefix keys are always visible (subject to ``window``).
        softmax_scale: multiplies ``q . k``; default ``1 / sqrt(D)``.
        key_padding_mask: ``[B, S_kv]`` bool or int, True/1 = real token (HF's convention).
            Padded sequence keys are hidden. A query whose sequence keys are all padded still
            sees the prefix, so its output stays finite.
        prefix_index: ``[B]`` int, row b reads ``prefix_k[prefix_index[b]]``.
        dropout_p: attention dropout probability, applied to the softmax weights. The keep
            mask comes from Philox in the kernel and is regenerated in the backward pass.
            Pass 0.0 in evaluation.
        alibi_slopes: ``[Hq]`` or ``[B, Hq]`` float; adds ``slope[h] * pos(key)`` to the
            scores, where prefix key j is at position j and a real sequence key at P plus the
            number of real keys before it (how HF BLOOM counts a PEFT prefix).
        softcap: scores become ``softcap * tanh(scores / softcap)`` before ALiBi and masking
            (Gemma 2).
        window: sliding window (HF's ``sliding_window``): key visible iff
            ``pos(query) - pos(key) < window``, where prefix key j sits at j, sequence key j at
            ``P + j`` and query i at ``P + S_kv - S + i``; the window can move past the prefix.
        return_lse: also return the float32 natural-log log-sum-exp of the scores,
            ``[B, Hq, S]``, for merging partial attention results. A row with no visible key
            gives output 0 and lse -inf.

    Returns:
        ``out`` ``[B, Hq, S, D]`` in q's dtype (and ``lse`` if asked), differentiable in q, k,
        v, prefix_k and prefix_v. A shared or per-task prefix's gradient is the sum over the
        rows that read it.

    Raises:
        ValueError / TypeError naming the argument, before any kernel is launched.
    """
    check_prefix_attention_args(
        q, k, v, prefix_k, prefix_v, causal=causal, softmax_scale=softmax_scale,
        key_padding_mask=key_padding_mask, prefix_index=prefix_index, dropout_p=dropout_p,
        alibi_slopes=alibi_slopes, softcap=softcap, window=window,
    )
    if use_triton(q.device):
        scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        seed = None
        if dropout_p > 0.0:
            from ..kernels._attention_common import check_dropout_counters

            check_dropout_counters(q.shape[2], prefix_k.shape[-2] + k.shape[2])
            # Drawn from torch's generator, so torch.manual_seed makes the mask reproducible.
            seed = torch.randint(0, 2**31 - 1, (1,), device=q.device, dtype=torch.int64)
        out, lse = prefix_attention_fwd(
            q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, alibi_slopes, seed, causal, scale,
            float(dropout_p), None if softcap is None else float(softcap), window,
        )
        return (out, lse) if return_lse else out
    return reference.prefix_attention(
        q, k, v, prefix_k, prefix_v, causal=causal, softmax_scale=softmax_scale,
        key_padding_mask=key_padding_mask, prefix_index=prefix_index, dropout_p=dropout_p,
        alibi_slopes=alibi_slopes, softcap=softcap, window=window, return_lse=return_lse,
    )


def launched_tiles() -> dict[str, tuple[int, int, int, int]]:
    """Diagnostics: ``{kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)}`` that the attention
    kernels (``fwd``, ``dq``, ``dkdv``) launched with since the previous call, as autotuning chose
    them. The benchmarks record it beside each timing."""
    from ..kernels._attention_common import take_launched_configs

    return take_launched_configs()
