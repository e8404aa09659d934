"""Argument checks shared by the ops: every bad input becomes a ``ValueError``/``TypeError``
naming the argument and what was expected, before anything is launched."""
from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The widest head the Triton attention kernels take: their tiles hold a whole head, padded to a
# power of two, and the tile tables stop at 256 (flash-attention's limit too).
KERNEL_MAX_HEAD_DIM = 256


def check_kernel_head_dim(head_dim: int) -> None:
    """Raise for a head dim the Triton kernels do not take (before any launch; the reference
    backend computes any)."""
    if head_dim > KERNEL_MAX_HEAD_DIM:
        raise ValueError(f"q's head dim D={head_dim} is over the {KERNEL_MAX_HEAD_DIM} the Triton kernels take "
                         "(a tile holds a whole head); prefixkern.use_backend('reference') computes it in PyTorch")


def is_real_number(value) -> bool:
    """A real number (Python's or numpy's scalars), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be torch.float16, torch.bfloat16, torch.float32 or None, got {out_dtype!r}")


def check_tensor(name: str, t, ndim: int | tuple[int, ...], shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(f"{name} must have shape {shape_doc}, got a {t.dim()}-d tensor of shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


# Index tensors whose values passed a check, with the tensor's version and what it was checked
# against: a model calls an op once per layer with the same cu_seqlens / prefix_index tensors, and
# reading their values synchronises the host with the device, so each is read once per batch.
# Keyed by id (a WeakKeyDictionary would compare tensors with ==); the weakref confirms identity
# and drops the entry when the tensor is freed.
_CHECKED: dict[int, tuple] = {}


def _needs_value_check(t: torch.Tensor, against: tuple) -> bool:
    """Whether ``t``'s values must be read and checked (not while torch.compile traces, nor when
    this very tensor, unmodified, already passed against the same sizes)."""
    if torch.compiler.is_compiling():
        return False
    entry = _CHECKED.get(id(t))
    return entry is None or entry[0]() is not t or entry[1:] != (t._version, against)


def _passed_value_check(t: torch.Tensor, against: tuple) -> None:
    key = id(t)
    _CHECKED[key] = (weakref.ref(t, lambda _, key=key: _CHECKED.pop(key, None)), t._version, against)


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    num_heads: int
    num_kv_heads: int
    seq_len_q: int
    seq_len_kv: int
    prefix_len: int
    head_dim: int
    prefix_mode: str  # "shared" [Hkv, P, D] | "per_row" [B, Hkv, P, D] | "per_task" [T, Hkv, P, D] + index


def _check_tensor_kinds(q, k, v, prefix_k, prefix_v, q_dims: int, q_doc: str, kv_doc: str) -> None:
    check_tensor("q", q, q_dims, q_doc)
    check_tensor("k", k, q_dims, kv_doc)
    check_tensor("v", v, q_dims, kv_doc)
    check_tensor("prefix_k", prefix_k, (3, 4), "[Hkv, P, D], [B, Hkv, P, D] or [T, Hkv, P, D]")
    check_tensor("prefix_v", prefix_v, (3, 4), "[Hkv, P, D], [B, Hkv, P, D] or [T, Hkv, P, D]")
    check_float("q", q)
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {kv_doc}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have q's head dim {q.shape[-1]} in its last dim ({kv_doc}), got {tuple(k.shape)}")
    if q.shape[-1] == 0:
        raise ValueError("q must have a head dim D > 0")


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"q's heads Hq={num_heads} must be a multiple of k's heads Hkv={num_kv_heads} (GQA/MQA)")


def check_prefix_attention_args(q, k, v, prefix_k, prefix_v, *, causal, softmax_scale, key_padding_mask,
                                prefix_index, dropout_p, alibi_slopes, softcap, window) -> AttentionShape:
    """Validate ``prefix_attention``'s arguments; return the sizes they imply."""
    _check_tensor_kinds(q, k, v, prefix_k, prefix_v, 4, "[B, Hq, S, D]", "[B, Hkv, S_kv, D]")
    batch, num_heads, seq_len_q, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k must have q's batch size {batch} in dim 0 ([B, Hkv, S_kv, D]), got {tuple(k.shape)}")
    num_kv_heads, seq_len_kv = k.shape[1], k.shape[2]
    _check_heads(num_heads, num_kv_heads)
    if seq_len_q == 0:
        raise ValueError("q must have at least one query (S > 0), got S=0")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, 2, "[B, S_kv]")
        if tuple(key_padding_mask.shape) != (batch, seq_len_kv):
            raise ValueError(
                f"key_padding_mask must have shape [B, S_kv]=[{batch}, {seq_len_kv}], got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.dtype.is_complex:
            raise TypeError(f"key_padding_mask must be bool or integer (1 = real token), got {key_padding_mask.dtype}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")
    prefix_len, mode = _check_prefix_and_options(
        q, prefix_k, prefix_v, batch, num_heads, num_kv_heads, head_dim, causal=causal, softmax_scale=softmax_scale,
        prefix_index=prefix_index, dropout_p=dropout_p, alibi_slopes=alibi_slopes, softcap=softcap, window=window)
    return AttentionShape(batch, num_heads, num_kv_heads, seq_len_q, seq_len_kv, prefix_len, head_dim, mode)


def check_prefix_attention_varlen_args(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, *, causal, softmax_scale, prefix_index, dropout_p, alibi_slopes,
                                       softcap, window) -> AttentionShape:
    """Validate ``prefix_attention_varlen``'s arguments; return the sizes they imply (S and S_kv
    are the longest sequence's). The values of cu_seqlens are read (a device sync) once per tensor
    and version, and not while torch.compile traces."""
    _check_tensor_kinds(q, k, v, prefix_k, prefix_v, 3, "[total_q, Hq, D]", "[total_k, Hkv, D]")
    total_q, num_heads, head_dim = q.shape
    total_k, num_kv_heads = k.shape[0], k.shape[1]
    _check_heads(num_heads, num_kv_heads)
    if total_q == 0:
        raise ValueError("q must hold at least one token (total_q > 0), got 0")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, 1, "[B + 1]")
        if cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
        if cu.shape[0] < 2:
            raise ValueError(f"{name} must have shape [B + 1] with B >= 1 sequences, got {tuple(cu.shape)}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's shape {tuple(cu_seqlens_q.shape)} (one entry per "
                         f"sequence, plus one), got {tuple(cu_seqlens_k.shape)}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    for name, cu, total, longest, longest_name in (
            ("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q"),
            ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "max_seqlen_k")):
        if not _needs_value_check(cu, (total, longest)):
            continue
        bounds = cu.tolist()
        lengths = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != total or min(lengths) < 0:
            raise ValueError(f"{name} must rise from 0 to the token count {total} without decreasing, got {bounds}")
        if max(lengths) > longest:
            raise ValueError(f"{longest_name}={longest} is shorter than the longest sequence ({max(lengths)} "
                             f"tokens in {name})")
        _passed_value_check(cu, (total, longest))
    batch = cu_seqlens_q.shape[0] - 1
    prefix_len, mode = _check_prefix_and_options(
        q, prefix_k, prefix_v, batch, num_heads, num_kv_heads, head_dim, causal=causal, softmax_scale=softmax_scale,
        prefix_index=prefix_index, dropout_p=dropout_p, alibi_slopes=alibi_slopes, softcap=softcap, window=window)
    return AttentionShape(batch, num_heads, num_kv_heads, max_seqlen_q, max_seqlen_k, prefix_len, head_dim, mode)


def _check_prefix_and_options(q, prefix_k, prefix_v, batch, num_heads, num_kv_heads, head_dim, *, causal,
                              softmax_scale, prefix_index, dropout_p, alibi_slopes, softcap,
                              window) -> tuple[int, str]:
    """The prefix, prefix_index, ALiBi slopes and scalar options, for ``batch`` rows; returns
    ``(P, prefix mode)``."""
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(
            f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}"
        )
    if prefix_k.shape[-3] != num_kv_heads or prefix_k.shape[-1] != head_dim:
        raise ValueError(
            f"prefix_k must have Hkv={num_kv_heads} heads and head dim D={head_dim} ([.., Hkv, P, D]), "
            f"got {tuple(prefix_k.shape)}"
        )
    prefix_len = prefix_k.shape[-2]
    if prefix_len == 0:
        raise ValueError("prefix_k must hold at least one prefix token (P > 0), got P=0")

    if prefix_index is not None:
        check_tensor("prefix_index", prefix_index, 1, "[B]")
        if prefix_k.dim() != 4:
            raise ValueError(
                f"prefix_index needs per-task prefixes [T, Hkv, P, D], got prefix_k of shape {tuple(prefix_k.shape)}"
            )
        if prefix_index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"prefix_index must be int32 or int64, got {prefix_index.dtype}")
        if prefix_index.shape[0] != batch:
            raise ValueError(f"prefix_index must have shape [B]=[{batch}], got {tuple(prefix_index.shape)}")
        if prefix_index.device != q.device:
            raise ValueError(f"prefix_index must be on q's device {q.device}, got {prefix_index.device}")
        num_tasks = prefix_k.shape[0]
        if batch > 0 and _needs_value_check(prefix_index, (num_tasks,)):
            lo, hi = int(prefix_index.min()), int(prefix_index.max())
            if lo < 0 or hi >= num_tasks:
                raise ValueError(f"prefix_index values must lie in [0, T={num_tasks}), got min {lo} and max {hi}")
            _passed_value_check(prefix_index, (num_tasks,))
        mode = "per_task"
    elif prefix_k.dim() == 4:
        if prefix_k.shape[0] != batch:
            raise ValueError(
                f"a 4-d prefix_k is per row [B={batch}, Hkv, P, D] (or per task with prefix_index), "
                f"got {tuple(prefix_k.shape)} and no prefix_index"
            )
        mode = "per_row"
    else:
        mode = "shared"

    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, (1, 2), "[Hq] or [B, Hq]")
        expected = (num_heads,) if alibi_slopes.dim() == 1 else (batch, num_heads)
        if tuple(alibi_slopes.shape) != expected:
            raise ValueError(f"alibi_slopes must have shape {list(expected)}, got {tuple(alibi_slopes.shape)}")
        if not alibi_slopes.dtype.is_floating_point:
            raise TypeError(f"alibi_slopes must be floating point, got {alibi_slopes.dtype}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and not (is_real_number(softmax_scale) and 0 < softmax_scale < math.inf):
        raise ValueError(f"softmax_scale must be a positive finite float or None, got {softmax_scale!r}")
    if not is_real_number(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if softcap is not None and not (is_real_number(softcap) and 0 < softcap < math.inf):
        raise ValueError(f"softcap must be a positive finite float or None, got {softcap!r}")
    if window is not None and not (isinstance(window, numbers.Integral) and not isinstance(window, bool) and window > 0):
        raise ValueError(f"window must be a positive int (HF sliding_window) or None, got {window!r}")
    return prefix_len, mode
