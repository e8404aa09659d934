"""Forward kernel of prefix attention: one program per (query block, batch row, query head) runs an
online softmax over the P prefix keys, then over the row's sequence keys, reading both from their
own tensors, so ``[prefix ; sequence]`` is never materialised.

Scores are kept in log2 units (``exp2`` is one instruction) except where soft-capping or ALiBi
need natural units; the log-sum-exp written for the backward pass is natural-log.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (LaunchPlan, cdiv, input_precision, keep_plan, kept_plan, launch_kernel, next_power_of_2,
                      pick_config, plan_table)
from ._math import dot, log2e
from ._attention_common import (
    PackedRows,
    alibi_sequence_positions,
    attention_dims,
    attention_plan_key,
    attention_launch_args,
    batch_row,
    bhsd_strides,
    config_bucket,
    dropout_keep,
    dropout_row_groups,
    dropout_sequence_col0,
    empty_in_layout_of,
    fitting_configs,
    grid_program,
    grid_shape,
    heavy_first,
    load_tile,
    packed_row,
    prefix_row,
    prefix_strides,
    prefix_visible,
    real_key_range,
    scores_log2,
    sequence_key_range,
    sequence_visible,
)

__all__ = ["prefix_attention_forward"]


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _attend_block(acc, m_i, l_i, q, kT_ptrs, v_ptrs, keys_ok, offs_d, D, vis, key_pos, drop_col0,
                  sm_scale, qk_scale, softcap, slope, seed, bh, offs_m, row_groups, dropout_p,
                  MASKED: tl.constexpr, EVEN_D: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One step of the online softmax over a block of keys (prefix or sequence); ``drop_col0`` is
    the block's first dropout column (``_attention_common``)."""
    d_ok = offs_d < D
    kT = load_tile(kT_ptrs, keys_ok[None, :], d_ok[:, None], MASKED, not EVEN_D)
    s, _ = scores_log2(dot(q, kT, INPUT_PRECISION), sm_scale, qk_scale, softcap, slope, key_pos[None, :],
                       HAS_SOFTCAP, HAS_ALIBI)
    if MASKED:
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; exp2(-inf - -inf) would be NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        # The normaliser counts every weight; dropout only drops terms of the output.
        p = tl.where(dropout_keep(seed, bh, offs_m, drop_col0, row_groups, dropout_p, p.shape[1]), p, 0.0)
    v = load_tile(v_ptrs, keys_ok[:, None], d_ok[None, :], MASKED, not EVEN_D)
    acc += dot(p.to(v.dtype), v, INPUT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_sequence(acc, m_i, l_i, q, lo, hi, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, kpm_row,
                     stride_kpms, pos_row, stride_poss, offs_m, offs_n, offs_d, S, S_kv, P, D, window, sm_scale,
                     qk_scale, softcap, slope, seed, bh, row_groups, dropout_p, MASKED: tl.constexpr,
                     EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_KPM: tl.constexpr, HAS_POS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The online softmax over sequence key blocks ``[lo, hi)``, with or without the visibility mask."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_s = start_n + offs_n
        vis = sequence_visible(offs_m, offs_s, S, S_kv, window, kpm_row, stride_kpms, True, CAUSAL, HAS_WINDOW,
                               HAS_KPM) \
            if MASKED else None
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q,
            k_base + offs_s[None, :] * stride_ks + offs_d[:, None] * stride_kd,
            v_base + offs_s[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            offs_s < S_kv, offs_d, D, vis,
            alibi_sequence_positions(pos_row, stride_poss, offs_s, S_kv, P, HAS_POS),
            dropout_sequence_col0(P) + start_n,
            sm_scale, qk_scale, softcap, slope, seed, bh, offs_m, row_groups, dropout_p,
            MASKED, EVEN_D, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def prefix_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, out_ptr, lse_ptr,
    prefix_index_ptr, kpm_ptr, slopes_ptr, pos_ptr, seed_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkb, stride_pkh, stride_pks, stride_pkd,
    stride_pvb, stride_pvh, stride_pvs, stride_pvd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_kpmb, stride_kpms, stride_slb, stride_slh, stride_posb, stride_poss,
    Hq, S, S_kv, P, D, window, sm_scale, softcap, dropout_p,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PREFIX_INDEX: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr, VARLEN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    HEAVY_FIRST: tl.constexpr,
):
    # Query block, head and row from a 3-D grid (no (row * Hq + head) axis, which could pass the
    # 65535 limit of grid.y and z); with HEAVY_FIRST the last query blocks first (grid_program).
    start_m, h, b = grid_program(HEAVY_FIRST)
    bh = b * Hq + h
    g = h // GROUP
    b64 = b.to(tl.int64)
    # This row's token range; S stays the row length of lse (the longest row when packed).
    q_start, S_q, k_start, S_k = packed_row(b, cu_seqlens_q_ptr, cu_seqlens_k_ptr, S, S_kv, VARLEN)
    if VARLEN:
        if start_m * BLOCK_M >= S_q:   # the grid covers the longest packed sequence
            return
    pb = prefix_row(b, prefix_index_ptr, HAS_PREFIX_INDEX)
    # The row's real keys, read from its padding mask before any tile is live (fewer registers).
    kpm_row = batch_row(kpm_ptr, b64, stride_kpmb, HAS_KPM)
    real_lo, real_hi = real_key_range(kpm_row, stride_kpms, S_k, HAS_KPM)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S_q
    d_ok = offs_d < D

    q_base = q_ptr + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qs
    q = load_tile(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                  m_ok[:, None], d_ok[None, :], True, not EVEN_D)
    qk_scale = sm_scale * log2e()
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + b64 * stride_slb + h * stride_slh)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    row_groups = dropout_row_groups(P, S_k)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # ---- prefix keys: visible to every query (a sliding window aside) ----
    pk_base = pk_ptr + pb * stride_pkb + g.to(tl.int64) * stride_pkh
    pv_base = pv_ptr + pb * stride_pvb + g.to(tl.int64) * stride_pvh
    full_p = 0 if HAS_WINDOW else P // BLOCK_N * BLOCK_N
    for start_p in range(0, full_p, BLOCK_N):
        offs_p = start_p + offs_n
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q,
            pk_base + offs_p[None, :] * stride_pks + offs_d[:, None] * stride_pkd,
            pv_base + offs_p[:, None] * stride_pvs + offs_d[None, :] * stride_pvd,
            offs_p < P, offs_d, D, None, offs_p.to(tl.float32), start_p,
            sm_scale, qk_scale, softcap, slope, seed, bh, offs_m, row_groups, dropout_p,
            False, EVEN_D, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION)
    for start_p in range(full_p, P, BLOCK_N):
        offs_p = start_p + offs_n
        vis = prefix_visible(offs_m, offs_p, S_q, S_k, P, window, HAS_WINDOW)
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q,
            pk_base + offs_p[None, :] * stride_pks + offs_d[:, None] * stride_pkd,
            pv_base + offs_p[:, None] * stride_pvs + offs_d[None, :] * stride_pvd,
            offs_p < P, offs_d, D, vis, offs_p.to(tl.float32), start_p,
            sm_scale, qk_scale, softcap, slope, seed, bh, offs_m, row_groups, dropout_p,
            True, EVEN_D, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION)

    # ---- sequence keys: masked only in the blocks where causality, a window or padding bite ----
    k_base = k_ptr + b64 * stride_kb + g.to(tl.int64) * stride_kh + k_start * stride_ks
    v_base = v_ptr + b64 * stride_vb + g.to(tl.int64) * stride_vh + k_start * stride_vs
    pos_row = batch_row(pos_ptr, b64, stride_posb, HAS_POS)
    q_lo = start_m * BLOCK_M
    q_hi = tl.minimum(q_lo + BLOCK_M, S_q)
    lo, full_lo, full_hi, hi = sequence_key_range(q_lo, q_hi, S_q, S_k, window, real_lo, real_hi, BLOCK_N, CAUSAL,
                                                  HAS_WINDOW, HAS_KPM)
    acc, m_i, l_i = _attend_sequence(
        acc, m_i, l_i, q, lo, full_lo, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, kpm_row, stride_kpms,
        pos_row, stride_poss, offs_m, offs_n, offs_d, S_q, S_k, P, D, window, sm_scale, qk_scale, softcap, slope, seed,
        bh, row_groups, dropout_p, True, EVEN_D, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_POS, HAS_SOFTCAP,
        HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION)
    acc, m_i, l_i = _attend_sequence(
        acc, m_i, l_i, q, full_lo, full_hi, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, kpm_row, stride_kpms,
        pos_row, stride_poss, offs_m, offs_n, offs_d, S_q, S_k, P, D, window, sm_scale, qk_scale, softcap, slope, seed,
        bh, row_groups, dropout_p, False, EVEN_D, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_POS, HAS_SOFTCAP,
        HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION)
    acc, m_i, l_i = _attend_sequence(
        acc, m_i, l_i, q, full_hi, hi, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, kpm_row, stride_kpms,
        pos_row, stride_poss, offs_m, offs_n, offs_d, S_q, S_k, P, D, window, sm_scale, qk_scale, softcap, slope, seed,
        bh, row_groups, dropout_p, True, EVEN_D, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_POS, HAS_SOFTCAP,
        HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION)

    # ---- epilogue: a row with no visible key writes 0 and lse = -inf ----
    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / log2e())
    tl.store(lse_ptr + bh.to(tl.int64) * S + offs_m, lse, mask=m_ok)
    o_base = out_ptr + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start * stride_os
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

# Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) by element size and head-dim block, the
# fastest expected first (it is the one used when autotuning is off). Every entry compiles for
# sm_90 without register spills on Triton 3.9, with and without a padding mask, and every first
# entry on 3.6 too (there the padded variants of (128, 128, 8, 3) at (2, 128) and (32, 64, 4, 2) at
# (2, 256) spill, since the padded kernel reads its rows' real key range; the tuner drops them):
# tests/tools/kernel_resources.py measures it, and the tests fail if one starts to spill.
FWD_CONFIGS = {
    (2, 64): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
    (2, 128): [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 2), (128, 128, 8, 3),
               (128, 64, 8, 4)],
    (2, 256): [(64, 64, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2), (32, 32, 4, 2)],
    (4, 64): [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (32, 32, 4, 2)],
    (4, 128): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)],
    (4, 256): [(32, 64, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
}

# Few queries (decoding, short chunks): 16- and 32-row tiles, checked like the table above.
SHORT_QUERY_CONFIGS = {key: [(32, 64, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2)] for key in FWD_CONFIGS}
SHORT_QUERY_CONFIGS[(4, 256)] = [(32, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2)]


def _configs(head_dim_block: int, seq_len_q: int, dtype: torch.dtype) -> list[tuple[int, int, int, int]]:
    """The table's candidates for this launch, without query tiles much taller than the queries."""
    bucket = config_bucket(head_dim_block, dtype.itemsize)
    cap = max(16, next_power_of_2(seq_len_q))
    return [c for c in FWD_CONFIGS[bucket] if c[0] <= cap] or [c for c in SHORT_QUERY_CONFIGS[bucket] if c[0] <= cap]


def prefix_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                             prefix_v: torch.Tensor, *, prefix_index: torch.Tensor | None,
                             key_padding_mask: torch.Tensor | None, causal: bool, softmax_scale: float,
                             dropout_p: float, seed: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
                             softcap: float | None, window: int | None, packed: PackedRows | None = None):
    """Launch the forward kernel; returns ``(out [B, Hq, S, D] in q's dtype, lse [B, Hq, S] float32)``.
    Arguments are the checked ones of ``prefixkern.prefix_attention``; every tensor keeps its strides.
    With ``packed``, q/k/v/out are ``[total, H, D]`` and lse is ``[B, Hq, max_seqlen_q]``."""
    batch, num_heads, num_kv_heads, seq_len_q, seq_len_kv, head_dim = attention_dims(q, k, packed)
    out = empty_in_layout_of(q)
    lse = torch.empty(batch, num_heads, seq_len_q, dtype=torch.float32, device=q.device)
    if batch == 0 or seq_len_q == 0:
        return out, lse.fill_(float("-inf"))
    inputs = attention_launch_args(prefix_k, prefix_index, key_padding_mask, alibi_slopes, seed,
                                   *(packed[:2] if packed else ()))
    tensors = (q, k, v, prefix_k, prefix_v, out, lse, *inputs)
    key = attention_plan_key(tensors, causal, softmax_scale, dropout_p, softcap, window, packed)
    plan = kept_plan(_PLANS, key)
    if plan is None:
        plan = _forward_plan(tensors, inputs, batch, num_heads, num_kv_heads, seq_len_q, seq_len_kv, head_dim, causal,
                             softmax_scale, dropout_p, softcap, window, packed is not None)
        keep_plan(_PLANS, key, plan)
    plan.launch(tensors, launch_kernel)
    return out, lse


_PLANS = plan_table()


def _forward_plan(tensors, inputs, batch, num_heads, num_kv_heads, seq_len_q, seq_len_kv, head_dim, causal,
                  softmax_scale, dropout_p, softcap, window, varlen) -> LaunchPlan:
    """The forward's launch for these tensors (``prefix_attention_forward``'s order), its tile tuned
    on first use (each candidate launched on them)."""
    q, k, v, prefix_k, prefix_v, out = tensors[:6]
    prefix_len = prefix_k.shape[-2]
    block_d = max(16, next_power_of_2(head_dim))
    order = heavy_first(causal, k, batch, seq_len_q)
    flags = inputs.flags(dropout_p)
    tail = (*bhsd_strides(q, varlen), *bhsd_strides(k, varlen), *bhsd_strides(v, varlen),
            *prefix_strides(prefix_k), *prefix_strides(prefix_v), *bhsd_strides(out, varlen), *inputs.strides(),
            num_heads, seq_len_q, seq_len_kv, prefix_len, head_dim, window if window is not None else 0,
            float(softmax_scale), float(softcap) if softcap is not None else 1.0, float(dropout_p))
    key = ("fwd", q.device.index, q.dtype, block_d, num_heads // num_kv_heads, causal,
           next_power_of_2(seq_len_q), next_power_of_2(seq_len_kv + prefix_len),
           tuple(sorted(flags.items())), softcap is not None, window is not None)

    def plan_for(config):
        block_m, block_n, warps, stages = config
        return LaunchPlan(
            prefix_attention_fwd_kernel, grid_shape(cdiv(seq_len_q, block_m), num_heads, batch, order),
            tail,
            dict(GROUP=num_heads // num_kv_heads, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                 EVEN_D=block_d == head_dim, CAUSAL=causal, HAS_SOFTCAP=softcap is not None,
                 HAS_WINDOW=window is not None, INPUT_PRECISION=input_precision(q.dtype), HEAVY_FIRST=order,
                 num_warps=warps, num_stages=stages, **flags),
            key, config)

    def candidates():
        return fitting_configs("fwd", _configs(block_d, seq_len_q, q.dtype), block_d, q, fallback=(16, 32, 4, 1))

    config = pick_config(key, candidates, lambda config: plan_for(config).launch(tensors, launch_kernel))
    return plan_for(config)
