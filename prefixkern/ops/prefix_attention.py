"""prefix_attention: attention over ``[prefix KV ; sequence KV]`` without the concatenation, on
``[B, H, S, D]`` rows (``prefix_attention``) or packed sequences (``prefix_attention_varlen``)."""
from __future__ import annotations

import math

import torch

from .. import reference
from .._backend import eager_function, launch_directly, lazy_modules, use_triton
from ._checks import check_kernel_head_dim, check_prefix_attention_args, check_prefix_attention_varlen_args


def resolve_softmax_scale(softmax_scale: float | None, head_dim: int) -> float:
    """The scale of the scores: ``softmax_scale``, or ``1 / sqrt(head_dim)`` when it is None."""
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)


# --------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, which traces them through their fake implementations.
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("prefixkern::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
    prefix_index: torch.Tensor | None, key_padding_mask: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
    seed: torch.Tensor | None, causal: bool, softmax_scale: float, dropout_p: float, softcap: float | None,
    window: int | None, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int,
    max_seqlen_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel forward: ``(out [B, Hq, S, D], lse [B, Hq, S] float32)``; packed (``cu_seqlens_q`` given):
    ``(out [total_q, Hq, D], lse [B, Hq, max_seqlen_q])``."""
    return _forward_launch(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, alibi_slopes, seed, causal,
                           softmax_scale, dropout_p, softcap, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k)


def _forward_launch(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, alibi_slopes, seed, causal,
                    softmax_scale, dropout_p, softcap, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    kernels = _kernels()
    with kernels.launch.on_device(q.device):
        return kernels.fwd.prefix_attention_forward(
            q, k, v, prefix_k, prefix_v, prefix_index=prefix_index, key_padding_mask=key_padding_mask,
            causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p, seed=seed, alibi_slopes=alibi_slopes,
            softcap=softcap, window=window, packed=_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
        )


# The kernel modules, imported at the first call (lazy_modules).
_kernels = lazy_modules(fwd="prefixkern.kernels.prefix_attention_fwd", bwd="prefixkern.kernels.prefix_attention_bwd",
                        launch="prefixkern.kernels._launch", common="prefixkern.kernels._attention_common")


def _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    if cu_seqlens_q is None:
        return None
    return _kernels().common.PackedRows(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, alibi_slopes, seed, causal, softmax_scale,
      dropout_p, softcap, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    if cu_seqlens_q is not None:
        lse_shape = (cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q)
    else:
        lse_shape = q.shape[:3]
    from ..kernels._attention_common import empty_in_layout_of

    return empty_in_layout_of(q), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("prefixkern::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
    prefix_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, prefix_index: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, alibi_slopes: torch.Tensor | None, seed: torch.Tensor | None,
    causal: bool, softmax_scale: float, dropout_p: float, softcap: float | None, window: int | None,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel backward: ``(dq, dk, dv, dprefix_k, dprefix_v)``."""
    dq, dk, dv, dpk, dpv = _backward_launch(dout, q, k, v, prefix_k, prefix_v, out, lse, prefix_index,
                                            key_padding_mask, alibi_slopes, seed, causal, softmax_scale, dropout_p,
                                            softcap, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    # The launcher returns the two prefix gradients as views of one buffer (one reduction for
    # both); a custom op's outputs may not alias each other.
    return dq, dk, dv, dpk, dpv.clone()


def _backward_launch(dout, q, k, v, prefix_k, prefix_v, out, lse, prefix_index, key_padding_mask, alibi_slopes, seed,
                     causal, softmax_scale, dropout_p, softcap, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k):
    kernels = _kernels()
    with kernels.launch.on_device(q.device):
        return kernels.bwd.prefix_attention_backward(
            dout, q, k, v, prefix_k, prefix_v, out, lse, prefix_index=prefix_index,
            key_padding_mask=key_padding_mask, causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p,
            seed=seed, alibi_slopes=alibi_slopes, softcap=softcap, window=window,
            packed=_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
        )


@prefix_attention_bwd.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, out, lse, prefix_index, key_padding_mask, alibi_slopes, seed, causal,
      softmax_scale, dropout_p, softcap, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    from ..kernels._attention_common import empty_in_layout_of

    return empty_in_layout_of(q), empty_in_layout_of(k), empty_in_layout_of(v), prefix_k.new_empty(prefix_k.shape), \
        prefix_v.new_empty(prefix_v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, alibi_slopes, seed, causal, softmax_scale,
     dropout_p, softcap, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, prefix_index, key_padding_mask, alibi_slopes, seed,
                          cu_seqlens_q, cu_seqlens_k)
    ctx.options = (causal, softmax_scale, dropout_p, softcap, window)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.mark_non_differentiable(lse)
    # lse gets no gradient: without this autograd would fill a zero tensor for it in every
    # backward, a memset launch per layer and step.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse, launch=prefix_attention_bwd):
    if grad_out is None:        # (out is the only differentiable output: not reached in practice)
        return (None,) * 18
    (q, k, v, prefix_k, prefix_v, out, lse, prefix_index, key_padding_mask, alibi_slopes, seed, cu_seqlens_q,
     cu_seqlens_k) = ctx.saved_tensors
    grads = launch(grad_out, q, k, v, prefix_k, prefix_v, out, lse, prefix_index, key_padding_mask, alibi_slopes, seed,
                   *ctx.options, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens)
    return (*grads,) + (None,) * 13


prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Eager launches: the same kernels without the dispatcher round trip
# --------------------------------------------------------------------------------------------

_PrefixAttentionFunction = eager_function("_PrefixAttentionFunction", _forward_launch, _setup_context, _backward,
                                          _backward_launch)


def _attention_fwd(*inputs):
    """The forward launch with autograd: eagerly through ``_PrefixAttentionFunction`` (or the bare
    launcher where no gradient is recorded: inference, generate()'s prefill), otherwise through
    the custom op."""
    if launch_directly(*inputs[:9], *inputs[14:16]):
        if not torch.is_grad_enabled():
            return _forward_launch(*inputs)      # autograd.Function.apply alone costs 5.5 us of host time
        return _PrefixAttentionFunction.apply(*inputs)
    return prefix_attention_fwd(*inputs)


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
            mask comes from Philox in the kernel (one draw per 8 keys, ``dropout_p`` applied at
            a resolution of 2**-16) and is regenerated in the backward pass. Pass 0.0 in
            evaluation.
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
        v, prefix_k and prefix_v. ``out`` and the gradients of q, k and v are laid out like their
        inputs when the head dim is unit-stride (HF's ``[B, S, H, D]`` memory stays so), else
        contiguous. A shared or per-task prefix's gradient is the sum over the
        rows that read it. ``lse`` carries no gradient, and the gradients are not differentiable
        again (no double backward), as in flash-attn.

    Raises:
        ValueError / TypeError naming the argument, before any kernel is launched (among them a
        head dim over 256 on the Triton path).
    """
    check_prefix_attention_args(
        q, k, v, prefix_k, prefix_v, causal=causal, softmax_scale=softmax_scale,
        key_padding_mask=key_padding_mask, prefix_index=prefix_index, dropout_p=dropout_p,
        alibi_slopes=alibi_slopes, softcap=softcap, window=window,
    )
    if use_triton(q.device):
        check_kernel_head_dim(q.shape[-1])
        scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
        seed = _dropout_seed(q, dropout_p, q.shape[2], prefix_k.shape[-2], k.shape[2])
        out, lse = _attention_fwd(
            q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, alibi_slopes, seed, causal, scale,
            float(dropout_p), None if softcap is None else float(softcap), None if window is None else int(window),
            None, None, 0, 0,
        )
        return (out, lse) if return_lse else out
    return reference.prefix_attention(
        q, k, v, prefix_k, prefix_v, causal=causal, softmax_scale=softmax_scale,
        key_padding_mask=key_padding_mask, prefix_index=prefix_index, dropout_p=dropout_p,
        alibi_slopes=alibi_slopes, softcap=softcap, window=window, return_lse=return_lse,
    )


def prefix_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    prefix_index: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
):
    """``prefix_attention`` on packed sequences (flash-attn's varlen layout), with no padding.

    Sequence b is tokens ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of ``q`` and attends to its own
    keys ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of ``k``/``v``, after the prefix; nothing crosses
    from one sequence to another. Within a sequence the math is ``prefix_attention``'s (causal
    bottom-right aligned per sequence, the prefix at positions 0..P-1 for ALiBi and windows).

    Args:
        q: ``[total_q, Hq, D]``, float16 / bfloat16 / float32, any strides.
        k, v: ``[total_k, Hkv, D]``, q's dtype and device. ``Hq % Hkv == 0``.
        prefix_k, prefix_v: ``[Hkv, P, D]`` shared, ``[B, Hkv, P, D]`` one per sequence, or
            ``[T, Hkv, P, D]`` with ``prefix_index`` ``[B]``.
        cu_seqlens_q, cu_seqlens_k: ``[B + 1]`` int32 (or int64), rising from 0 to
            ``total_q`` / ``total_k``. For self-attention over packed sequences they are the same tensor.
        max_seqlen_q, max_seqlen_k: the longest sequence's lengths (they size the launch grid).
        causal, softmax_scale, dropout_p, alibi_slopes (``[Hq]`` or ``[B, Hq]``), softcap, window:
            as in ``prefix_attention``, per sequence.
        return_lse: also return the float32 log-sum-exp, ``[Hq, total_q]``.

    Returns:
        ``out`` ``[total_q, Hq, D]`` in q's dtype (and ``lse``), differentiable in q, k, v,
        prefix_k and prefix_v.

    Raises:
        ValueError / TypeError naming the argument, before any kernel is launched.
    """
    check_prefix_attention_varlen_args(
        q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
        softmax_scale=softmax_scale, prefix_index=prefix_index, dropout_p=dropout_p, alibi_slopes=alibi_slopes,
        softcap=softcap, window=window,
    )
    if use_triton(q.device):
        check_kernel_head_dim(q.shape[-1])
        scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
        seed = _dropout_seed(q, dropout_p, max_seqlen_q, prefix_k.shape[-2], max_seqlen_k)
        out, lse = _attention_fwd(
            q, k, v, prefix_k, prefix_v, prefix_index, None, alibi_slopes, seed, causal, scale, float(dropout_p),
            None if softcap is None else float(softcap), None if window is None else int(window), cu_seqlens_q,
            cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        )
        return (out, _packed_lse(lse, cu_seqlens_q, q.shape[0])) if return_lse else out
    return reference.prefix_attention_varlen(
        q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=softmax_scale,
        prefix_index=prefix_index, dropout_p=dropout_p, alibi_slopes=alibi_slopes, softcap=softcap, window=window,
        return_lse=return_lse,
    )


def _dropout_seed(q: torch.Tensor, dropout_p: float, seq_len_q: int, prefix_len: int,
                  seq_len_kv: int) -> torch.Tensor | None:
    """The Philox seed of attention dropout, drawn from torch's generator (so torch.manual_seed makes
    the mask reproducible); None without dropout."""
    if dropout_p == 0.0:
        return None
    # An import statement, not the lazy loader: torch.compile traces this function, and the
    # loader's first call imports through importlib, which dynamo will not trace.
    from ..kernels._attention_common import check_dropout_counters

    check_dropout_counters(seq_len_q, prefix_len, seq_len_kv)
    return torch.randint(0, 2**31 - 1, (1,), device=q.device, dtype=torch.int64)


def _packed_lse(lse: torch.Tensor, cu_seqlens_q: torch.Tensor, total_q: int) -> torch.Tensor:
    """The kernels' per-sequence ``[B, Hq, max_seqlen_q]`` log-sum-exp as flash-attn's varlen
    ``[Hq, total_q]``."""
    starts = cu_seqlens_q[:-1].long()
    lengths = cu_seqlens_q[1:].long() - starts
    seq = torch.repeat_interleave(torch.arange(lengths.shape[0], device=lse.device), lengths, output_size=total_q)
    pos = torch.arange(total_q, device=lse.device) - starts[seq]
    return lse[seq, :, pos].t()


def launched_tiles() -> dict[str, tuple[int, int, int, int]]:
    """Diagnostics: ``{kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)}`` that the attention
    kernels (``fwd``, ``dq``, ``dkdv``) launched with since the previous call, as autotuning chose
    them. The benchmarks record it beside each timing."""
    from ..kernels._launch import take_launched_configs

    return take_launched_configs(("fwd", "dq", "dkdv"))
