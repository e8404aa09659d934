"""Plain-PyTorch implementations: the ground truth every kernel is tested against, and the
path CPU tensors take when no kernel backend is forced.

Everything here is written for clarity, not speed: the prefix is concatenated to the keys,
KV heads are repeated for GQA, and the whole score matrix is materialised in float32.
The math is the contract of ``prefixkern.prefix_attention`` and ``prefixkern.fused_prefix_mlp``.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "expand_prefix",
    "alibi_key_positions",
    "prefix_attention_mask",
    "prefix_attention",
    "prefix_attention_varlen",
    "prefix_mlp",
    "prefix_mlp_rows",
]


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every kernel dtype; float64 stays float64 so tests can build a tighter oracle."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_prefix(prefix: torch.Tensor, batch: int, prefix_index: torch.Tensor | None = None) -> torch.Tensor:
    """The prefix as one ``[B, Hkv, P, D]`` tensor, whatever form it came in.

    ``[Hkv, P, D]`` is batch-shared, ``[B, Hkv, P, D]`` per row, and ``[T, Hkv, P, D]`` with
    ``prefix_index`` ([B], values in [0, T)) one of T per-task prefixes per row.
    """
    if prefix_index is not None:
        return prefix.index_select(0, prefix_index.long())
    if prefix.dim() == 3:
        return prefix.unsqueeze(0).expand(batch, -1, -1, -1)
    return prefix


def alibi_key_positions(key_padding_mask: torch.Tensor | None, batch: int, prefix_len: int, seq_len_kv: int,
                        device: torch.device) -> torch.Tensor:
    """ALiBi positions of the keys ``[prefix ; sequence]``, float32 ``[B, P + S_kv]``.

    HF BLOOM builds them from the attention mask with the prefix's ones prepended, as
    ``(mask.cumsum(-1) - 1) * mask``: prefix key j sits at j, a real sequence key at P plus
    the number of real keys before it; a padded key gets 0 (it is masked out anyway).
    """
    prefix_pos = torch.arange(prefix_len, device=device, dtype=torch.float32).expand(batch, -1)
    if key_padding_mask is None:
        seq_pos = torch.arange(prefix_len, prefix_len + seq_len_kv, device=device, dtype=torch.float32)
        seq_pos = seq_pos.expand(batch, -1)
    else:
        real = key_padding_mask.to(torch.int64)
        seq_pos = ((real.cumsum(-1) - 1 + prefix_len) * real).to(torch.float32)
    return torch.cat([prefix_pos, seq_pos], dim=-1)


def prefix_attention_mask(batch: int, seq_len_q: int, prefix_len: int, seq_len_kv: int, *, causal: bool,
                          key_padding_mask: torch.Tensor | None, window: int | None,
                          device: torch.device) -> torch.Tensor:
    """Boolean visibility ``[B, 1, S, P + S_kv]`` (True = query may attend to key).

    Positions: prefix key j is at j, sequence key j at P + j, query i at P + (S_kv - S) + i
    (bottom-right aligned, so a decoding step's queries sit at the end of the cache).
    ``causal``: sequence key j is visible iff ``j <= i + (S_kv - S)``; the prefix always is.
    ``window``: key visible iff ``pos(query) - pos(key) < window`` (HF's sliding window), for
    prefix keys too, so a window can move past the prefix.
    ``key_padding_mask`` ([B, S_kv], True = real) hides padded sequence keys.
    """
    q_pos = prefix_len + (seq_len_kv - seq_len_q) + torch.arange(seq_len_q, device=device)
    k_pos = torch.arange(prefix_len + seq_len_kv, device=device)
    visible = torch.ones(seq_len_q, prefix_len + seq_len_kv, dtype=torch.bool, device=device)
    if causal:
        # Sequence keys only: the prefix stays visible even to a query placed before it, which
        # happens when S > S_kv (a chunk longer than the keys it may see).
        visible[:, prefix_len:] &= k_pos[None, prefix_len:] <= q_pos[:, None]
    if window is not None:
        visible &= (q_pos[:, None] - k_pos[None, :]) < window
    visible = visible.expand(batch, 1, -1, -1)
    if key_padding_mask is not None:
        keep_keys = torch.cat(
            [torch.ones(batch, prefix_len, dtype=torch.bool, device=device), key_padding_mask.to(torch.bool)], dim=-1
        )
        visible = visible & keep_keys[:, None, None, :]
    return visible


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
    dropout_keep: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
):
    """Attention of ``q`` over ``[prefix ; sequence]`` keys, computed the obvious way.

    Shapes as in ``prefixkern.prefix_attention``. The scores are, in order:
    ``s = scale * q.k``; ``s = softcap * tanh(s / softcap)`` if ``softcap``; ``s += slope[h] *
    pos(key)`` if ``alibi_slopes``; hidden keys set to -inf. A query row with no visible key
    gives 0 and an lse of -inf. ``dropout_keep`` ([B, Hq, S, P + S_kv] bool) is the keep mask
    of attention dropout, applied after the softmax and scaled by ``1 / (1 - dropout_p)``.
    Returns ``out`` in q's dtype (and the float32 natural-log ``lse`` [B, Hq, S]).
    """
    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, seq_len_kv = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    pk = expand_prefix(prefix_k, batch, prefix_index)
    pv = expand_prefix(prefix_v, batch, prefix_index)
    prefix_len = pk.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    acc = _accumulate_dtype(q.dtype)
    keys = torch.cat([pk.to(k.dtype), k], dim=2).to(acc).repeat_interleave(group, dim=1)
    values = torch.cat([pv.to(v.dtype), v], dim=2).to(acc).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(acc), keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(acc)
        slopes = slopes.expand(batch, -1) if slopes.dim() == 1 else slopes
        positions = alibi_key_positions(key_padding_mask, batch, prefix_len, seq_len_kv, q.device)
        scores = scores + slopes[:, :, None, None] * positions.to(acc)[:, None, None, :]
    visible = prefix_attention_mask(batch, seq_len_q, prefix_len, seq_len_kv, causal=causal,
                                    key_padding_mask=key_padding_mask, window=window, device=q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # A row with nothing visible has lse = -inf; exp(-inf - (-inf)) would be NaN, so pin it.
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse[..., None])
    if dropout_p > 0.0:
        if dropout_keep is None:
            dropout_keep = torch.rand_like(probs) >= dropout_p
        probs = probs * dropout_keep.to(probs.dtype) / (1.0 - dropout_p)
    out = torch.matmul(probs, values).to(q.dtype)
    if return_lse:
        return out, lse
    return out


def prefix_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    prefix_index: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_keep: list[torch.Tensor] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
):
    """``prefix_attention`` on packed sequences, one sequence at a time.

    Sequence b is ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]`` (``[total_q, Hq, D]``) over keys
    ``k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]`` (``[total_k, Hkv, D]``) and its prefix: the shared one,
    ``prefix_k[b]`` per sequence, or ``prefix_k[prefix_index[b]]``. ``dropout_keep``: one
    ``[1, Hq, S_b, P + S_kv_b]`` keep mask per sequence. Returns ``out`` ``[total_q, Hq, D]`` (and the
    float32 ``lse`` ``[Hq, total_q]``).
    """
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(bounds_q) - 1):
        if prefix_index is not None:
            pk, pv = prefix_k[int(prefix_index[b])], prefix_v[int(prefix_index[b])]
        elif prefix_k.dim() == 4:
            pk, pv = prefix_k[b], prefix_v[b]
        else:
            pk, pv = prefix_k, prefix_v
        qb = q[bounds_q[b]:bounds_q[b + 1]].transpose(0, 1).unsqueeze(0)
        kb = k[bounds_k[b]:bounds_k[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = v[bounds_k[b]:bounds_k[b + 1]].transpose(0, 1).unsqueeze(0)
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        out, lse = prefix_attention(
            qb, kb, vb, pk, pv, causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p,
            dropout_keep=None if dropout_keep is None else dropout_keep[b], alibi_slopes=slopes, softcap=softcap,
            window=window, return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)
    if return_lse:
        lse = torch.cat(lses, dim=1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
        return out, lse
    return out


def prefix_mlp_rows(embedding: torch.Tensor, w1: torch.Tensor | None = None, b1: torch.Tensor | None = None,
                    w2: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                    compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """PEFT's ``PrefixEncoder`` on P rows: ``Linear2(tanh(Linear1(E)))``, or ``E`` itself when
    there is no projection (P-Tuning v2). Returns ``[P, 2 * L * Hkv * D]`` in float32 (float64 for
    float64 input).

    ``compute_dtype`` float16 / bfloat16 computes what ``nn.Linear`` and ``nn.Tanh`` do in that dtype
    (16-bit parameters, or float32 ones under ``torch.autocast``): every operand cast to it, each
    output rounded to it. Otherwise (the default) everything is float32 (float64 for float64 input),
    whatever autocast says: the oracle states its precision rather than inheriting it."""
    acc = _accumulate_dtype(embedding.dtype)
    if w1 is None:
        return embedding.to(acc)
    low = compute_dtype if compute_dtype in (torch.float16, torch.bfloat16) else None
    dtype = low or acc

    def cast(t):
        return None if t is None else t.to(dtype)

    with torch.autocast(embedding.device.type, enabled=False):
        hidden = torch.tanh(torch.nn.functional.linear(cast(embedding), cast(w1), cast(b1)))
        return torch.nn.functional.linear(hidden, cast(w2), cast(b2)).to(acc)


def prefix_mlp(
    embedding: torch.Tensor,
    w1: torch.Tensor | None,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
    dropout_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """The prefix keys and values of every layer, ``[L, 2, Hkv, P, D]``, products as
    ``prefix_mlp_rows`` computes them for ``compute_dtype``.

    Column ``c`` of the encoder's ``[P, 2*L*Hkv*D]`` output is, as PEFT views and permutes it,
    ``c = ((l * 2 + t) * Hkv + g) * D + d`` with t = 0 for keys and 1 for values. ``dropout_keep``
    ([P, 2*L*Hkv*D] bool) is the keep mask of prefix dropout on that output.
    """
    rows = prefix_mlp_rows(embedding, w1, b1, w2, b2, compute_dtype)
    if dropout_p > 0.0:
        if dropout_keep is None:
            dropout_keep = torch.rand_like(rows) >= dropout_p
        rows = rows * dropout_keep.to(rows.dtype) / (1.0 - dropout_p)
    num_rows = rows.shape[0]
    out = rows.view(num_rows, num_layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4)
    return out.to(out_dtype or embedding.dtype)
