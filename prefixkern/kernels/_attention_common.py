"""Device code shared by the prefix-attention forward and backward kernels, so both compute the
same scores, the same visibility and the same dropout mask.

Rows are either dense (``[B, H, S, D]``: every row S queries and S_kv keys) or packed
(``VARLEN``: sequence b's tokens are ``cu_seqlens[b]:cu_seqlens[b + 1]`` of a ``[total, H, D]``
tensor, its lengths read in the kernel by ``packed_row``); everything below counts within a row.

Positions (DESIGN.md, "The math"): prefix key j sits at j, sequence key j at ``P + j``, query i at
``P + (S_kv - S) + i`` (bottom-right aligned). Key *columns* number the concatenation
``[prefix ; sequence]``: prefix key j is column j, sequence key j column ``P + j``.

The dropout mask numbers its columns with each part rounded up to whole groups of
``DROPOUT_GROUP`` (8): prefix key j is dropout column j, sequence key j dropout column
``cdiv(P, 8) * 8 + j``, so that every key tile of a kernel (its start a multiple of its size, 16
or more) covers whole groups. One Philox draw (four 32-bit words, key ``seed + b * Hq + h``,
counter ``i * G + c // 8``, ``G = cdiv(P, 8) + cdiv(S_kv, 8)`` groups per query row) decides the
8 columns of a group, one 16-bit half-word each: column ``c`` is kept iff half ``c % 2`` of word
``(c % 8) // 2`` is at least ``round(dropout_p * 2**16)``. Any kernel regenerates any element of
the mask on its own, at an eighth of the Philox rounds of a draw per element (flash-attn draws
one per 16 elements at 8 bits); dropout_p is applied at a resolution of 2**-16.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._backend import override_global, triton_interpret
from ._launch import cdiv, device_index, input_precision, launch_kernel, smem_bytes, tensor_layouts
from ._math import log2e, tanh

# --------------------------------------------------------------------------------------------
# Heaviest programs first
# --------------------------------------------------------------------------------------------

# Under a causal mask the programs of one launch differ in work: a query block sees the keys up to
# it (forward, dQ), a key block the queries from it on (dK/dV). A GPU starts a launch's programs in
# launch order as SMs free up, so with the light blocks first, the heaviest start last and run on
# alone at the end. HEAVY_FIRST launches them heaviest first across every head and row (longest
# processing time first), so the tail holds the light ones. In a list-scheduling model of 132 SMs
# that takes 19-21% off the dK/dV kernel at llama8b-2k/8k, 3-14% off the forward and dQ, nothing
# at 32k (enough waves). The order spreads the programs running at once over every head's K/V, so it
# is taken only while those fit in the L2 cache (32 of an H100's or H200's 50 MiB at llama8b-2k
# and -8k; 128 at 32k). PREFIXKERN_HEAVY_FIRST=0 launches in the old order. Untimed on a GPU so
# far: the attention suite's prefixkern_in_order row times it.
HEAVY_FIRST = os.environ.get("PREFIXKERN_HEAVY_FIRST", "1") != "0"


def heavy_first_scheduling(enabled: bool = True):
    """Run the block with ``HEAVY_FIRST`` set to ``enabled`` (benchmarks and tests take both orders)."""
    return override_global(globals(), "HEAVY_FIRST", enabled)


@functools.lru_cache(maxsize=None)
def l2_bytes(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 0)


MAX_GRID_YZ = 65535      # CUDA's limit on grid.y and grid.z
# Fewer queries than this fill one or two query blocks: nothing to balance, and the short-query
# tiles keep their one compiled order (their heavy-first variants spilled 4-36 B).
MIN_HEAVY_FIRST_QUERIES = 128


def heavy_first(causal: bool, k: torch.Tensor, rows: int, seq_len_q: int) -> bool:
    """Whether a launch over keys ``k`` (the sequence's, V alike), ``rows`` rows (or packed
    sequences) of ``seq_len_q`` queries (the longest), takes its programs heaviest first: causal,
    ``HEAVY_FIRST``, a grid ``grid_shape`` can lay out that way, and on a GPU at least
    ``MIN_HEAVY_FIRST_QUERIES`` queries and K and V within its L2 cache. (The interpreter, on
    CPU: whenever causal, so the tests run the reordering at their small sizes; any order
    computes the same.)"""
    if not (causal and HEAVY_FIRST and rows <= MAX_GRID_YZ and cdiv(seq_len_q, 16) <= MAX_GRID_YZ):
        return False
    if k.device.type != "cuda":
        return True
    return seq_len_q >= MIN_HEAVY_FIRST_QUERIES and 2 * k.numel() * k.element_size() <= l2_bytes(
        device_index(k.device))


@triton.jit
def grid_program(HEAVY_FIRST: tl.constexpr):
    """``(query block, head, row)`` of this program of a forward or dQ launch. In launch order the
    grid is (query blocks, heads, rows), the query blocks fastest. With HEAVY_FIRST it is (heads,
    rows, query blocks) with the query blocks last-first, so the GPU starts the last query blocks
    (under a causal mask the ones that see the most keys) of every head and row first, the heads
    of one GQA group side by side (``grid_shape``). Read from the program ids either way: a
    remapped linear index took ptxas registers that spilled 4-32 B in eight table entries."""
    if HEAVY_FIRST:
        return tl.num_programs(2) - 1 - tl.program_id(2), tl.program_id(0), tl.program_id(1)
    return tl.program_id(0), tl.program_id(1), tl.program_id(2)


def grid_shape(num_m_blocks: int, num_heads: int, rows: int, heavy_first_order: bool) -> tuple[int, int, int]:
    """The launch grid ``grid_program`` reads (``heavy_first`` keeps the heavy-first one within
    CUDA's 65535 on grid.y and grid.z; the launch order's has only heads and rows there)."""
    return (num_heads, rows, num_m_blocks) if heavy_first_order else (num_m_blocks, num_heads, rows)


@triton.jit
def packed_row(b, cu_seqlens_q_ptr, cu_seqlens_k_ptr, S, S_kv, VARLEN: tl.constexpr):
    """``(q_start, S_q, k_start, S_k)`` of batch row ``b``: where its queries and keys start along
    the token axis, and how many it has. Dense rows start at 0 with S and S_kv; a packed
    sequence's come from ``cu_seqlens`` (S and S_kv are then the longest, the grid's extent)."""
    if VARLEN:
        q_start = tl.load(cu_seqlens_q_ptr + b).to(tl.int64)
        k_start = tl.load(cu_seqlens_k_ptr + b).to(tl.int64)
        S_q = (tl.load(cu_seqlens_q_ptr + b + 1) - q_start).to(tl.int32)
        S_k = (tl.load(cu_seqlens_k_ptr + b + 1) - k_start).to(tl.int32)
    else:
        # One return for both branches: Triton types a function by all of its return statements.
        q_start = 0
        k_start = 0
        S_q = S
        S_k = S_kv
    return q_start, S_q, k_start, S_k


@triton.jit
def scores_log2(qk, sm_scale, qk_scale, softcap, slope, key_pos, HAS_SOFTCAP: tl.constexpr,
                HAS_ALIBI: tl.constexpr):
    """Scores in log2 units from a float32 tile of raw ``q . k`` products: scaled, soft-capped, then
    ALiBi-biased in natural units (``qk_scale = sm_scale * log2(e)`` when neither applies).

    ``key_pos``: the keys' ALiBi positions, already shaped to broadcast against ``qk`` ([None, :]
    for a [queries, keys] tile, [:, None] for a transposed one). Also returns
    ``t = tanh(sm_scale * qk / softcap)``, the backward's chain-rule factor (0 without soft-capping).
    """
    t = 0.0
    if HAS_SOFTCAP or HAS_ALIBI:
        s = qk * sm_scale
        if HAS_SOFTCAP:
            t = tanh(s / softcap)
            s = softcap * t
        if HAS_ALIBI:
            s = s + slope * key_pos
        s = s * log2e()
    else:
        s = qk * qk_scale
    return s, t


@triton.jit
def alibi_sequence_positions(pos_row_ptr, stride_pos_s, offs_n, S_kv, P, HAS_POS: tl.constexpr):
    """ALiBi positions of sequence keys ``offs_n``: ``P + j`` without padding, else the host's
    ``alibi_positions`` row (P + number of real keys before j, as HF BLOOM counts)."""
    if HAS_POS:
        return tl.load(pos_row_ptr + offs_n * stride_pos_s, mask=offs_n < S_kv, other=0.0)
    return (P + offs_n).to(tl.float32)


@triton.jit
def sequence_visible(offs_m, offs_n, S, S_kv, window, kpm_row_ptr, stride_kpm_s, CHECK_BOUNDS: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr):
    """Boolean [BM, BN]: may query ``offs_m`` see sequence key ``offs_n``? With ``CHECK_BOUNDS`` it
    also hides queries and keys out of range (a kernel that neutralises those itself skips that)."""
    if CHECK_BOUNDS:
        vis = (offs_m[:, None] < S) & (offs_n[None, :] < S_kv)
    else:
        vis = tl.full([offs_m.shape[0], offs_n.shape[0]], True, tl.int1)
    # Query i sits at sequence position (S_kv - S) + i.
    diag = S_kv - S
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + diag)
    if HAS_WINDOW:
        vis = vis & ((offs_m[:, None] + diag - offs_n[None, :]) < window)
    if HAS_KPM:
        real = tl.load(kpm_row_ptr + offs_n * stride_kpm_s, mask=offs_n < S_kv, other=0)
        vis = vis & (real != 0)[None, :]
    return vis


@triton.jit
def prefix_visible(offs_m, offs_p, S, S_kv, P, window, HAS_WINDOW: tl.constexpr):
    """Boolean [BM, BP]: may query ``offs_m`` see prefix key ``offs_p``? Includes the bounds.
    The prefix is always visible except past a sliding window."""
    vis = (offs_m[:, None] < S) & (offs_p[None, :] < P)
    if HAS_WINDOW:
        vis = vis & ((P + S_kv - S + offs_m[:, None] - offs_p[None, :]) < window)
    return vis


DROPOUT_GROUP = 8     # dropout columns decided by one Philox draw (module docstring)


@triton.jit
def dropout_row_groups(P, S_kv):
    """Philox counters per query row (``G``): the prefix's and the sequence's dropout columns, each
    rounded up to whole groups of 8."""
    return tl.cdiv(P, 8) + tl.cdiv(S_kv, 8)


@triton.jit
def dropout_sequence_col0(P):
    """The dropout column of sequence key 0: the prefix's columns rounded up to a whole group."""
    return tl.cdiv(P, 8) * 8


@triton.jit
def dropout_keep(seed, bh, offs_m, col0, row_groups, dropout_p, BLOCK_N: tl.constexpr):
    """Keep mask [BM, BLOCK_N] of attention dropout for queries ``offs_m`` and the dropout columns
    ``col0 .. col0 + BLOCK_N - 1`` (``col0`` a multiple of 8) of batch-head ``bh = b * Hq + h``;
    ``row_groups`` is ``dropout_row_groups(P, S_kv)``. One Philox draw per 8 columns."""
    tl.static_assert(BLOCK_N % 8 == 0, "dropout_keep takes whole groups of 8 key columns")
    groups = col0 // 8 + tl.arange(0, BLOCK_N // 8)
    counters = (offs_m[:, None] * row_groups + groups[None, :]).to(tl.int32)
    # 64-bit key: seed + bh must not wrap differently in kernels that hold bh in int32 and int64.
    w0, w1, w2, w3 = tl.randint4x(seed.to(tl.int64) + bh.to(tl.int64), counters)
    threshold = tl.cast(dropout_p * 65536.0 + 0.5, tl.uint32)
    low = 0xFFFF
    # Three joins put 8 [BM, G] masks side by side as [BM, G, 2, 2, 2]; the reshape reads that
    # row-major, so column 8u + 4i + 2j + k takes the innermost operand i of middle operand j of
    # outer operand k: half t % 2 of word t // 2 for t = c % 8, as the operands below are ordered.
    keep = tl.join(tl.join(tl.join((w0 & low) >= threshold, (w2 & low) >= threshold),
                           tl.join((w1 & low) >= threshold, (w3 & low) >= threshold)),
                   tl.join(tl.join((w0 >> 16) >= threshold, (w2 >> 16) >= threshold),
                           tl.join((w1 >> 16) >= threshold, (w3 >> 16) >= threshold)))
    return tl.reshape(keep, [offs_m.shape[0], BLOCK_N])


@triton.jit
def dropout_keep_mask_kernel(seed_ptr, keep_ptr, S, P, S_kv, dropout_p,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the [B * Hq, S, P + S_kv] keep mask the attention kernels use (tests, debugging),
    in key columns: dropout columns ``P .. cdiv(P, 8) * 8 - 1`` belong to no key."""
    bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    seed = tl.load(seed_ptr)
    num_keys = P + S_kv
    seq_col0 = dropout_sequence_col0(P)
    row_groups = dropout_row_groups(P, S_kv)
    for start_n in range(0, seq_col0 + S_kv, BLOCK_N):
        drop_cols = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, bh, offs_m, start_n, row_groups, dropout_p, BLOCK_N)
        is_prefix = drop_cols < P
        cols = tl.where(is_prefix, drop_cols, drop_cols - seq_col0 + P)
        col_ok = is_prefix | ((drop_cols >= seq_col0) & (drop_cols < seq_col0 + S_kv))
        ptrs = keep_ptr + bh * S * num_keys + offs_m[:, None] * num_keys + cols[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < S) & col_ok[None, :])


# --------------------------------------------------------------------------------------------
# Host helpers
# --------------------------------------------------------------------------------------------

def check_dropout_counters(seq_len_q: int, prefix_len: int, seq_len_kv: int) -> None:
    """Philox counters are int32 per batch-head: ``S * G`` (``dropout_row_groups``) must stay
    below 2**31."""
    row_groups = cdiv(prefix_len, DROPOUT_GROUP) + cdiv(seq_len_kv, DROPOUT_GROUP)
    if seq_len_q * row_groups >= 2**31:
        raise ValueError(
            f"dropout_p > 0 needs S * (cdiv(P, 8) + cdiv(S_kv, 8)) < 2**31 (Philox counters), got S={seq_len_q}, "
            f"P={prefix_len}, S_kv={seq_len_kv}"
        )


def dropout_keep_mask(seed: torch.Tensor, batch: int, num_heads: int, seq_len_q: int, prefix_len: int,
                      seq_len_kv: int, dropout_p: float) -> torch.Tensor:
    """The boolean keep mask ``[B, Hq, S, P + S_kv]`` the kernels draw for ``seed`` (an int64
    tensor of one element on the kernels' device); ``reference.prefix_attention(dropout_keep=...)``
    takes it, which is how tests check dropout against the oracle."""
    num_keys = prefix_len + seq_len_kv
    check_dropout_counters(seq_len_q, prefix_len, seq_len_kv)
    keep = torch.empty(batch * num_heads, seq_len_q, num_keys, dtype=torch.int8, device=seed.device)
    grid = (batch * num_heads, cdiv(seq_len_q, 32))
    launch_kernel(dropout_keep_mask_kernel, grid, seed, keep, seq_len_q, prefix_len, seq_len_kv, float(dropout_p),
                  BLOCK_M=32, BLOCK_N=64)
    return keep.view(batch, num_heads, seq_len_q, num_keys).bool()


def alibi_positions(key_padding_mask: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """float32 [B, S_kv]: ALiBi position of each sequence key under padding, as HF BLOOM builds it
    from the mask with the prefix's ones prepended (padded keys get 0; they are hidden anyway)."""
    real = key_padding_mask.to(torch.int32)
    return ((real.cumsum(-1, dtype=torch.int32) - 1 + prefix_len) * real).to(torch.float32)


def padding_mask_for_kernel(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """The mask as the kernels load it: bool viewed as uint8 (no copy), integer masks unchanged."""
    return key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask


@triton.jit
def load_tile(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a tile, paying for a bounds mask only on the axes that can run out of range
    (``rows_ok``/``cols_ok`` are broadcastable boolean vectors)."""
    if CHECK_ROWS and CHECK_COLS:
        return tl.load(ptrs, mask=rows_ok & cols_ok, other=0.0)
    elif CHECK_ROWS:
        return tl.load(ptrs, mask=rows_ok, other=0.0)
    elif CHECK_COLS:
        return tl.load(ptrs, mask=cols_ok, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def batch_row(ptr, b64, stride_b, PRESENT: tl.constexpr):
    """``ptr`` advanced to batch row ``b64``, for an optional input. An absent one arrives as None
    (no pointer for the launcher to check) and is never read: 0 stands in for it (a helper
    returning None does not compile on Triton 3.6)."""
    row = 0
    if PRESENT:
        row = ptr + b64 * stride_b
    return row


@triton.jit
def prefix_row(b, prefix_index_ptr, HAS_PREFIX_INDEX: tl.constexpr):
    """Which prefix batch row ``b`` reads: ``prefix_index[b]`` per task, else ``b`` (the launcher
    passes batch stride 0 for a batch-shared prefix)."""
    if HAS_PREFIX_INDEX:
        return tl.load(prefix_index_ptr + b).to(tl.int64)
    return b.to(tl.int64)


@triton.jit
def real_key_range(kpm_row_ptr, stride_kpm_s, S_kv, HAS_KPM: tl.constexpr):
    """``(real_lo, real_hi)``: a batch row's first real sequence key and one past its last (0, 0
    when it has none), read from its padding mask (``S_kv`` bytes, against the ``2 * S_kv * D``
    elements of K/V the caller reads), so that the attention skips the key blocks wholly outside
    them: the queries of a right- or left-padded row visit only the blocks holding real keys.
    Without a mask: ``(0, S_kv)``."""
    if HAS_KPM:
        real_lo = S_kv
        real_hi = 0
        # 512 mask bytes a step: no tile of the tables spills (at 128 and 256 one did, on sm_90).
        # A literal: Triton re-checks a global constant on every launch.
        for start in range(0, S_kv, 512):
            offs = start + tl.arange(0, 512)
            real = tl.load(kpm_row_ptr + offs * stride_kpm_s, mask=offs < S_kv, other=0) != 0
            real_lo = tl.minimum(real_lo, tl.min(tl.where(real, offs, S_kv), 0))
            real_hi = tl.maximum(real_hi, tl.max(tl.where(real, offs + 1, 0), 0))
        real_lo = tl.minimum(real_lo, real_hi)        # no real key: (0, 0)
    else:
        real_lo = 0
        real_hi = S_kv
    return real_lo, real_hi


@triton.jit
def sequence_key_range(q_lo, q_hi, S, S_kv, window, real_lo, real_hi, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr):
    """Sequence key blocks queries ``[q_lo, q_hi)`` can see, as ``(lo, full_lo, full_hi, hi)``:
    ``[lo, full_lo)`` and ``[full_hi, hi)`` need the visibility mask, ``[full_lo, full_hi)`` is
    visible to every query of the block and in bounds, so its mask is skipped. All are multiples
    of BLOCK_N except ``hi``. With padding, blocks wholly outside the row's real keys ``[real_lo,
    real_hi)`` (``real_key_range``) are not visited, and every visited block tests the mask: an
    unmasked middle loop as well would cost these kernels their register budget (ptxas spilled
    with it at several tiles of the tables)."""
    diag = S_kv - S
    hi = S_kv
    if CAUSAL:
        hi = tl.minimum(S_kv, q_hi + diag)
    if HAS_KPM:
        hi = tl.minimum(hi, real_hi)
    hi = tl.maximum(hi, 0)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, q_lo + diag - window + 1) // BLOCK_N * BLOCK_N
    if HAS_KPM:
        lo = tl.maximum(lo, real_lo // BLOCK_N * BLOCK_N)
    lo = tl.minimum(lo, hi // BLOCK_N * BLOCK_N)
    if HAS_KPM:
        full_lo = lo
        full_hi = lo
    else:
        full_hi = S_kv
        if CAUSAL:
            full_hi = tl.minimum(S_kv, q_lo + diag + 1)
        full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
        full_lo = lo
        if HAS_WINDOW:
            full_lo = tl.cdiv(tl.maximum(q_hi + diag - window, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.cdiv(hi, BLOCK_N) * BLOCK_N)
        full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


def prefix_strides(prefix: torch.Tensor) -> tuple[int, ...]:
    """(batch, head, position, dim) strides of a prefix; batch stride 0 when it is batch-shared."""
    return ((0,) if prefix.dim() == 3 else ()) + tuple(prefix.stride())


class PackedRows(NamedTuple):
    """Packed sequences (flash-attn's varlen layout): sequence b is tokens
    ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of ``q [total_q, Hq, D]`` and likewise for the keys."""
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def attention_dims(q: torch.Tensor, k: torch.Tensor, packed: PackedRows | None):
    """``(B, Hq, Hkv, S, S_kv, D)`` of a launch; packed rows give their count and longest lengths."""
    if packed is not None:
        return (packed.cu_seqlens_q.shape[0] - 1, q.shape[1], k.shape[1], packed.max_seqlen_q, packed.max_seqlen_k,
                q.shape[2])
    return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]


def bhsd_strides(t: torch.Tensor, packed: bool) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) strides of ``[B, H, S, D]``, or of packed ``[total, H, D]`` (batch
    stride 0: a packed row's first token comes from cu_seqlens)."""
    if packed:
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return tuple(t.stride())


def empty_in_layout_of(t: torch.Tensor) -> torch.Tensor:
    """An output (or gradient) laid out like ``t`` where ``t`` has a unit-stride head dim: HF holds
    q/k/v as ``[B, S, H, D]`` memory viewed ``[B, H, S, D]``, so its transpose back, reshape and
    the gradient's way into the projection stay views instead of copies. Other layouts get a
    contiguous tensor. The custom ops' fake implementations use it too (same strides)."""
    if t.stride(-1) == 1:
        return torch.empty_like(t)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


class LaunchInputs(NamedTuple):
    """The optional inputs every attention kernel takes after its dense tensors, in the kernels'
    order; None where absent (a constexpr the kernel never reads, its flag off: the launcher then
    has no pointer to fetch and check for it on every launch)."""
    prefix_index: torch.Tensor | None
    kpm: torch.Tensor | None
    slopes: torch.Tensor | None
    positions: torch.Tensor | None
    seed: torch.Tensor | None
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None

    def flags(self, dropout_p: float) -> dict[str, bool]:
        """The kernels' constexpr flags for these inputs."""
        return {"HAS_PREFIX_INDEX": self.prefix_index is not None, "HAS_KPM": self.kpm is not None,
                "HAS_ALIBI": self.slopes is not None, "HAS_POS": self.positions is not None,
                "HAS_DROPOUT": dropout_p > 0.0, "VARLEN": self.cu_seqlens_q is not None}

    def strides(self) -> tuple[int, ...]:
        """The padding mask's, the slopes' and the ALiBi positions' strides, (0, 0) each where absent
        (per-head slopes ``[Hq]`` as a batch stride of 0)."""
        kpm, slopes, positions = self.kpm, self.slopes, self.positions
        if slopes is None:
            slope_strides = (0, 0)
        else:
            slope_strides = (0, slopes.stride(0)) if slopes.dim() == 1 else tuple(slopes.stride())
        return ((*kpm.stride(),) if kpm is not None else (0, 0)) + slope_strides + (
            (*positions.stride(),) if positions is not None else (0, 0))


def attention_launch_args(prefix_k, prefix_index, key_padding_mask, alibi_slopes, seed, cu_seqlens_q=None,
                          cu_seqlens_k=None) -> LaunchInputs:
    """The optional inputs of an attention launch, in the form the kernels read them: the padding
    mask as the kernels' dtype, float32 slopes, and ALiBi's key positions where rows are padded."""
    # The kernels read the index vectors (prefix_index [B], cu_seqlens [B + 1]) at unit stride: a
    # strided one (a view into a wider tensor, rare) is copied, a few bytes, where the dense tensors'
    # strides go to the kernels instead. (Strided ones read other rows' entries until 2026-11-28.)
    prefix_index, cu_seqlens_q, cu_seqlens_k = (None if t is None else t.contiguous()
                                                for t in (prefix_index, cu_seqlens_q, cu_seqlens_k))
    kpm = padding_mask_for_kernel(key_padding_mask) if key_padding_mask is not None else None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float32)
        positions = alibi_positions(key_padding_mask, prefix_k.shape[-2]) if kpm is not None else None
    else:
        slopes = positions = None
    return LaunchInputs(prefix_index, kpm, slopes, positions, seed, cu_seqlens_q, cu_seqlens_k)


def attention_plan_key(tensors, causal: bool, softmax_scale: float, dropout_p: float, softcap: float | None,
                       window: int | None, packed: PackedRows | None) -> tuple:
    """What an attention launch's non-tensor arguments are made of, the key of its launch plan:
    its tensors' layouts (``tensors[0]`` is q), the options, the packed rows' longest lengths (in
    no shape) and the switches every attention launcher reads (a launcher adds its own)."""
    q = tensors[0]
    return (tensor_layouts(tensors), q.device, causal, softmax_scale, dropout_p, softcap, window,
            packed[2:] if packed else None, HEAVY_FIRST, input_precision(q.dtype))


def config_bucket(head_dim_block: int, elem_bytes: int) -> tuple[int, int]:
    """The key of a config table: (2 for 16-bit inputs else 4, head-dim block 64, 128 or 256)."""
    return (2 if elem_bytes <= 2 else 4, max(64, head_dim_block))


def smem_rows(kernel: str, config) -> int:
    """Rows of ``head_dim_block`` elements a kernel keeps in shared memory under ``config``: its
    stationary tiles plus ``num_stages`` buffers of the tiles it streams. Matches what sm_90
    compiles use when a launch specialises unit strides (tests/tools/kernel_resources.py prints
    both; e.g. the forward at (128, 64, 8, 3), D = 128, bf16: 131072 bytes)."""
    block_m, block_n, _, stages = config
    # Unpipelined (one stage), operands still pass through shared memory on their way to the
    # tensor cores: budget two buffers.
    stages = max(stages, 2)
    if kernel == "fwd":      # Q stays; K and V stream
        return block_m + stages * 2 * block_n
    if kernel == "dq":       # Q and dO stay; K and V stream
        return 2 * block_m + stages * 2 * block_n
    if kernel == "dkdv":     # K and V stay; Q and dO stream
        return 2 * block_n + stages * 2 * block_m
    if kernel == "dkdv+dq":  # the one-launch backward: either role at the same tile; dK/dV streams O too
        return max(smem_rows("dq", config), 2 * block_n + stages * 3 * block_m)
    raise ValueError(f"unknown kernel {kernel!r}")


def fits_smem(kernel: str, config, head_dim_block: int, elem_bytes: int, device: torch.device) -> bool:
    """Whether ``config`` fits the device's shared memory (``smem_rows``); a config that still does
    not fit is skipped when timed."""
    if device.type != "cuda":
        return True
    return smem_rows(kernel, config) * head_dim_block * elem_bytes <= smem_bytes(device_index(device))


def fitting_configs(kernel: str, configs, head_dim_block: int, q: torch.Tensor, fallback):
    """The candidates of a launch: ``configs`` that fit the device's shared memory (``fallback``,
    a smaller tile, where none does), or the interpreter's one small tile."""
    if triton_interpret():
        return [(16, 16, 1, 1)]
    return [c for c in configs if fits_smem(kernel, c, head_dim_block, q.element_size(), q.device)] or [fallback]
