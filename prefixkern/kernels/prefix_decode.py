"""Decode kernel of prefix attention in Triton: the work split of the CUDA C++ decode kernels
(``csrc/``), for machines where those cannot be built (no nvcc: a plain pip install) and for
float32. One program per (key chunk, KV head, batch row) takes every query row of its GQA group
(the group's heads times the step's positions) as the rows of one tile, so each K/V byte is read
once per group rather than once per query head, and the key axis ``[prefix ; cache]`` is cut
into chunks that fill the GPU (flash-decoding) rather than one program walking all of it. Each
program writes its chunk's float32 partial output and log-sum-exp, and
``prefix_decode_merge_kernel`` merges the chunks by log-sum-exp in one launch (the same merge as
torch ops took a dozen launches, each a few microseconds of host time on the GPU's host, which made
this path slower than the general forward kernel on the H100: 0.33 against 0.20 ms at P=30,
cache 4096, batch 8).

The general forward kernel, which decoding used before, ran one program per (batch row, query
head) over every key with a 16-row tile holding one real row: at batch 1 with 32 heads, 32
programs read the whole cache each, four times over for a GQA group of four.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._attention_common import attention_launch_args, batch_row, load_tile, prefix_row, prefix_strides
from ._launch import cdiv, device_index, input_precision, launch_kernel, next_power_of_2, num_sms, pick_config
from ._math import log2e
from .prefix_attention_fwd import _attend_block
from .._backend import triton_interpret

__all__ = ["prefix_decode_partial", "prefix_decode_merge", "MAX_GROUP_ROWS"]

# Query rows per program (a GQA group's heads x the step's positions): up to 32, where every config
# below but one float32 head-dim-256 entry compiles spill-free for sm_90 (64 rows spill at head dim
# 256). Larger groups take the general forward kernel.
MAX_GROUP_ROWS = 32


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def prefix_decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, out_ptr, lse_ptr, prefix_index_ptr, kpm_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkb, stride_pkh, stride_pks, stride_pkd,
    stride_pvb, stride_pvh, stride_pvs, stride_pvd,
    stride_kpmb, stride_kpms,
    Hq, Sq, L, P, D, chunk, sm_scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, HAS_PREFIX_INDEX: tl.constexpr, HAS_KPM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Grid (chunk, KV head, batch row). Tile row r is query head g * GROUP + r // Sq at position
    # r % Sq; rows past GROUP * Sq load zeros and are not stored.
    split = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * Sq
    heads = (g * GROUP + rows // Sq).to(tl.int64)
    pos = rows % Sq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q = load_tile(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + pos[:, None] * stride_qs
                  + offs_d[None, :] * stride_qd, row_ok[:, None], d_ok[None, :], True, not EVEN_D)
    qk_scale = sm_scale * log2e()
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_begin = split * chunk
    k_end = tl.minimum(P + L, k_begin + chunk)

    # ---- this chunk's prefix keys [k_begin, min(k_end, P)): visible to every query ----
    pb = prefix_row(b, prefix_index_ptr, HAS_PREFIX_INDEX)
    pk_base = pk_ptr + pb * stride_pkb + g.to(tl.int64) * stride_pkh
    pv_base = pv_ptr + pb * stride_pvb + g.to(tl.int64) * stride_pvh
    p_end = tl.minimum(k_end, P)
    for start in range(k_begin, p_end, BLOCK_N):
        offs_p = start + offs_n
        keys_ok = offs_p < p_end
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q,
            pk_base + offs_p[None, :] * stride_pks + offs_d[:, None] * stride_pkd,
            pv_base + offs_p[:, None] * stride_pvs + offs_d[None, :] * stride_pvd,
            keys_ok, offs_d, D, keys_ok[None, :], offs_p.to(tl.float32), 0,
            sm_scale, qk_scale, 1.0, 0.0, 0, 0, rows, 0, 0.0,
            True, EVEN_D, False, False, False, INPUT_PRECISION)

    # ---- its cache keys j in [max(k_begin, P) - P, k_end - P): bottom-right causal, padding ----
    k_base = k_ptr + b64 * stride_kb + g.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + g.to(tl.int64) * stride_vh
    kpm_row = batch_row(kpm_ptr, b64, stride_kpmb, HAS_KPM)
    diag = L - Sq
    j_end = k_end - P
    for start in range(tl.maximum(k_begin, P) - P, j_end, BLOCK_N):
        offs_j = start + offs_n
        keys_ok = offs_j < j_end
        vis = keys_ok[None, :] & (offs_j[None, :] <= pos[:, None] + diag)
        if HAS_KPM:
            real = tl.load(kpm_row + offs_j * stride_kpms, mask=keys_ok, other=0)
            vis = vis & (real != 0)[None, :]
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q,
            k_base + offs_j[None, :] * stride_ks + offs_d[:, None] * stride_kd,
            v_base + offs_j[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            keys_ok, offs_d, D, vis, offs_j.to(tl.float32), 0,
            sm_scale, qk_scale, 1.0, 0.0, 0, 0, rows, 0, 0.0,
            True, EVEN_D, False, False, False, INPUT_PRECISION)

    # ---- the chunk's partial output (normalised over its keys) and natural-log LSE ----
    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / log2e())
    # out [splits, B, Hq, Sq, D] and lse [splits, B, Hq, Sq], contiguous.
    out_rows = ((split.to(tl.int64) * tl.num_programs(2) + b64) * Hq + heads) * Sq + pos
    tl.store(lse_ptr + out_rows, lse, mask=row_ok)
    tl.store(out_ptr + out_rows[:, None] * D + offs_d[None, :], acc * inv_l[:, None],
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def prefix_decode_merge_kernel(
    part_ptr, part_lse_ptr, out_ptr, lse_ptr,
    stride_pn, stride_pr, stride_pd, stride_ln, stride_lr, stride_or, stride_od,
    num_parts, num_rows, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Rows [r0, r0 + BLOCK_R) of out [R, D] from parts [N, R, D] (each normalised over its own
    # keys) and their natural-log LSEs [N, R]: out = sum_n exp(lse_n - lse) * part_n. Two passes
    # over the LSEs (a few bytes per row) and one over the parts.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    row_ok = rows < num_rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for n in range(0, num_parts):
        part_lse = tl.load(part_lse_ptr + n * stride_ln + rows64 * stride_lr, mask=row_ok, other=float("-inf"))
        m = tl.maximum(m, part_lse)
    # A row no part saw (m = -inf) keeps weights 0: out 0, LSE -inf.
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for n in range(0, num_parts):
        part_lse = tl.load(part_lse_ptr + n * stride_ln + rows64 * stride_lr, mask=row_ok, other=float("-inf"))
        weight = tl.exp(part_lse - m_safe)
        part = tl.load(part_ptr + n * stride_pn + rows64[:, None] * stride_pr + offs_d[None, :] * stride_pd,
                       mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        total += weight
        acc += weight[:, None] * part
    empty = total == 0.0
    out = acc * tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total))[:, None]
    tl.store(out_ptr + rows64[:, None] * stride_or + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + rows64, tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total))),
             mask=row_ok)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# (BLOCK_N, num_warps, num_stages) by element size and head-dim block, the first used when
# autotuning is off. The tile is [rows of the group, D] x [D, BLOCK_N], streamed once per chunk.
DECODE_CONFIGS = {
    (2, 64): [(64, 4, 3), (128, 4, 3), (32, 4, 2)],
    (2, 128): [(64, 4, 3), (32, 4, 3), (128, 8, 3)],
    (2, 256): [(32, 4, 3), (64, 8, 2), (16, 4, 2)],
    (4, 64): [(64, 4, 2), (32, 4, 2)],
    (4, 128): [(32, 4, 2), (64, 8, 2)],
    (4, 256): [(32, 8, 2), (16, 4, 2)],
}
INTERPRETER_CONFIG = (16, 1, 1)


def _splits(num_keys: int, programs_per_split: int, block_n: int, device: torch.device, num_splits: int):
    """(splits, chunk): ``num_splits`` chunks if given, else enough to give the GPU's SMs two
    programs each; chunks are whole BLOCK_N tiles."""
    if num_splits <= 0:
        target = 2 * num_sms(device_index(device)) if device.type == "cuda" else 2
        num_splits = max(1, target // programs_per_split)
    num_splits = max(1, min(num_splits, cdiv(num_keys, block_n)))
    chunk = cdiv(cdiv(num_keys, num_splits), block_n) * block_n
    return cdiv(num_keys, chunk), chunk


def prefix_decode_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                          prefix_v: torch.Tensor, *, prefix_index: torch.Tensor | None,
                          key_padding_mask: torch.Tensor | None, softmax_scale: float, num_splits: int = 0):
    """Launch the decode kernel: ``(out_partial float32 [splits, B, Hq, Sq, D], lse_partial float32
    [splits, B, Hq, Sq])``, one part per key chunk, each normalised over its own keys (merge them
    with ``merge_attention_states``). Arguments are the checked ones of
    ``prefixkern.prefix_decode_attention``, with ``Hq // Hkv * Sq <= MAX_GROUP_ROWS``."""
    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, cache_len = k.shape[1], k.shape[2]
    prefix_len = prefix_k.shape[-2]
    group = num_heads // num_kv_heads
    block_m = max(16, next_power_of_2(group * seq_len_q))
    block_d = max(16, next_power_of_2(head_dim))
    args = attention_launch_args(prefix_k, prefix_index, key_padding_mask, None, None)
    flags = args.flags(0.0)
    result = {}

    def launch(config):
        block_n, warps, stages = config
        splits, chunk = _splits(prefix_len + cache_len, num_kv_heads * batch, block_n, q.device, num_splits)
        out = torch.empty(splits, batch, num_heads, seq_len_q, head_dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(splits, batch, num_heads, seq_len_q, device=q.device, dtype=torch.float32)
        result["parts"] = out, lse
        return launch_kernel(
            prefix_decode_partial_kernel, (splits, num_kv_heads, batch),
            q, k, v, prefix_k, prefix_v, out, lse, args.prefix_index, args.kpm,
            *q.stride(), *k.stride(), *v.stride(), *prefix_strides(prefix_k), *prefix_strides(prefix_v),
            *args.strides()[:2],
            num_heads, seq_len_q, cache_len, prefix_len, head_dim, chunk, float(softmax_scale),
            GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == head_dim,
            HAS_PREFIX_INDEX=flags["HAS_PREFIX_INDEX"], HAS_KPM=flags["HAS_KPM"],
            INPUT_PRECISION=input_precision(q.dtype), num_warps=warps, num_stages=stages,
        )

    if triton_interpret():
        candidates = [INTERPRETER_CONFIG]
    else:
        candidates = DECODE_CONFIGS[(2 if q.element_size() <= 2 else 4, max(64, block_d))]
    key = ("decode", q.device.index, q.dtype, block_d, block_m, flags["HAS_PREFIX_INDEX"], flags["HAS_KPM"],
           num_kv_heads * batch, next_power_of_2(prefix_len + cache_len), num_splits)
    launch(pick_config(key, candidates, launch))
    return result["parts"]


def prefix_decode_merge(out_partial: torch.Tensor, lse_partial: torch.Tensor, out_dtype: torch.dtype):
    """Merge ``prefix_decode_partial``'s parts in one launch: ``(out [B, Hq, Sq, D] in out_dtype,
    lse float32 [B, Hq, Sq])``. ``out_partial`` float32 ``[N, ..., D]`` and ``lse_partial``
    float32 ``[N, ...]``, each with the middle dims viewable as one (the partial kernel's layout
    is); a row no part saw gives 0 and -inf."""
    num_parts, head_dim = out_partial.shape[0], out_partial.shape[-1]
    parts = out_partial.view(num_parts, -1, head_dim)
    part_lse = lse_partial.view(num_parts, -1)
    num_rows = parts.shape[1]
    out = torch.empty(out_partial.shape[1:], device=out_partial.device, dtype=out_dtype)
    lse = torch.empty(lse_partial.shape[1:], device=out_partial.device, dtype=torch.float32)
    out_rows = out.view(num_rows, head_dim)
    block_d = max(16, next_power_of_2(head_dim))
    # Rows per program: about 4K elements of the [rows, D] accumulator (16 rows at head dim 256).
    block_r = 4 if triton_interpret() else max(1, min(64, 4096 // block_d))
    launch_kernel(
        prefix_decode_merge_kernel, (cdiv(num_rows, block_r),),
        parts, part_lse, out_rows, lse,
        *parts.stride(), *part_lse.stride(), *out_rows.stride(),
        num_parts, num_rows, head_dim,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )
    return out, lse
