"""Backward kernels of prefix attention, FlashAttention-2 style: the probabilities are recomputed
from the saved log-sum-exp, never stored.

- ``prefix_attention_bwd_dq_kernel``: one program per (query block, batch row, query head)
  computes ``delta = rowsum(dO * O)`` of its rows (stored for the kernel below), walks the
  prefix then the sequence keys, like the forward, and owns its dQ rows (``_dq_program``).
- ``prefix_attention_bwd_dkdv_kernel``, one launch of two kinds of program (three for a small
  backward, ``backward_in_one_launch``: the dQ programs follow, and the dK/dV programs compute
  delta from O where they read it, so the whole backward is this one launch):
  ``_sequence_dkdv_program``, one per (sequence key block, batch row, KV head), walks the query
  blocks of every query head of its group (GQA without repeat_kv) and owns its dK/dV rows (where
  such programs leave the GPU idle over long rows, several share a group's heads, each writing
  a float32 partial: ``dkdv_head_splits``);
  ``_prefix_dkdv_program``: the prefix is read by every query of every row that shares it, so
  its gradient is a reduction over (row, head, query block) work items. Each of these programs
  takes a contiguous share of them and writes a float32 partial; the partials are summed once
  on the host side (no atomics: the result is deterministic and contention-free).

Every kernel regenerates the forward's dropout mask from the same Philox counters
(``dropout_keep``: one draw per query row and 8 key columns).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._attention_common import (
    PackedRows,
    alibi_sequence_positions,
    attention_dims,
    attention_launch_args,
    attention_plan_key,
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
from .._backend import override_global
from ._launch import (LaunchPlan, cdiv, device_index, input_precision, keep_plan, kept_plan, launch_kernel,
                      next_power_of_2, num_sms, pick_config, plan_table)
from ._math import dot, log2e

__all__ = ["prefix_attention_backward"]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _load_lse2(lse_ptr, offs_m, S):
    """Log-sum-exp in log2 units. Rows out of range or with no visible key (lse = -inf) get +inf,
    so every recomputed probability of theirs is exp2(-inf) = 0 rather than NaN."""
    lse = tl.load(lse_ptr + offs_m, mask=offs_m < S, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * log2e())


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_ptrs, v_ptrs, keys_ok, d_ok, vis, key_pos, drop_col0,
             sm_scale, qk_scale, softcap, slope, seed, bh, offs_m, row_groups, dropout_p,
             MASKED: tl.constexpr, EVEN_D: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
             HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dQ contribution of one block of keys, scores in [BLOCK_M, BLOCK_N] orientation; ``drop_col0``
    is the block's first dropout column (``_attention_common``)."""
    k = load_tile(k_ptrs, keys_ok[:, None], d_ok[None, :], MASKED, not EVEN_D)
    v = load_tile(v_ptrs, keys_ok[:, None], d_ok[None, :], MASKED, not EVEN_D)
    s, t = scores_log2(dot(q, tl.trans(k), INPUT_PRECISION), sm_scale, qk_scale, softcap, slope, key_pos[None, :],
                       HAS_SOFTCAP, HAS_ALIBI)
    if MASKED:
        s = tl.where(vis, s, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])
    dp = dot(do, tl.trans(v), INPUT_PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, bh, offs_m, drop_col0, row_groups, dropout_p, dp.shape[1])
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq += dot(ds.to(k.dtype), k, INPUT_PRECISION)
    return dq


@triton.jit
def _dq_sequence(dq, q, do, lse2, delta, lo, hi, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, kpm_row,
                 stride_kpms, pos_row, stride_poss, offs_m, offs_n, offs_d, d_ok, S, S_kv, P, window, sm_scale,
                 qk_scale, softcap, slope, seed, bh, row_groups, dropout_p, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                 HAS_POS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dQ over sequence key blocks ``[lo, hi)``, with or without the visibility mask."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_s = start_n + offs_n
        vis = sequence_visible(offs_m, offs_s, S, S_kv, window, kpm_row, stride_kpms, True, CAUSAL, HAS_WINDOW,
                               HAS_KPM) \
            if MASKED else None
        dq = _dq_step(dq, q, do, lse2, delta,
                      k_base + offs_s[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                      v_base + offs_s[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                      offs_s < S_kv, d_ok, vis,
                      alibi_sequence_positions(pos_row, stride_poss, offs_s, S_kv, P, HAS_POS),
                      dropout_sequence_col0(P) + start_n,
                      sm_scale, qk_scale, softcap, slope, seed, bh, offs_m, row_groups, dropout_p,
                      MASKED, EVEN_D, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION)
    return dq


@triton.jit
def _dq_program(
    start_m, h, b,
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    prefix_index_ptr, kpm_ptr, slopes_ptr, pos_ptr, seed_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkb, stride_pkh, stride_pks, stride_pkd,
    stride_pvb, stride_pvh, stride_pvs, stride_pvd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    stride_kpmb, stride_kpms, stride_slb, stride_slh, stride_posb, stride_poss,
    Hq, S, S_kv, P, D, window, sm_scale, softcap, dropout_p,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PREFIX_INDEX: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr, VARLEN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    STORE_DELTA: tl.constexpr,
):
    """dQ of query block ``start_m`` of (row ``b``, query head ``h``): walks the prefix then the
    sequence keys, like the forward, and owns its dQ rows."""
    bh = b * Hq + h
    g = (h // GROUP).to(tl.int64)
    b64 = b.to(tl.int64)
    # This row's token range; S stays the row length of lse and delta (the longest row when packed).
    q_start, S_q, k_start, S_k = packed_row(b, cu_seqlens_q_ptr, cu_seqlens_k_ptr, S, S_kv, VARLEN)
    if VARLEN:
        if start_m * BLOCK_M >= S_q:
            return
    pb = prefix_row(b, prefix_index_ptr, HAS_PREFIX_INDEX)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S_q
    d_ok = offs_d < D

    q = load_tile(q_ptr + b64 * stride_qb + h.to(tl.int64) * stride_qh + (q_start + offs_m[:, None]) * stride_qs
                  + offs_d[None, :] * stride_qd, m_ok[:, None], d_ok[None, :], True, not EVEN_D)
    do = load_tile(dout_ptr + b64 * stride_dob + h.to(tl.int64) * stride_doh + (q_start + offs_m[:, None]) * stride_dos
                   + offs_d[None, :] * stride_dod, m_ok[:, None], d_ok[None, :], True, not EVEN_D)
    lse2 = _load_lse2(lse_ptr + bh.to(tl.int64) * S, offs_m, S_q)
    # delta = rowsum(dO * O), computed here rather than by a kernel of its own (one launch fewer
    # per backward) and stored for the dK/dV kernel, which runs after this one on the stream
    # (STORE_DELTA; in the one-launch backward the dK/dV programs compute their own).
    o = load_tile(out_ptr + b64 * stride_ob + h.to(tl.int64) * stride_oh + (q_start + offs_m[:, None]) * stride_os
                  + offs_d[None, :] * stride_od, m_ok[:, None], d_ok[None, :], True, not EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if STORE_DELTA:
        tl.store(delta_ptr + bh.to(tl.int64) * S + offs_m, delta, mask=m_ok)
    qk_scale = sm_scale * log2e()
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + b64 * stride_slb + h * stride_slh)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    row_groups = dropout_row_groups(P, S_k)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    pk_base = pk_ptr + pb * stride_pkb + g * stride_pkh
    pv_base = pv_ptr + pb * stride_pvb + g * stride_pvh
    full_p = 0 if HAS_WINDOW else P // BLOCK_N * BLOCK_N
    for start_p in range(0, full_p, BLOCK_N):
        offs_p = start_p + offs_n
        dq = _dq_step(dq, q, do, lse2, delta,
                      pk_base + offs_p[:, None] * stride_pks + offs_d[None, :] * stride_pkd,
                      pv_base + offs_p[:, None] * stride_pvs + offs_d[None, :] * stride_pvd,
                      offs_p < P, d_ok, None, offs_p.to(tl.float32), start_p,
                      sm_scale, qk_scale, softcap, slope, seed, bh, offs_m, row_groups, dropout_p,
                      False, EVEN_D, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION)
    for start_p in range(full_p, P, BLOCK_N):
        offs_p = start_p + offs_n
        vis = prefix_visible(offs_m, offs_p, S_q, S_k, P, window, HAS_WINDOW)
        dq = _dq_step(dq, q, do, lse2, delta,
                      pk_base + offs_p[:, None] * stride_pks + offs_d[None, :] * stride_pkd,
                      pv_base + offs_p[:, None] * stride_pvs + offs_d[None, :] * stride_pvd,
                      offs_p < P, d_ok, vis, offs_p.to(tl.float32), start_p,
                      sm_scale, qk_scale, softcap, slope, seed, bh, offs_m, row_groups, dropout_p,
                      True, EVEN_D, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION)

    k_base = k_ptr + b64 * stride_kb + g * stride_kh + k_start * stride_ks
    v_base = v_ptr + b64 * stride_vb + g * stride_vh + k_start * stride_vs
    kpm_row = batch_row(kpm_ptr, b64, stride_kpmb, HAS_KPM)
    pos_row = batch_row(pos_ptr, b64, stride_posb, HAS_POS)
    q_lo = start_m * BLOCK_M
    q_hi = tl.minimum(q_lo + BLOCK_M, S_q)
    real_lo, real_hi = real_key_range(kpm_row, stride_kpms, S_k, HAS_KPM)
    lo, full_lo, full_hi, hi = sequence_key_range(q_lo, q_hi, S_q, S_k, window, real_lo, real_hi, BLOCK_N, CAUSAL,
                                                  HAS_WINDOW, HAS_KPM)
    dq = _dq_sequence(
        dq, q, do, lse2, delta, lo, full_lo, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, kpm_row,
        stride_kpms, pos_row, stride_poss, offs_m, offs_n, offs_d, d_ok, S_q, S_k, P, window, sm_scale, qk_scale,
        softcap, slope, seed, bh, row_groups, dropout_p, True, EVEN_D, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_POS,
        HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION)
    dq = _dq_sequence(
        dq, q, do, lse2, delta, full_lo, full_hi, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, kpm_row,
        stride_kpms, pos_row, stride_poss, offs_m, offs_n, offs_d, d_ok, S_q, S_k, P, window, sm_scale, qk_scale,
        softcap, slope, seed, bh, row_groups, dropout_p, False, EVEN_D, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_POS,
        HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION)
    dq = _dq_sequence(
        dq, q, do, lse2, delta, full_hi, hi, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, kpm_row,
        stride_kpms, pos_row, stride_poss, offs_m, offs_n, offs_d, d_ok, S_q, S_k, P, window, sm_scale, qk_scale,
        softcap, slope, seed, bh, row_groups, dropout_p, True, EVEN_D, BLOCK_N, CAUSAL, HAS_WINDOW, HAS_KPM, HAS_POS,
        HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION)

    dq = dq * sm_scale
    tl.store(dq_ptr + b64 * stride_dqb + h.to(tl.int64) * stride_dqh + (q_start + offs_m[:, None]) * stride_dqs
             + offs_d[None, :] * stride_dqd, dq.to(dq_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])




@triton.jit
def prefix_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    prefix_index_ptr, kpm_ptr, slopes_ptr, pos_ptr, seed_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkb, stride_pkh, stride_pks, stride_pkd,
    stride_pvb, stride_pvh, stride_pvs, stride_pvd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
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
    _dq_program(
        start_m, h, b,
        q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, prefix_index_ptr,
        kpm_ptr, slopes_ptr, pos_ptr, seed_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, stride_qb, stride_qh, stride_qs,
        stride_qd, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
        stride_pkb, stride_pkh, stride_pks, stride_pkd, stride_pvb, stride_pvh, stride_pvs, stride_pvd, stride_ob,
        stride_oh, stride_os, stride_od, stride_dob, stride_doh, stride_dos, stride_dod, stride_dqb, stride_dqh,
        stride_dqs, stride_dqd, stride_kpmb, stride_kpms, stride_slb, stride_slh, stride_posb, stride_poss, Hq, S,
        S_kv, P, D, window, sm_scale, softcap, dropout_p, GROUP, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, CAUSAL,
        HAS_PREFIX_INDEX, HAS_KPM, HAS_ALIBI, HAS_POS, HAS_SOFTCAP, HAS_WINDOW, HAS_DROPOUT, VARLEN, INPUT_PRECISION,
        True)


@triton.jit
def _delta_source(out_ptr, delta_ptr, b64, h, bh, q_start, S, stride_ob, stride_oh, stride_os,
                  DELTA_FROM_OUT: tl.constexpr):
    """``(o_row, delta_row)`` of (row ``b64``, query head ``h``): where a dK/dV program finds its
    queries' delta, the O rows to compute it from (DELTA_FROM_OUT) or the dQ kernel's store; 0
    for the other."""
    o_row = 0
    delta_row = 0
    if DELTA_FROM_OUT:
        o_row = out_ptr + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start * stride_os
    else:
        delta_row = delta_ptr + bh * S
    return o_row, delta_row


@triton.jit
def _row_tile_ptrs(row_ptr, offs_m, offs_d, stride_s, stride_d, PRESENT: tl.constexpr):
    """Pointers of a [BLOCK_M, BLOCK_D] tile of rows ``offs_m`` from ``row_ptr``; 0 where the
    tensor is not read (absent: passed as None)."""
    ptrs = 0
    if PRESENT:
        ptrs = row_ptr + offs_m[:, None] * stride_s + offs_d[None, :] * stride_d
    return ptrs


@triton.jit
def _dkdv_step(dk, dv, k, v, q_ptrs, do_ptrs, o_ptrs, lse_row_ptr, delta_row_ptr, offs_m, d_ok, vis, key_pos,
               drop_col0, S, sm_scale, qk_scale, softcap, slope, seed, bh, row_groups, dropout_p,
               MASKED: tl.constexpr, CHECK_M: tl.constexpr, EVEN_D: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               DELTA_FROM_OUT: tl.constexpr):
    """dK/dV contribution of one block of queries to a block of keys, scores transposed
    ([BLOCK_N keys, BLOCK_M queries]) so the accumulations need no transposed result. delta =
    rowsum(dO * O) of the queries is read from the dQ kernel's store, or with DELTA_FROM_OUT (the
    one-launch backward, where the dQ programs run beside this one) computed from their O tile."""
    m_ok = offs_m < S
    q = load_tile(q_ptrs, m_ok[:, None], d_ok[None, :], CHECK_M, not EVEN_D)
    do = load_tile(do_ptrs, m_ok[:, None], d_ok[None, :], CHECK_M, not EVEN_D)
    lse2 = _load_lse2(lse_row_ptr, offs_m, S)
    if DELTA_FROM_OUT:
        o = load_tile(o_ptrs, m_ok[:, None], d_ok[None, :], CHECK_M, not EVEN_D)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    else:
        delta = tl.load(delta_row_ptr + offs_m, mask=m_ok, other=0.0)
    sT, t = scores_log2(dot(k, tl.trans(q), INPUT_PRECISION), sm_scale, qk_scale, softcap, slope,
                        key_pos[:, None], HAS_SOFTCAP, HAS_ALIBI)
    if MASKED:
        sT = tl.where(tl.trans(vis), sT, float("-inf"))
    pT = tl.math.exp2(sT - lse2[None, :])
    dpT = dot(v, tl.trans(do), INPUT_PRECISION)
    if HAS_DROPOUT:
        keepT = tl.trans(dropout_keep(seed, bh, offs_m, drop_col0, row_groups, dropout_p, dpT.shape[0]))
        inv_keep = 1.0 / (1.0 - dropout_p)
        dv += dot(tl.where(keepT, pT * inv_keep, 0.0).to(do.dtype), do, INPUT_PRECISION)
        dpT = tl.where(keepT, dpT * inv_keep, 0.0)
    else:
        dv += dot(pT.to(do.dtype), do, INPUT_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    if HAS_SOFTCAP:
        dsT = dsT * (1.0 - t * t)
    dk += dot(dsT.to(q.dtype), q, INPUT_PRECISION)
    return dk, dv


@triton.jit
def _query_block_range(n_lo, S, S_kv, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_WINDOW: tl.constexpr):
    """Query blocks ``[lo, hi)`` that can see some sequence key of ``[n_lo, n_lo + BLOCK_N)``."""
    diag = S_kv - S
    lo = 0
    if CAUSAL:
        lo = tl.maximum(n_lo - diag, 0) // BLOCK_M * BLOCK_M
    hi = S
    if HAS_WINDOW:
        hi = tl.minimum(S, tl.maximum(tl.minimum(n_lo + BLOCK_N, S_kv) - 1 + window - diag, 0))
    return tl.minimum(lo, tl.cdiv(hi, BLOCK_M) * BLOCK_M), hi


@triton.jit
def _sequence_dkdv_program(
    pid, q_ptr, k_ptr, v_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    kpm_ptr, slopes_ptr, pos_ptr, seed_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_kpmb, stride_kpms, stride_slb, stride_slh, stride_posb, stride_poss,
    B, Hq, Hkv, S, S_kv, P, D, window, sm_scale, softcap, dropout_p, num_n_blocks, stride_split,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HEAVY_FIRST: tl.constexpr, HEAD_SPLITS: tl.constexpr,
    DELTA_FROM_OUT: tl.constexpr,
):
    """dK/dV of sequence key block ``pid % num_n_blocks`` of (batch row, KV head) ``pid //
    num_n_blocks`` (with HEAVY_FIRST, key block ``pid // (B * Hkv)`` of ``pid % (B * Hkv)``: the
    first key blocks, which the most queries see under a causal mask, of every row and head
    first): walks the query blocks of every query head of its group (GQA without repeat_kv) and
    owns its dK/dV rows. With HEAD_SPLITS > 1 (``dkdv_head_splits``: too few programs to fill the
    GPU) the group's heads are shared out among that many programs side by side, each adding its
    share into a float32 partial ``stride_split`` apart, summed by the launcher."""
    split = 0
    if HEAD_SPLITS > 1:
        split = pid % HEAD_SPLITS
        pid = pid // HEAD_SPLITS
    if HEAVY_FIRST:
        start_n = (pid // (B * Hkv)) * BLOCK_N
        bg = pid % (B * Hkv)
    else:
        start_n = (pid % num_n_blocks) * BLOCK_N
        bg = pid // num_n_blocks
    b = bg // Hkv
    b64 = b.to(tl.int64)
    g = bg % Hkv
    # This row's token range; S stays the row length of lse and delta (the longest row when packed).
    q_start, S_q, k_start, S_k = packed_row(b, cu_seqlens_q_ptr, cu_seqlens_k_ptr, S, S_kv, VARLEN)
    offs_s = start_n + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < S_k
    d_ok = offs_d < D
    kpm_row = batch_row(kpm_ptr, b64, stride_kpmb, HAS_KPM)
    # The row's real keys, read before the K/V tiles are live (fewer registers).
    real_lo, real_hi = real_key_range(kpm_row, stride_kpms, S_k, HAS_KPM)

    k = load_tile(k_ptr + b64 * stride_kb + g.to(tl.int64) * stride_kh + (k_start + offs_s[:, None]) * stride_ks
                  + offs_d[None, :] * stride_kd, s_ok[:, None], d_ok[None, :], True, not EVEN_D)
    v = load_tile(v_ptr + b64 * stride_vb + g.to(tl.int64) * stride_vh + (k_start + offs_s[:, None]) * stride_vs
                  + offs_d[None, :] * stride_vd, s_ok[:, None], d_ok[None, :], True, not EVEN_D)
    pos_row = batch_row(pos_ptr, b64, stride_posb, HAS_POS)
    key_pos = alibi_sequence_positions(pos_row, stride_poss, offs_s, S_k, P, HAS_POS)
    qk_scale = sm_scale * log2e()
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    row_groups = dropout_row_groups(P, S_k)
    seq_col0 = dropout_sequence_col0(P) + start_n     # this key block's first dropout column
    lo, hi = _query_block_range(start_n, S_q, S_k, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if HAS_KPM:
        # A key block wholly padding: no query sees it, its dK/dV are zeros (stored below).
        hi = tl.where((start_n < real_hi) & (start_n + BLOCK_N > real_lo), hi, lo)
    if VARLEN:
        # A key block past its packed sequence's end: no query block to visit, every store masked
        # off (no early return: it would split the role's branch into several blocks).
        hi = tl.where(start_n < S_k, hi, lo)
    # One loop over the query blocks, the mask computed in each (only causality, a window or padding
    # need one here: rows out of range load as zeros with lse = +inf and contribute nothing, and
    # keys out of range are never stored). The forward's split into masked and unmasked loops costs
    # too many registers here, where two float32 [BLOCK_N, D] accumulators stay live across the
    # GQA-group loop: ptxas spilled 0.3-3 KB per thread at every tile size worth having
    # (tests/tools/kernel_resources.py measures it).
    MASKED: tl.constexpr = CAUSAL or HAS_WINDOW or HAS_KPM
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    HEADS: tl.constexpr = GROUP // HEAD_SPLITS
    for j in range(HEADS):
        h = g * GROUP + split * HEADS + j
        bh = b64 * Hq + h
        q_base = q_ptr + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qs
        do_base = dout_ptr + b64 * stride_dob + h.to(tl.int64) * stride_doh + q_start * stride_dos
        lse_row = lse_ptr + bh * S
        o_row, delta_row = _delta_source(out_ptr, delta_ptr, b64, h, bh, q_start, S, stride_ob, stride_oh, stride_os,
                                         DELTA_FROM_OUT)
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(slopes_ptr + b64 * stride_slb + h * stride_slh)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_mb
            vis = sequence_visible(offs_m, offs_s, S_q, S_k, window, kpm_row, stride_kpms, False, CAUSAL,
                                   HAS_WINDOW, HAS_KPM) if MASKED else None
            dk, dv = _dkdv_step(dk, dv, k, v, q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                                do_base + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                                _row_tile_ptrs(o_row, offs_m, offs_d, stride_os, stride_od, DELTA_FROM_OUT),
                                lse_row, delta_row, offs_m, d_ok, vis, key_pos, seq_col0,
                                S_q, sm_scale, qk_scale, softcap, slope, seed, bh, row_groups, dropout_p,
                                MASKED, True, EVEN_D, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION,
                                DELTA_FROM_OUT)

    out_mask = s_ok[:, None] & d_ok[None, :]
    part = 0
    if HEAD_SPLITS > 1:
        part = split.to(tl.int64) * stride_split
    tl.store(dk_ptr + part + b64 * stride_dkb + g.to(tl.int64) * stride_dkh
             + (k_start + offs_s[:, None]) * stride_dks + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptr + part + b64 * stride_dvb + g.to(tl.int64) * stride_dvh
             + (k_start + offs_s[:, None]) * stride_dvs + offs_d[None, :] * stride_dvd,
             dv.to(dv_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _prefix_dkdv_block(dk, dv, pk, pv, q_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, slopes_ptr, b64, h, mb, q_start,
                       S_q, S_k, offs_mb, start_p, offs_p, offs_d, d_ok, key_pos, stride_qb, stride_qh, stride_qs,
                       stride_qd, stride_ob, stride_oh, stride_os, stride_od, stride_dob, stride_doh, stride_dos,
                       stride_dod, stride_slb, stride_slh, Hq, S, P, window, sm_scale, qk_scale, softcap, seed,
                       dropout_p, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, HAS_ALIBI: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, DELTA_FROM_OUT: tl.constexpr):
    """The prefix dK/dV contribution of query block ``mb`` of row ``b64``, query head ``h``."""
    bh = b64 * Hq + h
    offs_m = mb * BLOCK_M + offs_mb
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + b64 * stride_slb + h * stride_slh)
    # Out-of-range queries load as zeros with lse = +inf, so they add nothing; only a sliding
    # window can hide a prefix key from a real query.
    vis = prefix_visible(offs_m, offs_p, S_q, S_k, P, window, HAS_WINDOW)
    o_row, delta_row = _delta_source(out_ptr, delta_ptr, b64, h, bh, q_start, S, stride_ob, stride_oh, stride_os,
                                     DELTA_FROM_OUT)
    return _dkdv_step(dk, dv, pk, pv,
                      q_ptr + b64 * stride_qb + h.to(tl.int64) * stride_qh + (q_start + offs_m[:, None]) * stride_qs
                      + offs_d[None, :] * stride_qd,
                      dout_ptr + b64 * stride_dob + h.to(tl.int64) * stride_doh
                      + (q_start + offs_m[:, None]) * stride_dos + offs_d[None, :] * stride_dod,
                      _row_tile_ptrs(o_row, offs_m, offs_d, stride_os, stride_od, DELTA_FROM_OUT),
                      lse_ptr + bh * S, delta_row, offs_m, d_ok, vis, key_pos, start_p,
                      S_q, sm_scale, qk_scale, softcap, slope, seed, bh, dropout_row_groups(P, S_k), dropout_p,
                      HAS_WINDOW, True, EVEN_D, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, INPUT_PRECISION, DELTA_FROM_OUT)


@triton.jit
def _prefix_dkdv_program(
    pid, q_ptr, pk_ptr, pv_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, partial_ptr,
    prefix_index_ptr, slopes_ptr, seed_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_pkb, stride_pkh, stride_pks, stride_pkd,
    stride_pvb, stride_pvh, stride_pvs, stride_pvd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_slb, stride_slh,
    B, Hq, Hkv, S, S_kv, P, D, window, sm_scale, softcap, dropout_p, items_per_split, num_p_blocks, owners_kv,
    GROUP: tl.constexpr, SHARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_PREFIX_INDEX: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr, VARLEN: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DELTA_FROM_OUT: tl.constexpr,
):
    """Partial dPrefixK/dPrefixV of one prefix block and KV head over a share of the work items
    (batch row if SHARED, query head of the group, query block). Writes float32
    ``partial[split, 0 (dK) | 1 (dV), owner, g, p, :]`` with owner 0 when SHARED, else the batch
    row. Packed rows count query blocks up to the longest sequence and skip those past their own
    end."""
    start_p = (pid % num_p_blocks) * BLOCK_N
    og = (pid // num_p_blocks) % owners_kv
    split = pid // (num_p_blocks * owners_kv)
    owner = og // Hkv
    g = og % Hkv
    offs_p = start_p + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < P
    d_ok = offs_d < D

    # The prefix this program differentiates: the shared one, or its batch row's.
    if SHARED:
        pb = 0
    else:
        pb = prefix_row(owner, prefix_index_ptr, HAS_PREFIX_INDEX)
    pk = load_tile(pk_ptr + pb * stride_pkb + g.to(tl.int64) * stride_pkh + offs_p[:, None] * stride_pks
                   + offs_d[None, :] * stride_pkd, p_ok[:, None], d_ok[None, :], True, not EVEN_D)
    pv = load_tile(pv_ptr + pb * stride_pvb + g.to(tl.int64) * stride_pvh + offs_p[:, None] * stride_pvs
                   + offs_d[None, :] * stride_pvd, p_ok[:, None], d_ok[None, :], True, not EVEN_D)
    qk_scale = sm_scale * log2e()
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    key_pos = offs_p.to(tl.float32)
    num_m_blocks = tl.cdiv(S, BLOCK_M)
    if SHARED:
        num_items = B * GROUP * num_m_blocks
    else:
        num_items = GROUP * num_m_blocks
    first = split * items_per_split
    last = tl.minimum(first + items_per_split, num_items)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if VARLEN:
        # A share is one inner loop over query blocks per (row, head), bounded by the sequence's own
        # length: plain loop bounds skip the dead blocks and keep the loads pipelined (a branch in
        # the flat loop below stopped cp.async pipelining). Dense rows keep the flat loop: the
        # nested one costs them 25-50 registers and spills with dropout (kernel_resources.py).
        for row_head in range(first // num_m_blocks, tl.cdiv(last, num_m_blocks)):
            if SHARED:
                b64 = tl.cast(row_head // GROUP, tl.int64)   # (the interpreter's loop index is a Python int)
            else:
                b64 = owner.to(tl.int64)
            h = g * GROUP + row_head % GROUP
            q_start, S_q, _, S_k = packed_row(b64, cu_seqlens_q_ptr, cu_seqlens_k_ptr, S, S_kv, VARLEN)
            mb_hi = tl.minimum(last - row_head * num_m_blocks, tl.cdiv(S_q, BLOCK_M))
            for mb in range(tl.maximum(first - row_head * num_m_blocks, 0), mb_hi):
                dk, dv = _prefix_dkdv_block(
                    dk, dv, pk, pv, q_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, slopes_ptr, b64, h, mb, q_start, S_q,
                    S_k, offs_mb, start_p, offs_p, offs_d, d_ok, key_pos, stride_qb, stride_qh, stride_qs, stride_qd,
                    stride_ob, stride_oh, stride_os, stride_od, stride_dob, stride_doh, stride_dos, stride_dod,
                    stride_slb, stride_slh, Hq, S, P, window, sm_scale, qk_scale, softcap, seed, dropout_p, BLOCK_M,
                    EVEN_D, HAS_ALIBI, HAS_SOFTCAP, HAS_WINDOW, HAS_DROPOUT, INPUT_PRECISION, DELTA_FROM_OUT)
    else:
        for item in range(first, last):
            if SHARED:
                b64 = (item // (num_m_blocks * GROUP)).to(tl.int64)
            else:
                b64 = owner.to(tl.int64)
            h = g * GROUP + (item // num_m_blocks) % GROUP
            dk, dv = _prefix_dkdv_block(
                dk, dv, pk, pv, q_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, slopes_ptr, b64, h, item % num_m_blocks,
                0, S, S_kv, offs_mb, start_p, offs_p, offs_d, d_ok, key_pos, stride_qb, stride_qh, stride_qs, stride_qd,
                stride_ob, stride_oh, stride_os, stride_od, stride_dob, stride_doh, stride_dos, stride_dod, stride_slb,
                stride_slh, Hq, S, P, window, sm_scale, qk_scale, softcap, seed, dropout_p, BLOCK_M, EVEN_D, HAS_ALIBI,
                HAS_SOFTCAP, HAS_WINDOW, HAS_DROPOUT, INPUT_PRECISION, DELTA_FROM_OUT)
    # partial is contiguous [splits, 2, owners * Hkv, P, D]: dK and dV of a split side by side, so
    # the host sums and casts both in one reduction.
    base_k = ((split * 2 * owners_kv + og).to(tl.int64) * P) * D
    base_v = base_k + tl.cast(owners_kv, tl.int64) * P * D     # (an int argument equal to 1 is a constant)
    out_off = offs_p[:, None] * D + offs_d[None, :]
    out_mask = p_ok[:, None] & d_ok[None, :]
    tl.store(partial_ptr + base_k + out_off, dk * sm_scale, mask=out_mask)
    tl.store(partial_ptr + base_v + out_off, dv, mask=out_mask)


@triton.jit
def prefix_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr, partial_ptr,
    prefix_index_ptr, kpm_ptr, slopes_ptr, pos_ptr, seed_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkb, stride_pkh, stride_pks, stride_pkd,
    stride_pvb, stride_pvh, stride_pvs, stride_pvd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    stride_kpmb, stride_kpms, stride_slb, stride_slh, stride_posb, stride_poss,
    B, Hq, Hkv, S, S_kv, P, D, window, sm_scale, softcap, dropout_p,
    num_prefix_programs, num_p_blocks, owners_kv, items_per_split, num_n_blocks, stride_split, num_dkdv_programs,
    GROUP: tl.constexpr, SHARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREFIX_BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_PREFIX_INDEX: tl.constexpr, HAS_KPM: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HEAVY_FIRST: tl.constexpr, HEAD_SPLITS: tl.constexpr, WITH_DQ: tl.constexpr,
):
    """Programs [0, num_prefix_programs) write the float32 partials of the prefix gradient
    (``_prefix_dkdv_program``; first, since each reduces over many query blocks), then up to
    ``num_dkdv_programs`` the sequence dK/dV (``_sequence_dkdv_program``). One launch for both: on
    a host where a launch costs more than these kernels run (small shapes), that is one launch
    fewer per layer. With WITH_DQ (``one_launch_backward``) the dQ programs follow, one per (query
    block, query head, row) in launch order, and every dK/dV program computes delta = rowsum(dO *
    O) of the queries it visits instead of reading the dQ kernel's: the whole backward is this
    launch."""
    pid = tl.program_id(0)
    if pid < num_prefix_programs:
        _prefix_dkdv_program(
            pid, q_ptr, pk_ptr, pv_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, partial_ptr,
            prefix_index_ptr, slopes_ptr, seed_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
            stride_qb, stride_qh, stride_qs, stride_qd, stride_pkb, stride_pkh, stride_pks, stride_pkd,
            stride_pvb, stride_pvh, stride_pvs, stride_pvd, stride_ob, stride_oh, stride_os, stride_od,
            stride_dob, stride_doh, stride_dos, stride_dod, stride_slb, stride_slh,
            B, Hq, Hkv, S, S_kv, P, D, window, sm_scale, softcap, dropout_p, items_per_split, num_p_blocks, owners_kv,
            GROUP, SHARED, BLOCK_M, PREFIX_BLOCK_N, BLOCK_D, EVEN_D, HAS_PREFIX_INDEX, HAS_ALIBI, HAS_SOFTCAP,
            HAS_WINDOW, HAS_DROPOUT, VARLEN, INPUT_PRECISION, WITH_DQ)
    elif pid < num_dkdv_programs:
        _sequence_dkdv_program(
            pid - num_prefix_programs, q_ptr, k_ptr, v_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
            kpm_ptr, slopes_ptr, pos_ptr, seed_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
            stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
            stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
            stride_dob, stride_doh, stride_dos, stride_dod,
            stride_dkb, stride_dkh, stride_dks, stride_dkd, stride_dvb, stride_dvh, stride_dvs, stride_dvd,
            stride_kpmb, stride_kpms, stride_slb, stride_slh, stride_posb, stride_poss,
            B, Hq, Hkv, S, S_kv, P, D, window, sm_scale, softcap, dropout_p, num_n_blocks, stride_split,
            GROUP, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, CAUSAL, HAS_KPM, HAS_ALIBI, HAS_POS, HAS_SOFTCAP, HAS_WINDOW,
            HAS_DROPOUT, VARLEN, INPUT_PRECISION, HEAVY_FIRST, HEAD_SPLITS, WITH_DQ)
    else:
        if WITH_DQ:
            dq_pid = pid - num_dkdv_programs
            num_m_blocks = tl.cdiv(S, BLOCK_M)
            _dq_program(
                dq_pid % num_m_blocks, (dq_pid // num_m_blocks) % Hq, dq_pid // (num_m_blocks * Hq),
                q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
                prefix_index_ptr, kpm_ptr, slopes_ptr, pos_ptr, seed_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
                stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                stride_vb, stride_vh, stride_vs, stride_vd, stride_pkb, stride_pkh, stride_pks, stride_pkd,
                stride_pvb, stride_pvh, stride_pvs, stride_pvd, stride_ob, stride_oh, stride_os, stride_od,
                stride_dob, stride_doh, stride_dos, stride_dod, stride_dqb, stride_dqh, stride_dqs, stride_dqd,
                stride_kpmb, stride_kpms, stride_slb, stride_slh, stride_posb, stride_poss,
                Hq, S, S_kv, P, D, window, sm_scale, softcap, dropout_p,
                GROUP, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, CAUSAL, HAS_PREFIX_INDEX, HAS_KPM, HAS_ALIBI, HAS_POS,
                HAS_SOFTCAP, HAS_WINDOW, HAS_DROPOUT, VARLEN, INPUT_PRECISION, False)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, by element size and head-dim
# block (``config_bucket``), the fastest expected first (used when autotuning is off). Every entry
# compiles for sm_90 without register spills (tests/tools/kernel_resources.py; the tests check it).
# dQ holds a query tile and its float32 dQ, so it takes tall query tiles; dK/dV holds two float32
# [BLOCK_N, D] accumulators, so it takes wide key tiles over short query tiles, 8 warps from D = 128.
# The prefix programs of the dK/dV launch use its tiles, BLOCK_N capped by P (PREFIX_BLOCK_N).
# The last 16-bit D = 128 dQ entry is the tile the H200's tuner took at llama8b-2k and -8k,
# (64, 64, 4, 2), with a 4-stage pipeline: spill-free on Triton 3.6 and 3.9, 160 KiB of shared
# memory. (3 stages spilled 4 B with padding on 3.9, dK/dV's (32, 128, 8, 3) 4 B on 3.6: not added.)
DQ_CONFIGS = {
    (2, 64): [(128, 64, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2), (64, 32, 4, 2)],
    (2, 128): [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 8, 2), (128, 64, 8, 3),
               (64, 64, 4, 4)],
    (2, 256): [(64, 32, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
    (4, 64): [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2)],
    (4, 128): [(128, 32, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)],
    (4, 256): [(32, 32, 8, 2)],   # (32, 32, 4, 2) spilled 20 B with packed rows
}
DKDV_CONFIGS = {
    (2, 64): [(32, 128, 8, 2), (32, 64, 4, 2), (64, 64, 8, 2), (16, 128, 8, 2)],
    (2, 128): [(32, 64, 8, 2), (16, 128, 8, 2), (64, 32, 8, 2), (16, 64, 4, 2), (32, 32, 8, 2), (32, 128, 8, 2),
               (16, 128, 8, 3)],
    (2, 256): [(32, 32, 8, 2), (16, 32, 8, 2)],
    (4, 64): [(32, 64, 8, 2), (32, 128, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2)],
    (4, 128): [(64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
    (4, 256): [(32, 32, 8, 1), (16, 32, 8, 1)],
}


# The sequence dK/dV programs are one per (key block, row, KV head), each walking its GQA group's
# query heads. Where that leaves most SMs idle (Qwen2.5's 2 KV heads at S = 2048 and batch 2: 64
# programs of 7 heads each on 132 SMs, the longest of them, under a causal mask, 4x the average
# SM's share), the group's heads are shared out among programs side by side, each writing a
# float32 partial the launcher sums (a reduction and two copies: three aten launches more, and
# the partials' traffic). Only from DKDV_SPLIT_MIN_QUERIES queries: shorter rows are host-bound
# at the sizes where the grid is small, and a launch more costs there what the SMs would gain.
# PREFIXKERN_DKDV_HEAD_SPLITS=0 keeps a group per program everywhere.
DKDV_SPLIT_MIN_QUERIES = 1024
DKDV_HEAD_SPLITS = os.environ.get("PREFIXKERN_DKDV_HEAD_SPLITS", "1") != "0"


def dkdv_head_splitting(enabled: bool = True):
    """Run the block with ``DKDV_HEAD_SPLITS`` set to ``enabled`` (the benchmarks time both)."""
    return override_global(globals(), "DKDV_HEAD_SPLITS", enabled)


def dkdv_head_splits(group: int, sequence_programs: int, seq_len_q: int, sms: int) -> int:
    """How many programs share each (key block, row, KV head)'s GQA group: 1, or the smallest
    divisor of ``group`` that gives the launch a program per SM, else ``group`` itself."""
    if not DKDV_HEAD_SPLITS or group == 1 or seq_len_q < DKDV_SPLIT_MIN_QUERIES or sequence_programs >= sms:
        return 1
    return next(d for d in range(2, group + 1) if group % d == 0 and (sequence_programs * d >= sms or d == group))


# Small backwards take one launch (``WITH_DQ``: the dQ programs after the dK/dV ones, each dK/dV
# program computing delta = rowsum(dO * O) from the O tile rather than reading the dQ kernel's
# store): rows of at most ONE_LAUNCH_MAX_QUERIES queries and at most ONE_LAUNCH_MAX_WORK of
# B * Hq * S * (P + S_kv) * D. There the backward is host-bound: one Triton launch fewer per layer
# and step (on the H200 machines measured a launch of these kernels cost the host 100-240 us; the
# seed-qwen backward, 2.5e8 of that work, took 62 us of GPU time), for one more [BLOCK_M, D] load
# per query block a dK/dV program visits and smaller tiles. The bound is 4x seed-qwen's work, a
# guess until a GPU run times both (the attention suite's prefixkern_two_launch_bwd rows).
# PREFIXKERN_ONE_LAUNCH_BACKWARD=0 keeps two launches everywhere.
ONE_LAUNCH_MAX_QUERIES = 512
ONE_LAUNCH_MAX_WORK = 1 << 30
ONE_LAUNCH_BACKWARD = os.environ.get("PREFIXKERN_ONE_LAUNCH_BACKWARD", "1") != "0"
# Its tiles, by ``config_bucket``: the dK/dV tables' entries (and a few more) that compile for
# sm_90 without spills with the dQ programs beside them and O read, on Triton 3.6 and 3.9, under
# causal, padded and dropout flags (tests/tools/kernel_resources.py checks the first of each).
# The dK/dV tables' own first tiles spill there at D = 128 (176-196 B on 3.6). Float32 at
# D = 256 has none: two launches.
ONE_LAUNCH_CONFIGS = {
    (2, 64): [(32, 128, 8, 2), (16, 128, 8, 2), (16, 64, 8, 2)],
    (2, 128): [(32, 32, 8, 2), (64, 32, 8, 2)],
    (2, 256): [(32, 32, 8, 2), (16, 32, 8, 2)],
    (4, 64): [(16, 128, 8, 2), (16, 64, 4, 2)],
    (4, 128): [(32, 32, 8, 2), (16, 32, 4, 2)],
}


def one_launch_backward(enabled: bool = True):
    """Run the block with ``ONE_LAUNCH_BACKWARD`` set to ``enabled`` (the benchmarks time both)."""
    return override_global(globals(), "ONE_LAUNCH_BACKWARD", enabled)


def backward_in_one_launch(seq_len_q: int, work: int, bucket: tuple[int, int]) -> bool:
    """Whether a backward over rows of ``seq_len_q`` queries (the longest, when packed), ``work`` =
    B * Hq * S * (P + S_kv) * D, is one launch, for inputs of ``config_bucket`` ``bucket``."""
    return (ONE_LAUNCH_BACKWARD and seq_len_q <= ONE_LAUNCH_MAX_QUERIES and work <= ONE_LAUNCH_MAX_WORK
            and bucket in ONE_LAUNCH_CONFIGS)


def prefix_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              prefix_k: torch.Tensor, prefix_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              *, prefix_index: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                              causal: bool, softmax_scale: float, dropout_p: float, seed: torch.Tensor | None,
                              alibi_slopes: torch.Tensor | None, softcap: float | None, window: int | None,
                              packed: PackedRows | None = None):
    """Gradients ``(dq, dk, dv, dprefix_k, dprefix_v)`` of ``prefix_attention_forward``; each has its
    input's shape and dtype (a shared or per-task prefix gets the sum over the rows that read it)."""
    batch, num_heads, num_kv_heads, seq_len_q, seq_len_kv, head_dim = attention_dims(q, k, packed)
    dq, dk, dv = empty_in_layout_of(q), empty_in_layout_of(k), empty_in_layout_of(v)
    if batch == 0 or seq_len_q == 0:
        return dq, dk.zero_(), dv.zero_(), torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    inputs = attention_launch_args(prefix_k, prefix_index, key_padding_mask, alibi_slopes, seed,
                                   *(packed[:2] if packed else ()))
    dense = (q, k, v, prefix_k, prefix_v, out, dout, lse, dq, dk, dv)
    # With the switches that pick one launch or two and the dK/dV head splits.
    key = attention_plan_key(dense + inputs, causal, softmax_scale, dropout_p, softcap, window, packed) + (
        ONE_LAUNCH_BACKWARD, ONE_LAUNCH_MAX_QUERIES, ONE_LAUNCH_MAX_WORK, DKDV_HEAD_SPLITS, DKDV_SPLIT_MIN_QUERIES)
    plan = kept_plan(_PLANS, key)
    if plan is None:
        plan = _backward_plan(dense, inputs, batch, num_heads, num_kv_heads, seq_len_q, seq_len_kv, head_dim, causal,
                              softmax_scale, dropout_p, softcap, window, packed is not None)
        keep_plan(_PLANS, key, plan)
    partial, head_parts = plan.run(dense, inputs)

    if head_parts is not None:      # the sequence dK/dV by head splits: their sum, cast into dk and dv
        summed = head_parts.sum(1)
        dk.copy_(summed[0])
        dv.copy_(summed[1])
    # Host launches matter at seed sizes (one backward per layer): one reduction and one cast for
    # both gradients; no reduction with one split, no cast for a float32 prefix.
    dprefix = partial[0] if partial.shape[0] == 1 else partial.sum(0)          # [2, owners, Hkv, P, D]
    if prefix_k.dim() == 3:
        dprefix = dprefix[:, 0]
    elif prefix_index is not None:
        num_tasks, prefix_len = prefix_k.shape[0], prefix_k.shape[-2]
        dprefix = dprefix.new_zeros(2, num_tasks, num_kv_heads, prefix_len, head_dim).index_add_(1, prefix_index,
                                                                                                  dprefix)
    dprefix = dprefix.to(prefix_k.dtype)         # prefix_v has the same dtype (checked with q's)
    return dq, dk, dv, dprefix[0], dprefix[1]


_PLANS = plan_table()


class BackwardPlan:
    """The backward's launches with their tensors left out: the dQ launch (None in one launch) and
    the dK/dV launch, and the float32 buffers they write beside the gradients (dQ's delta, the
    prefix gradient's partial sums, the dK/dV head splits' parts), by shape."""

    __slots__ = ("dq", "dkdv", "delta_shape", "partial_shape", "head_parts_shape")

    def __init__(self, dq, dkdv, delta_shape, partial_shape, head_parts_shape):
        self.dq, self.dkdv = dq, dkdv
        self.delta_shape, self.partial_shape, self.head_parts_shape = delta_shape, partial_shape, head_parts_shape

    def current(self) -> bool:
        return (self.dq is None or self.dq.current()) and self.dkdv.current()

    def run(self, dense, inputs):
        """Allocate the buffers and launch; returns ``(partial, head_parts)`` (None without head splits)."""
        q, k, v, prefix_k, prefix_v, out, dout, lse, dq = dense[:9]
        delta = None
        if self.dq is not None:
            delta = torch.empty(self.delta_shape, dtype=torch.float32, device=q.device)
            self.dq.launch((q, k, v, prefix_k, prefix_v, out, dout, lse, delta, dq, *inputs), launch_kernel)
        return self.launch_dkdv(dense, inputs, delta)[1:]

    def launch_dkdv(self, dense, inputs, delta):
        """The dK/dV launch alone, reading ``delta`` (None in one launch): ``(compiled kernel,
        partial, head_parts)``."""
        q, k, v, prefix_k, prefix_v, out, dout, lse, dq, dk, dv = dense
        partial = torch.empty(self.partial_shape, dtype=torch.float32, device=q.device)
        head_parts = None
        dk_out, dv_out = dk, dv
        if self.head_parts_shape is not None:
            # [dK | dV, split, *dk's shape] float32, summed over the splits by the caller.
            head_parts = torch.empty(self.head_parts_shape, dtype=torch.float32, device=q.device)
            dk_out, dv_out = head_parts[0, 0], head_parts[1, 0]
        # The one-launch backward's dQ programs come last and read O; the two-launch one's launch
        # gets neither (None: no pointer for the launcher to fetch).
        o_arg, dq_arg = (None, None) if self.dq is not None else (out, dq)
        compiled = self.dkdv.launch((q, k, v, prefix_k, prefix_v, o_arg, dout, lse, delta, dk_out, dv_out, dq_arg,
                                     partial, *inputs), launch_kernel)
        return compiled, partial, head_parts


def _backward_plan(dense, inputs, batch, num_heads, num_kv_heads, seq_len_q, seq_len_kv, head_dim, causal,
                   softmax_scale, dropout_p, softcap, window, varlen) -> BackwardPlan:
    """The backward's launches for these tensors, their tiles tuned on first use (each candidate
    launched on them)."""
    q, k, v, prefix_k, prefix_v, out, dout, lse, dq, dk, dv = dense
    prefix_len = prefix_k.shape[-2]
    group = num_heads // num_kv_heads
    flags = inputs.flags(dropout_p)
    q_strides, dout_strides = bhsd_strides(q, varlen), bhsd_strides(dout, varlen)
    block_d = max(16, next_power_of_2(head_dim))
    precision = input_precision(q.dtype)
    order = heavy_first(causal, k, batch, seq_len_q)
    common = dict(CAUSAL=causal, HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None,
                  INPUT_PRECISION=precision, HEAVY_FIRST=order)
    scalars = (window if window is not None else 0, float(softmax_scale),
               float(softcap) if softcap is not None else 1.0, float(dropout_p))
    sequence_strides = (*q_strides, *bhsd_strides(k, varlen), *bhsd_strides(v, varlen), *prefix_strides(prefix_k),
                        *prefix_strides(prefix_v))
    input_strides = inputs.strides()

    bucket = config_bucket(block_d, q.element_size())
    one_launch = backward_in_one_launch(seq_len_q, batch * num_heads * seq_len_q * (prefix_len + seq_len_kv) * head_dim,
                                        bucket)
    # Written by the dQ kernel (rowsum(dO * O)), read by the dK/dV launch; the one-launch backward
    # computes it where it is read.
    delta_shape = None if one_launch else (batch, num_heads, seq_len_q)

    tune_key = (q.device.index, q.dtype, block_d, group, causal, next_power_of_2(seq_len_q),
                next_power_of_2(seq_len_kv + prefix_len), tuple(sorted(flags.items())),
                softcap is not None, window is not None)

    def dq_plan(config):
        block_m, block_n, warps, stages = config
        return LaunchPlan(
            prefix_attention_bwd_dq_kernel, grid_shape(cdiv(seq_len_q, block_m), num_heads, batch, order),
            (*sequence_strides, *bhsd_strides(out, varlen), *dout_strides, *bhsd_strides(dq, varlen), *input_strides,
             num_heads, seq_len_q, seq_len_kv, prefix_len, head_dim, *scalars),
            dict(GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == head_dim,
                 num_warps=warps, num_stages=stages, **common, **flags),
            ("dq",) + tune_key, config)

    # The prefix gradient is a reduction over (row if shared, query head, query block) work items:
    # the dK/dV launch's first programs each take a contiguous share (a split) and write a float32
    # partial [split, dK | dV, owner, Hkv, P, D], summed by the caller.
    shared = prefix_k.dim() == 3
    owners = 1 if shared else batch
    items_per_row = (batch if shared else 1) * group
    sms = num_sms(device_index(q.device)) if q.device.type == "cuda" else 16
    dkdv_key = ("dkdv",) + tune_key + (one_launch,)

    def dkdv_plan(config, delta_plan):
        block_m, block_n, warps, stages = config
        prefix_block_n = min(block_n, max(16, next_power_of_2(prefix_len)))
        num_p_blocks = cdiv(prefix_len, prefix_block_n)
        num_m_blocks = cdiv(seq_len_q, block_m)
        items = items_per_row * num_m_blocks
        num_n_blocks = cdiv(seq_len_kv, block_n)
        prefix_programs = num_p_blocks * owners * num_kv_heads
        sequence_programs = num_n_blocks * batch * num_kv_heads
        # A split covers about a sequence program's share (its group's query blocks), and the launch
        # gets about two waves of programs where the sequence alone would not fill them; but never
        # more than two waves of prefix programs (a packed batch of hundreds of sequences would
        # otherwise take a float32 partial per sequence). Fewer splits, less memory. (The
        # interpreter, on CPU, counts 16 SMs: splits of shared and per-row prefixes get exercised.)
        splits = max(cdiv(items, group * num_m_blocks), cdiv(2 * sms - sequence_programs, prefix_programs))
        splits = min(splits, cdiv(2 * sms, prefix_programs))
        items_per_split = cdiv(items, min(items, splits))
        splits = cdiv(items, items_per_split)
        num_prefix_programs = prefix_programs * splits
        head_splits = dkdv_head_splits(group, sequence_programs, seq_len_q, sms)
        assert group % head_splits == 0, (group, head_splits)      # (the programs share the heads evenly)
        if head_splits > 1:
            head_parts_shape = (2, head_splits) + tuple(dk.shape)
            # dK and dV go to head_parts[0, 0] and [1, 0] of a contiguous buffer (BackwardPlan.run): its
            # strides, read off a buffer on the meta device (no memory).
            parts = torch.empty(head_parts_shape, dtype=torch.float32, device="meta")
            dk_strides = dv_strides = bhsd_strides(parts[0, 0], varlen)
            stride_split = parts.stride(1)
        else:
            head_parts_shape = None
            dk_strides, dv_strides, stride_split = bhsd_strides(dk, varlen), bhsd_strides(dv, varlen), 0
        num_dkdv_programs = num_prefix_programs + sequence_programs * head_splits
        num_dq_programs = num_m_blocks * num_heads * batch if one_launch else 0
        o_strides = bhsd_strides(out, varlen) if one_launch else (0, 0, 0, 0)
        dq_strides = bhsd_strides(dq, varlen) if one_launch else (0, 0, 0, 0)
        launch = LaunchPlan(
            prefix_attention_bwd_dkdv_kernel, (num_dkdv_programs + num_dq_programs,),
            (*sequence_strides, *o_strides, *dout_strides, *dk_strides, *dv_strides, *dq_strides, *input_strides,
             batch, num_heads, num_kv_heads, seq_len_q, seq_len_kv, prefix_len, head_dim, *scalars,
             num_prefix_programs, num_p_blocks, owners * num_kv_heads, items_per_split, num_n_blocks, stride_split,
             num_dkdv_programs),
            dict(GROUP=group, SHARED=shared, BLOCK_M=block_m, BLOCK_N=block_n, PREFIX_BLOCK_N=prefix_block_n,
                 BLOCK_D=block_d, EVEN_D=block_d == head_dim, HEAD_SPLITS=head_splits, WITH_DQ=one_launch,
                 num_warps=warps, num_stages=stages, **common, **flags),
            dkdv_key, config)
        return BackwardPlan(delta_plan, launch, delta_shape, (splits, 2, owners, num_kv_heads, prefix_len, head_dim),
                            head_parts_shape)

    dq_launch, delta = None, None
    if not one_launch:
        delta = torch.empty(delta_shape, dtype=torch.float32, device=q.device)
        dq_tensors = (q, k, v, prefix_k, prefix_v, out, dout, lse, delta, dq, *inputs)
        dq_config = pick_config(("dq",) + tune_key,
                                lambda: fitting_configs("dq", DQ_CONFIGS[bucket], block_d, q, fallback=(16, 16, 4, 1)),
                                lambda config: dq_plan(config).launch(dq_tensors, launch_kernel))
        dq_launch = dq_plan(dq_config)
    delta_written = False

    def tuning_launch(config):
        nonlocal delta_written
        if dq_launch is not None and not delta_written:     # the delta the dK/dV candidates read
            dq_launch.launch(dq_tensors, launch_kernel)
            delta_written = True
        return dkdv_plan(config, dq_launch).launch_dkdv(dense, inputs, delta)[0]

    # (The one-launch kernel's shared memory is its larger role's: the dQ programs' at wide key tiles.)
    smem_kind, table = ("dkdv+dq", ONE_LAUNCH_CONFIGS) if one_launch else ("dkdv", DKDV_CONFIGS)
    config = pick_config(dkdv_key,
                         lambda: fitting_configs(smem_kind, table[bucket], block_d, q, fallback=(16, 16, 4, 1)),
                         tuning_launch)
    return dkdv_plan(config, dq_launch)
