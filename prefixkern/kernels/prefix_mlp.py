"""Triton kernels of the prefix reparameterisation MLP, and their launchers.

PEFT's ``PrefixEncoder`` with ``prefix_projection=True`` is ``E -> tanh(E @ W1^T + b1) @ W2^T + b2``
with ``E: [P, d]``, ``W1: [h, d]``, ``W2: [N, h]``, ``N = 2 * L * Hkv * D``. Column ``c`` of the
``[P, N]`` product is layer l, key/value t, KV head g, channel d of the prefix with
``c = ((l * 2 + t) * Hkv + g) * D + d``, so the kernels write (and read the gradient) straight in
the ``[L, 2, Hkv, P, D]`` layout the attention kernel takes, through that tensor's strides.

The problem is tall-skinny: P (1..256) rows against N (65536 for Llama-3-8B) columns, and its
cost is reading ``W2`` (``N x h``). Every kernel therefore keeps all P rows of a tile in one
block (``BLOCK_P`` = next power of two of P, capped; larger P loops or splits) and tiles N:

forward   ``prefix_mlp_matmul_kernel``   H = tanh(E @ W1^T + b1), [P, h] float32 (kept for backward)
          ``prefix_mlp_fwd_kernel``      out = dropout(H @ W2^T + b2) into [L, 2, Hkv, P, D]
backward  ``prefix_mlp_bwd_kernel``      two kinds of program: split-N partials of
                                         dH = G @ W2, [splits, P, h], reading W2 once; and
                                         dW2 = G^T @ H, db2 (no atomics: deterministic); one
                                         launch, or one per kind where W2 is large, dW2 then a
                                         program per tile or per strip of tiles (``BwdTile``)
                                         (where W2 is large and float32, the tuner also times
                                         cuBLAS for both products: ``LibraryProducts``)
          ``prefix_mlp_bwd_hidden_kernel`` dZ = (sum of partials) * (1 - H^2), db1 = sum_p dZ
          ``prefix_mlp_matmul_pair_kernel`` dE = dZ @ W1 and dW1 = dZ^T @ E, one launch
small MLPs (``small_mlp``: Qwen2.5-0.5B's; host-bound, so fewer launches)
          ``prefix_mlp_fwd_kernel``      with FUSE_HIDDEN: computes the H chunks it reads (and
                                         stores H): the forward in one launch
          ``prefix_mlp_bwd_first_kernel`` dZ from the partials in every tile, dE, dW1 and db1:
                                         with ``prefix_mlp_bwd_kernel``, the backward in two
P-Tuning v2 and dropout
          ``prefix_kv_copy_kernel``      [P, N] rows <-> [L, 2, Hkv, P, D], with Philox dropout

Products: every kernel takes ``PRECISION``, what ``nn.Linear`` would do with the parameters at hand:
"ieee" (exact float32 products, PyTorch's default) or "tf32" (TF32 tensor cores, when PyTorch's
float32 matmul precision allows them) for float32 parameters; "bf16" / "fp16" for 16-bit
parameters, or float32 ones under ``torch.autocast``: operands rounded to that dtype on load,
float32 accumulation, and each Linear's output (and the tanh) rounded to it, as autocast's
Linear and Tanh return them. W2 is read in its own dtype either way (no cast copy of it).
Exact float32 products run as "tf32x3" on GPUs with TF32 tensor cores (sm_80 and later): each
operand split into two TF32 parts, three tensor-core products (big x big + big x small + small x
big). Its error is float32's (benchmarks/mlp_precision.py emulates the split at the suite's
shapes; on the H100 the GPU test holds it within 2x of FMA products' error at the real sizes),
while "ieee" (``PREFIXKERN_MLP_TF32X3=0``, and older GPUs) keeps the products on FMA units, which
bound the forward at Llama-3-8B size: 3xTF32 took it from 0.462 to 0.153 ms on the H100.

Dropout keeps element (p, c) of the ``[P, N]`` output iff ``tl.rand(seed, p * N + c) >= dropout_p``
and scales kept values by ``1 / (1 - dropout_p)``; the backward regenerates the same mask.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._backend import override_global, triton_interpret
from ._launch import (LaunchGroup, LaunchPlan, PlannedCall, cdiv, device_index, input_precision, keep_plan,
                      kept_plan, launch_kernel, next_power_of_2, num_sms, pick_config, plan_table, smem_bytes,
                      tensor_layouts)
from ._math import dot, to_bf16
from ._math import tanh as _tanh

# Exact float32 products as three TF32 tensor-core products ("tf32x3", see the module docstring)
# rather than on FMA units ("ieee"); PREFIXKERN_MLP_TF32X3=0 keeps FMA products. The default since
# the H100 run of 2026-11-26: its GPU error test passed and it beat FMA products 3x forward.
TF32X3 = os.environ.get("PREFIXKERN_MLP_TF32X3", "1") != "0"


def tf32x3_products(enabled: bool = True):
    """Run the block with ``TF32X3`` set to ``enabled`` (the benchmarks and tests take both paths)."""
    return override_global(globals(), "TF32X3", enabled)


# The forward's P rows share one block up to this size; beyond, it splits P across the grid, the
# programs that read one W2 tile side by side (L2 serves the repeats). Taller P tiles spilled
# registers (tests/tools/kernel_resources.py). The backward's P tile: bwd_block_p.
MAX_BLOCK_P_FWD = 64


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _kv_column_offsets(cols, Hkv, D, stride_l, stride_t, stride_g, stride_d):
    """Memory offsets of columns ``c = ((l * 2 + t) * Hkv + g) * D + d`` of a [L, 2, Hkv, P, D] tensor."""
    d = cols % D
    rest = cols // D
    g = rest % Hkv
    rest = rest // Hkv
    t = rest % 2
    layer = rest // 2
    return layer * stride_l + t * stride_t + g * stride_g + d * stride_d


@triton.jit
def _kv_tile_pointers(base_ptr, rows, stride_p, n0, BLOCK_N: tl.constexpr, Hkv, D, stride_l, stride_t, stride_g,
                      stride_d, D_TILE: tl.constexpr):
    """Pointers to the [rows, BLOCK_N columns from n0] tile of a [L, 2, Hkv, P, D] tensor at
    ``base_ptr`` (n0 a multiple of BLOCK_N), columns as ``_kv_column_offsets`` maps them. Where
    BLOCK_N divides the head dim (``D_TILE``: the largest power of two that does, see
    ``head_dim_tile``) the tile lies in one head's channels: a 64-bit scalar base plus 32-bit
    offsets ``rows * stride_p + d * stride_d``, which the compiler sees as contiguous rows, so the
    software pipeline can copy the tile asynchronously. (Per-column 64-bit offsets hide that: each
    iteration of the backward's loops waited on its G load.)"""
    if BLOCK_N <= D_TILE:
        # (a multiple of BLOCK_N: said, since the divisibility analysis of Triton 3.6 loses it at
        # the remainder, and an unaligned base leaves the copy synchronous there)
        d0 = tl.multiple_of(n0 % D, BLOCK_N)
        rest = n0 // D
        g = rest % Hkv
        rest = rest // Hkv
        tile_ptr = base_ptr + ((rest // 2) * stride_l + (rest % 2) * stride_t + g * stride_g + d0 * stride_d)
        return tile_ptr + (rows[:, None] * stride_p + tl.arange(0, BLOCK_N)[None, :] * stride_d)
    col_offsets = _kv_column_offsets(n0 + tl.arange(0, BLOCK_N), Hkv, D, stride_l, stride_t, stride_g, stride_d)
    return base_ptr + (rows[:, None] * stride_p + col_offsets[None, :])


@triton.jit
def _tile_columns_mask(cols, n_end, BLOCK_N: tl.constexpr, D_TILE: tl.constexpr):
    """``cols < n_end`` for a tile of ``_kv_tile_pointers``; all true where BLOCK_N divides the head
    dim, since N and every bound a tile loop runs to (a split's end, a strip's, N) are then
    multiples of BLOCK_N. A mask that varies along the contiguous columns would keep the copy from
    being vectorised (and so from being asynchronous)."""
    if BLOCK_N <= D_TILE:
        return tl.full((BLOCK_N,), 1, tl.int1)
    return cols < n_end


@triton.jit
def _dropout(x, seed_ptr, rows, cols, N, dropout_p):
    """Inverted dropout of a [rows, cols] tile of the [P, N] output, Philox counter p * N + c."""
    seed = tl.load(seed_ptr)
    # int32 counters: the launcher checks P * N < 2**31.
    counters = (rows[:, None] * N + cols[None, :]).to(tl.int32)
    keep = tl.rand(seed, counters) >= dropout_p
    return tl.where(keep, x / (1.0 - dropout_p), 0.0)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` with the products ``PRECISION`` names (see the module docstring)."""
    if PRECISION == "bf16":
        # _math's dot and to_bf16 are plain tl.dot and .to(tl.bfloat16) compiled; they correct
        # what Triton's interpreter gets wrong in both.
        acc += dot(to_bf16(a.to(tl.float32)), to_bf16(b.to(tl.float32)), "ieee")
    elif PRECISION == "fp16":
        acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _round(x, PRECISION: tl.constexpr):
    """``x`` rounded to the 16-bit dtype of the products, as a 16-bit Linear or Tanh returns it
    (float32 products: unchanged)."""
    if PRECISION == "bf16":
        x = to_bf16(x).to(tl.float32)
    elif PRECISION == "fp16":
        x = x.to(tl.float16).to(tl.float32)
    return x


def _fits_smem(num_stages: int, elements_per_stage: int, elements_once: int = 0) -> bool:
    """Whether a software pipeline of float32 tiles (and ``elements_once`` staged outside it) fits
    in shared memory, so a candidate list never holds only a config that cannot launch."""
    if not torch.cuda.is_available():
        return True
    return (num_stages * elements_per_stage + elements_once) * 4 <= smem_bytes(torch.cuda.current_device())


# --------------------------------------------------------------------------------------------
# Small GEMM with a fused epilogue: H = tanh(E @ W1^T + b1), dE = dZ @ W1, dW1 = dZ^T @ E
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) candidates; the interpreter runs one small tile.
# The 16 x 32 tile is for the forward's H = tanh(E W1^T + b1) at P <= 64 rows: Llama-3-8B's
# (64 x 1024, K = 1024) ran 34 of the forward's 181 us in 16 programs under Nsight Compute (the
# fifth H200 run); 16 x 32 tiles make 128 programs of it (sm_90, Triton 3.9: 92 registers with FMA
# products, 165 with 3xTF32, no spills; a 2-warp variant spilled 8 B in the pair kernel). Untimed:
# the tuner decides.
MATMUL_TILES = ((16, 64, 64, 4, 3), (16, 32, 64, 4, 3), (32, 64, 32, 4, 4), (64, 64, 32, 4, 4), (64, 128, 32, 8, 3),
                (128, 64, 32, 8, 3), (128, 128, 32, 8, 3))
INTERPRETER_MATMUL_TILE = (32, 32, 32, 4, 1)
# The pair kernel (dE and dW1 in one launch) inlines the tile loop twice and holds more registers:
# MATMUL_TILES less (128, 128, 32, 8, 3), which spills 96-568 B there, and (32, 64, 32, 4, 4), 8 B
# with FMA products (sm_90, Triton 3.9; tests/tools/kernel_resources.py --kernels mlp). On Triton
# 3.6 (64, 64, 32, 4, 4) spills 32 B with FMA products, where the tuner drops it; the first entry
# is spill-free on both.
MATMUL_PAIR_TILES = tuple(t for t in MATMUL_TILES if t not in ((128, 128, 32, 8, 3), (32, 64, 32, 4, 4)))


def matmul_candidates(m: int, tiles=MATMUL_TILES) -> list[tuple[int, int, int, int, int]]:
    """The matmul tiles of ``tiles`` worth timing for M rows (M is P in the forward's product)."""
    if triton_interpret():
        return [INTERPRETER_MATMUL_TILE]
    # A tile much taller than M only multiplies zeros.
    cap = max(16, next_power_of_2(m))
    kept = [t for t in tiles if t[0] <= cap and _fits_smem(t[4], (t[0] + t[1]) * t[2])]
    return kept or [min(tiles, key=lambda t: t[0])]


@triton.jit
def _product(a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, K, stride_am, stride_ak, stride_bk, stride_bn,
             PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``A[offs_m, :] @ B[:, offs_n]`` over K in BLOCK_K steps, float32 [len(offs_m), len(offs_n)]."""
    acc = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(a, b, acc, PRECISION)
    return acc


@triton.jit
def _matmul_tile(
    a_ptr, b_ptr, bias_ptr, c_ptr, pid_m, pid_n,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, APPLY_TANH: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Tile (pid_m, pid_n) of C[M, N] = act(A[M, K] @ B[K, N] + bias[N]).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = _product(a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, K, stride_am, stride_ak, stride_bk, stride_bn,
                   PRECISION, BLOCK_K)
    if HAS_BIAS:
        acc += _round(tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32), PRECISION)[None, :]
    if APPLY_TANH:
        acc = _round(_tanh(_round(acc, PRECISION)), PRECISION)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def prefix_mlp_matmul_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, APPLY_TANH: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``C[M, N] = act(A[M, K] @ B[K, N] + bias[N])``, float32 accumulation, stored in C's dtype.
    With APPLY_TANH (the first Linear and its Tanh) the Linear's output and the tanh are rounded
    as ``PRECISION`` says; the backward's products (APPLY_TANH off) keep float32 results."""
    _matmul_tile(a_ptr, b_ptr, bias_ptr, c_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64),
                 M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                 HAS_BIAS, APPLY_TANH, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def prefix_mlp_matmul_pair_kernel(
    a1_ptr, b1_ptr, c1_ptr, a2_ptr, b2_ptr, c2_ptr,
    M1, N1, K1, M2, N2, K2,
    stride_a1m, stride_a1k, stride_b1k, stride_b1n, stride_c1m, stride_c1n,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_c2m, stride_c2n,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Two independent products ``C1 = A1 @ B1`` and ``C2 = A2 @ B2`` (no bias or activation) in
    one launch: a 1-D grid, C1's tiles first. The backward's dE and dW1 both follow from dZ, and a
    launch is what a small prefix's backward costs on the host."""
    pid = tl.program_id(0)
    tiles_n1 = tl.cdiv(N1, BLOCK_N)
    tiles1 = tl.cdiv(M1, BLOCK_M) * tiles_n1
    if pid < tiles1:
        _matmul_tile(a1_ptr, b1_ptr, None, c1_ptr, (pid // tiles_n1).to(tl.int64), (pid % tiles_n1).to(tl.int64),
                     M1, N1, K1, stride_a1m, stride_a1k, stride_b1k, stride_b1n, stride_c1m, stride_c1n,
                     False, False, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        tiles_n2 = tl.cdiv(N2, BLOCK_N)
        pid2 = pid - tiles1
        _matmul_tile(a2_ptr, b2_ptr, None, c2_ptr, (pid2 // tiles_n2).to(tl.int64), (pid2 % tiles_n2).to(tl.int64),
                     M2, N2, K2, stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_c2m, stride_c2n,
                     False, False, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


# --------------------------------------------------------------------------------------------
# Forward second GEMM: out[l, t, g, p, d] = dropout(H @ W2^T + b2)[p, c]
# --------------------------------------------------------------------------------------------

# (BLOCK_N, BLOCK_K, num_warps, num_stages) candidates; BLOCK_P follows P (_block_p).
FWD_TILES = ((32, 64, 4, 4), (64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 8, 3), (256, 32, 8, 3))
INTERPRETER_FWD_TILE = (32, 16, 4, 1)
# Exact float32 products run on FMA units, where a 64-row P tile holds 150-255 registers per
# thread (one or two blocks per SM; sm_90 compiles, tests/tools/kernel_resources.py). Two 32-row
# alternatives for P > 32, the 32-row tiles with the most FFMA per shared-memory load (9.5 per
# LDS.128 in their SASS), at 148 registers on Triton 3.9 and 212 on 3.6: W2 is then read once
# per P tile, the second time from L2. Untimed: the tuner decides.
IEEE_SPLIT_P_TILES = ((128, 32, 4, 4), (256, 32, 8, 3))
# "tf32x3" holds both TF32 parts of each operand tile: FWD_TILES' entries that compile for sm_90
# without spills at every P tile on Triton 3.9 but the last, 32 B at P tile 32 (compiled as a launch
# specialises it). On 3.6 all but the first spill 8-20 B at P tile 32 and the last at 64; the tuner
# drops a spilling candidate, and the first is spill-free on both.
TF32X3_FWD_TILES = ((64, 32, 4, 4), (128, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 3))
# Tiles of the transposed product (W2_LHS: W2's tile the left operand, in registers) for tensor-core
# products; BLOCK_N is the product's M, 64 rows per warp group. The sixth H200 run's Nsight Compute
# read the forward's W2 at 42% of DRAM bandwidth (bf16 autocast, Llama-3-8B), one block of 4
# warps per SM; the backward's dH launch, built the same way, was L1-bound. Untimed: the tuner decides.
W2_LHS_FWD_TILES = ((64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 8, 3))


def fwd_configs(num_rows: int, num_cols: int, precision: str) -> list[tuple[int, int, int, int, int, bool]]:
    """The forward's (BLOCK_P, BLOCK_N, BLOCK_K, num_warps, num_stages, W2_LHS) candidates: every P
    row in one tile, for exact float32 products also 32-row tiles (see IEEE_SPLIT_P_TILES), and
    for tensor-core products the transposed product's tiles (W2_LHS_FWD_TILES) last. The tuner
    times them; the first is used with autotuning off."""
    block_p = _block_p(num_rows, MAX_BLOCK_P_FWD)
    configs = [(block_p, *tile, False) for tile in fwd_candidates(block_p, num_cols, precision)]
    if precision == "ieee" and block_p > 32:     # (the interpreter's one tile is not among them)
        configs += [(32, *tile, False) for tile in fwd_candidates(32, num_cols, precision)
                    if tile in IEEE_SPLIT_P_TILES]
    if precision != "ieee" and not triton_interpret():
        configs += [(block_p, *tile, True) for tile in fwd_candidates(block_p, num_cols, precision, W2_LHS_FWD_TILES)]
    return configs


def fwd_candidates(block_p: int, num_cols: int, precision: str,
                   tiles: tuple | None = None) -> list[tuple[int, int, int, int]]:
    """The forward tiles worth timing for a P tile of ``block_p`` rows and N = ``num_cols``, of
    ``tiles`` (default: the precision's table)."""
    if triton_interpret():
        return [INTERPRETER_FWD_TILE]
    # The [BLOCK_P, BLOCK_N] float32 accumulator lives in registers; H and W2 tiles are pipelined.
    # FMA dots ("ieee") hold more per thread than tensor-core ones: half the accumulator, or spills.
    max_acc = 8192 if precision == "ieee" else 16384
    if tiles is None:
        tiles = TF32X3_FWD_TILES if precision == "tf32x3" else FWD_TILES
    kept = [t for t in tiles if block_p * t[0] <= max_acc and block_p * t[1] <= 16384
            and _fits_smem(t[3], (block_p + t[0]) * t[1])]
    # Narrow N (small models) needs narrow tiles to fill the GPU: drop tiles that leave it mostly idle.
    if torch.cuda.is_available() and kept:
        sms = num_sms(torch.cuda.current_device())
        filled = [t for t in kept if cdiv(num_cols, t[0]) >= sms]
        kept = filled or [min(kept, key=lambda t: t[0])]
    return kept or [min(tiles, key=lambda t: t[0] * t[1])]


@triton.jit
def _hidden_chunk(e_ptr, w1_ptr, b1_ptr, rows, ks, mask_p, mask_k, TOKEN_DIM,
                  stride_ep, stride_ed, stride_w1k, stride_w1d,
                  HAS_B1: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr):
    """``tanh(E[rows] @ W1[ks]^T + b1[ks])``, float32 [BLOCK_P, BLOCK_K], rounded as the first GEMM's
    kernel rounds it (``_matmul_tile`` with APPLY_TANH)."""
    acc = _product(e_ptr, w1_ptr, rows, ks, mask_p, mask_k, TOKEN_DIM, stride_ep, stride_ed, stride_w1d, stride_w1k,
                   PRECISION, BLOCK_D)
    if HAS_B1:
        acc += _round(tl.load(b1_ptr + ks, mask=mask_k, other=0.0).to(tl.float32), PRECISION)[None, :]
    return _round(_tanh(_round(acc, PRECISION)), PRECISION)


@triton.jit
def prefix_mlp_fwd_kernel(
    h_ptr, w2_ptr, b2_ptr, out_ptr, seed_ptr, e_ptr, w1_ptr, b1_ptr,
    P, N, HID, Hkv, D, dropout_p, TOKEN_DIM,
    stride_hp, stride_hk,
    stride_w2n, stride_w2k,
    stride_ol, stride_ot, stride_og, stride_op, stride_od,
    stride_ep, stride_ed, stride_w1k, stride_w1d,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FUSE_HIDDEN: tl.constexpr, HAS_B1: tl.constexpr, BLOCK_D: tl.constexpr, W2_LHS: tl.constexpr,
):
    """``out = dropout(H @ W2^T + b2)`` into [L, 2, Hkv, P, D], H read from ``h_ptr``. With
    FUSE_HIDDEN (small MLPs, ``small_mlp``) each program computes the H chunks it needs from E,
    W1 and b1 instead (``_hidden_chunk``), and the programs of the first N tile store them to
    ``h_ptr`` for the backward: the whole forward in one launch. ``W2_LHS``: the product taken
    transposed, ``out^T = W2 @ H^T``, so that W2's tile is the left operand, which on Hopper stays
    in registers where it is rounded (16-bit products) or split (3xTF32); as the right operand it
    goes back to shared memory for the tensor cores first (``_bwd_dh_program`` does the same)."""
    # P blocks vary fastest so the programs that read one W2 tile run together (L2 reuse when P is split).
    pid_p = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_p = rows < P
    mask_n = cols < N
    if W2_LHS:
        acc_t = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, HID, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < HID
        h_ptrs = h_ptr + rows[:, None] * stride_hp + ks[None, :] * stride_hk
        if FUSE_HIDDEN:
            hidden = _hidden_chunk(e_ptr, w1_ptr, b1_ptr, rows, ks, mask_p, mask_k, TOKEN_DIM,
                                   stride_ep, stride_ed, stride_w1k, stride_w1d, HAS_B1, PRECISION, BLOCK_D)
            if pid_n == 0:      # every program computes the same chunk; one stores it
                tl.store(h_ptrs, hidden, mask=mask_p[:, None] & mask_k[None, :])
        else:
            hidden = tl.load(h_ptrs, mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        if W2_LHS:
            w2 = tl.load(w2_ptr + cols[:, None] * stride_w2n + ks[None, :] * stride_w2k,
                         mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc_t = _mma(w2, tl.trans(hidden), acc_t, PRECISION)
        else:
            w2_t = tl.load(w2_ptr + ks[:, None] * stride_w2k + cols[None, :] * stride_w2n,
                           mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = _mma(hidden, w2_t, acc, PRECISION)
    if W2_LHS:
        acc = tl.trans(acc_t)
    if HAS_BIAS:
        acc += _round(tl.load(b2_ptr + cols, mask=mask_n, other=0.0).to(tl.float32), PRECISION)[None, :]
    acc = _round(acc, PRECISION)
    if HAS_DROPOUT:
        acc = _dropout(acc, seed_ptr, rows, cols, N, dropout_p)
    out_offsets = rows[:, None] * stride_op + _kv_column_offsets(cols, Hkv, D, stride_ol, stride_ot, stride_og,
                                                                 stride_od)[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------
# Backward of the second Linear: split-N partials of dH = G @ W2, and dW2 = G^T @ H, db2
# --------------------------------------------------------------------------------------------

# One launch runs both products (a two-launch BwdTile: one launch each), each program one role
# with its own tile: the dH programs (first in the grid, the long ones) stream W2 once, a split of
# N each, into float32 [P, BLOCK_K] accumulators; the dW2 programs each write one [BLOCK_N, BLOCK_K]
# tile of dW2 (or a strip of them) from G and H, which are small (dW2 does not read W2, so fusing
# both into one loop, as this kernel once did, saved nothing but a re-read of G from L2 and bound
# both to one small tile: 2 ms at Llama-3-8B size).
# The P tiles follow P (bwd_block_p). "tensor": TF32 and 16-bit products; "ieee": FMA dots, whose
# operands and accumulators take registers per thread, so smaller tiles; "tf32x3": the "tensor"
# entries with a 32-wide dH tile (the 64-wide ones spill 4-300 B holding both TF32 parts of each
# operand). Compiled for sm_90 as launches specialise them (unit inner strides; Triton 3.9,
# tests/tools/kernel_resources.py --kernels mlp), every entry is spill-free at every P tile and
# product precision but the second "ieee" one, 8 B at P tile 32; on Triton 3.6 the third "tensor"
# entry spills about 100 B at P tile 64. The tuner drops a spilling candidate (pick_config). The
# first entry of each table, the one used with autotuning off, is spill-free on both.
class BwdTile(NamedTuple):
    """One candidate of ``prefix_mlp_bwd_kernel``: the dH and dW2 programs' tiles, warps and stages.

    ``dw_num_warps == 0``: one launch runs both kinds of program, so the dW2 programs (most of the
    grid: 8192 at Llama-3-8B size) run at the dH programs' register and shared-memory footprint,
    one block per SM at the large tiles. Otherwise the dW2 programs get a launch of their own with
    these warps and stages, compiled with their own footprint (2-4 blocks per SM at a 64 x 64 tile):
    one launch more, offered only where W2 is large (``BWD_TWO_LAUNCH_MIN_W2``). ``dw_strips``: that
    launch walks strips of dW2 tiles, a program each (``_bwd_dw2_strip_program``), rather than
    giving each tile a program; offered where one P tile covers every row."""
    dh_block_n: int
    dh_block_k: int
    dw_block_n: int
    dw_block_k: int
    num_warps: int
    num_stages: int
    dw_num_warps: int = 0
    dw_num_stages: int = 0
    dw_strips: bool = False
    dh_w2_lhs: bool = False


BWD_TILES = {
    "tensor": (BwdTile(64, 64, 128, 128, 8, 4), BwdTile(32, 128, 128, 64, 8, 4), BwdTile(64, 128, 128, 128, 8, 3),
               BwdTile(32, 64, 64, 64, 8, 3)),
    "tf32x3": (BwdTile(32, 128, 128, 64, 8, 4), BwdTile(32, 64, 64, 64, 8, 3)),
    "ieee": (BwdTile(16, 64, 64, 32, 4, 2), BwdTile(32, 64, 64, 64, 8, 2), BwdTile(32, 32, 32, 64, 4, 2)),
}
# Two-launch candidates: each table's first dH tile with a dW2 launch of its own. The dW2-only
# kernel at these tiles takes 116-190 registers at sm_90 with no spills on Triton 3.6 and 3.9
# (unit inner strides, as the launches have them), 2-4 blocks per SM, against the one-launch
# kernel's one at the large tiles. The strip ones (dw_strips) 71-184, no spills on either;
# under FMA products a 64-wide strip tile spilled 36 B at P tile 32, hence 32. Since G's tiles are
# copied asynchronously (``_kv_tile_pointers``), the FMA dW2 tile takes 3 stages (2 spilled 8 B).
# The 16-bit table's last two compute dH transposed (dh_w2_lhs, see ``_bwd_dh_program``): the sixth
# H200 run's Nsight Compute found the dH launch 573 of the bf16 autocast backward's 787 us at
# Llama-3-8B size, L1-bound (78%) at 10% of DRAM bandwidth, W2's tile rounded to bf16 and stored
# back to shared memory for the tensor cores every iteration, and its G tile loaded synchronously.
# Untimed: the tuner decides.
BWD_TWO_LAUNCH_TILES = {
    "tensor": (BwdTile(64, 64, 64, 64, 8, 4, 4, 2), BwdTile(64, 64, 128, 64, 8, 4, 8, 2),
               BwdTile(64, 64, 64, 64, 8, 4, 4, 3, True), BwdTile(64, 64, 128, 64, 8, 4, 8, 3, True),
               BwdTile(64, 64, 64, 64, 4, 4, 4, 3, True, True), BwdTile(64, 128, 64, 64, 8, 4, 4, 3, True, True)),
    "tf32x3": (BwdTile(32, 128, 64, 64, 8, 4, 4, 2), BwdTile(32, 128, 64, 64, 8, 4, 4, 3, True)),
    "ieee": (BwdTile(16, 64, 64, 64, 4, 2, 4, 3), BwdTile(16, 64, 32, 64, 4, 2, 4, 3, True)),
}
# W2 elements from which the two-launch candidates are timed: below it the problem is small
# enough that the extra launch's host time outweighs what it saves (Qwen2.5-0.5B's W2 has 0.8M
# elements, bloomz-560m's 50M, Llama-3-8B's 67M).
BWD_TWO_LAUNCH_MIN_W2 = 1 << 22
BWD_MAX_BLOCK_P = {"tensor": 64, "tf32x3": 64, "ieee": 32}
INTERPRETER_BWD_TILE = BwdTile(16, 16, 16, 16, 4, 1)


class LibraryProducts(NamedTuple):
    """The backward candidate that leaves the two W2-sized products to the GPU's BLAS (``torch.mm``:
    cuBLAS): G laid out as float32 [P, N] rows by ``prefix_kv_copy``, then ``dH = G @ W2`` (one
    partial, no split), ``dW2 = G^T @ H`` and ``db2 = sum_p G``. The tanh epilogue, dE and dW1 stay
    in this file's kernels. Timed beside the fused tiles where W2 is large, float32 and the products
    exact float32 or TF32 (``library_products_offered``): there cuBLAS computes what ``nn.Linear``
    would, and the fastest candidate serves, so the backward is never slower than the same math on
    P rows in PyTorch. (The fourth H200 run's fused backward took 1.07 ms at Llama-3-8B size,
    PyTorch's whole P-row backward about 0.52: the fused tiles that may close that gap are untimed.)
    Deterministic as cuBLAS is (see torch.use_deterministic_algorithms)."""
    library: str = "torch.mm"


LIBRARY_PRODUCTS = LibraryProducts()


def _bwd_table(precision: str) -> str:
    return precision if precision in ("ieee", "tf32x3") else "tensor"


def bwd_block_p(num_rows: int, precision: str) -> int:
    """The backward's P tile: every P row in one tile up to its cap (more rows: the dH programs
    split P across the grid, the dW2 programs loop over it)."""
    if triton_interpret():
        return 16
    return _block_p(num_rows, BWD_MAX_BLOCK_P[_bwd_table(precision)])


def bwd_dw_block_p(block_p: int) -> int:
    """The dW2 programs' step over P (their GEMM's reduction): at most 32 rows of G and H at a time,
    so their operands leave registers for the [DW_BLOCK_N, DW_BLOCK_K] accumulator (64 rows spilled
    the largest tiles under fp16)."""
    return min(block_p, 32)


def library_products_offered(precision: str, w2: torch.Tensor, b2: torch.Tensor | None) -> bool:
    """Whether the backward times ``LIBRARY_PRODUCTS`` beside its tiles: on a GPU, W2 of
    ``BWD_TWO_LAUNCH_MIN_W2`` elements or more, float32 (as b2), and products cuBLAS computes as the
    kernels would (exact float32 or TF32, PyTorch's setting). 16-bit products would need a 16-bit
    copy of W2 first."""
    return (w2.device.type == "cuda" and precision in ("ieee", "tf32x3", "tf32") and w2.dtype == torch.float32
            and (b2 is None or b2.dtype == torch.float32) and w2.numel() >= BWD_TWO_LAUNCH_MIN_W2)


def bwd_candidates(num_rows: int, precision: str, w2_elements: int = 0,
                   library: bool = False) -> list[BwdTile | LibraryProducts]:
    """The backward tiles worth timing for P = ``num_rows`` under ``precision``, the two-launch
    ones too where W2 has ``BWD_TWO_LAUNCH_MIN_W2`` elements or more, and ``LIBRARY_PRODUCTS``
    last where ``library`` (``library_products_offered``)."""
    if triton_interpret():
        return [INTERPRETER_BWD_TILE]
    return _bwd_tiles(num_rows, precision, w2_elements) + ([LIBRARY_PRODUCTS] if library else [])


def _bwd_tiles(num_rows: int, precision: str, w2_elements: int) -> list[BwdTile]:
    name = _bwd_table(precision)
    block_p = bwd_block_p(num_rows, precision)
    two_launch = BWD_TWO_LAUNCH_TILES[name] if w2_elements >= BWD_TWO_LAUNCH_MIN_W2 else ()
    table = BWD_TILES[name] + tuple(t for t in two_launch if not t.dw_strips or num_rows <= block_p)
    # The operands are staged as loaded (float32 W2 and H, G in its dtype: at most 4 bytes each),
    # counted as float32 elements.
    kept = [t for t in table
            if _fits_smem(t.num_stages, block_p * t.dh_block_n + t.dh_block_n * t.dh_block_k)
            and _dw_fits_smem(t, block_p)]
    return kept or [min(table, key=lambda t: t.dh_block_n * t.dh_block_k + t.dw_block_n * t.dw_block_k)]


def _dw_fits_smem(tile: BwdTile, block_p: int) -> bool:
    """Whether the dW2 programs' pipeline fits: G and H tiles over their P step per stage, or, for a
    strip program, G over every P row per stage and H's chunk once."""
    stages = tile.dw_num_stages or tile.num_stages
    if tile.dw_strips:
        return _fits_smem(stages, tile.dw_block_n * block_p, block_p * tile.dw_block_k)
    dw_block_p = bwd_dw_block_p(block_p)
    return _fits_smem(stages, tile.dw_block_n * dw_block_p + dw_block_p * tile.dw_block_k)


def dw2_strip_tiles(num_tiles: int, device: torch.device) -> int:
    """dW2 tiles per strip program: about four programs per SM, so every SM holds a few and the
    tiles of each run back to back. (The interpreter, on CPU: three, so strips, a ragged last one
    included, are exercised at its small sizes.)"""
    if device.type != "cuda":
        return 3
    return max(1, cdiv(num_tiles, 4 * num_sms(device_index(device))))


def hidden_block_k(hidden_size: int, device: torch.device) -> int:
    """``prefix_mlp_bwd_hidden_kernel``'s hidden chunk: 64 columns, narrower (down to 16, 64-byte
    float32 rows) while that leaves fewer programs than SMs. The sixth H200 run's Nsight Compute
    found it at 16 programs for Llama-3-8B's 1024 columns, 33 us at 0.05 warps issued per cycle.
    A program's sums are in the same order at any width: the same results."""
    sms = num_sms(device_index(device)) if device.type == "cuda" else 16
    block_k = 64
    while block_k > 16 and cdiv(hidden_size, block_k) < sms:
        block_k //= 2
    return block_k


def head_dim_tile(head_dim: int) -> int:
    """The largest power of two dividing ``head_dim``, at most 256: a column tile of at most that
    width, starting on a multiple of its width, lies in one head's channels (``_kv_tile_pointers``)."""
    return min(head_dim & -head_dim, 256)


def _bwd_split_align() -> int:
    """Splits of N start on a multiple of every candidate DH_BLOCK_N, so no config gets ragged tiles."""
    if triton_interpret():
        return INTERPRETER_BWD_TILE.dh_block_n
    tables = (*BWD_TILES.values(), *BWD_TWO_LAUNCH_TILES.values())
    return max(tile.dh_block_n for table in tables for tile in table)


@triton.jit
def _bwd_dh_program(
    i, g_ptr, w2_ptr, dh_part_ptr,
    P, N, HID, Hkv, D, N_PER_SPLIT,
    stride_gl, stride_gt, stride_gg, stride_gp, stride_gd,
    stride_w2n, stride_w2k,
    stride_part_s, stride_part_p, stride_part_k,
    PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    D_TILE: tl.constexpr, W2_LHS: tl.constexpr,
):
    """Partial dH of one (P tile, hidden chunk, N split): ``G[rows, split] @ W2[split, chunk]``,
    float32, stored once. P tiles vary fastest, so the programs that read one W2 range together
    run together (L2 serves the repeats when P spans several tiles). W2 and dH tiles are addressed
    as a 64-bit scalar base plus 32-bit offsets (a tile spans far less than 2**31 elements):
    64-bit offsets per element cost the registers that made larger tiles spill. G's tiles are
    addressed by ``_kv_tile_pointers`` (any strides of the [L, 2, Hkv, P, D] gradient).

    ``W2_LHS``: computed transposed, ``dH^T = W2^T @ G^T``, so that W2 is the product's left
    operand. On Hopper that operand may stay in registers: W2's tile goes from shared memory to
    registers and is rounded there (16-bit products of a float32 W2). As the right operand it is
    rounded and written back to shared memory for the tensor cores first."""
    num_p = tl.cdiv(P, BLOCK_P)
    num_k = tl.cdiv(HID, BLOCK_K)
    pid_p = i % num_p
    pid_k = (i // num_p) % num_k
    pid_s = i // (num_p * num_k)
    row0 = pid_p * BLOCK_P
    k0 = pid_k * BLOCK_K
    rows = tl.arange(0, BLOCK_P)
    ks = tl.arange(0, BLOCK_K)
    mask_p = rows < P - row0
    mask_k = ks < HID - k0
    n_start = pid_s * N_PER_SPLIT
    n_end = tl.minimum(n_start + N_PER_SPLIT, N)
    g_rows = g_ptr + row0 * stride_gp
    w2_tile = w2_ptr + k0 * stride_w2k + (tl.arange(0, BLOCK_N)[:, None] * stride_w2n + ks[None, :] * stride_w2k)
    if W2_LHS:
        acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        mask_n = _tile_columns_mask(n0 + tl.arange(0, BLOCK_N), n_end, BLOCK_N, D_TILE)
        grad = tl.load(_kv_tile_pointers(g_rows, rows, stride_gp, n0, BLOCK_N, Hkv, D, stride_gl, stride_gt, stride_gg,
                                         stride_gd, D_TILE),
                       mask=mask_p[:, None] & mask_n[None, :], other=0.0)
        w2 = tl.load(w2_tile + n0 * stride_w2n, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if W2_LHS:
            acc = _mma(tl.trans(w2), tl.trans(grad), acc, PRECISION)
        else:
            acc = _mma(grad, w2, acc, PRECISION)
    part = dh_part_ptr + pid_s * stride_part_s + row0 * stride_part_p + k0 * stride_part_k
    if W2_LHS:
        tl.store(part + (ks[:, None] * stride_part_k + rows[None, :] * stride_part_p), acc,
                 mask=mask_k[:, None] & mask_p[None, :])
    else:
        tl.store(part + (rows[:, None] * stride_part_p + ks[None, :] * stride_part_k), acc,
                 mask=mask_p[:, None] & mask_k[None, :])


@triton.jit
def _bwd_dw2_program(
    j, g_ptr, h_ptr, dw2_ptr, db2_ptr,
    P, N, HID, Hkv, D,
    stride_gl, stride_gt, stride_gg, stride_gp, stride_gd,
    stride_hp, stride_hk,
    stride_dw2n, stride_dw2k,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_TILE: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_K] tile of ``dW2 = G^T @ H`` over every P row, and with the first
    hidden chunk ``db2 = sum_p G``. Hidden chunks vary fastest: the programs that read one G tile
    run together. H and dW2 addressed as W2 is in ``_bwd_dh_program``, G likewise."""
    num_k = tl.cdiv(HID, BLOCK_K)
    pid_k = j % num_k
    pid_n = j // num_k
    n0 = pid_n * BLOCK_N
    k0 = pid_k * BLOCK_K
    cols = n0 + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    mask_n = _tile_columns_mask(cols, N, BLOCK_N, D_TILE)
    mask_k = ks < HID - k0
    h_cols = h_ptr + k0 * stride_hk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = tl.arange(0, BLOCK_P)
        mask_p = rows < P - p0
        grad = tl.load(_kv_tile_pointers(g_ptr + p0 * stride_gp, rows, stride_gp, n0, BLOCK_N, Hkv, D, stride_gl,
                                         stride_gt, stride_gg, stride_gd, D_TILE),
                       mask=mask_p[:, None] & mask_n[None, :], other=0.0)
        hidden = tl.load(h_cols + p0 * stride_hp + (rows[:, None] * stride_hp + ks[None, :] * stride_hk),
                         mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        acc = _mma(tl.trans(grad), hidden, acc, PRECISION)
        if HAS_BIAS:
            db2 += tl.sum(grad.to(tl.float32), axis=0)
    dw2_tile = dw2_ptr + n0 * stride_dw2n + k0 * stride_dw2k
    tl.store(dw2_tile + (tl.arange(0, BLOCK_N)[:, None] * stride_dw2n + ks[None, :] * stride_dw2k),
             acc.to(dw2_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(db2_ptr + cols, db2.to(db2_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _bwd_dw2_strip_program(
    j, g_ptr, h_ptr, dw2_ptr, db2_ptr,
    P, N, HID, Hkv, D, TILES_PER_PROGRAM,
    stride_gl, stride_gt, stride_gg, stride_gp, stride_gd,
    stride_hp, stride_hk,
    stride_dw2n, stride_dw2k,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_TILE: tl.constexpr,
):
    """``TILES_PER_PROGRAM`` consecutive [BLOCK_N, BLOCK_K] tiles of ``dW2 = G^T @ H`` along N, one
    hidden chunk (and db2 with the first chunk); BLOCK_P covers every P row. H's chunk is loaded
    once, then one loop walks the tiles: each a single product over P and a store, the next tile's
    G load issued ahead by the software pipeline (num_stages) while this one's product and store
    run. ``_bwd_dw2_program`` gives each tile a program of its own instead: 8192 short programs at
    Llama-3-8B size, each loading, multiplying over 64 rows and storing with nothing to overlap."""
    num_k = tl.cdiv(HID, BLOCK_K)
    pid_k = j % num_k
    pid_s = j // num_k
    k0 = pid_k * BLOCK_K
    rows = tl.arange(0, BLOCK_P)
    ks = tl.arange(0, BLOCK_K)
    mask_p = rows < P
    mask_k = ks < HID - k0
    hidden = tl.load(h_ptr + k0 * stride_hk + (rows[:, None] * stride_hp + ks[None, :] * stride_hk),
                     mask=mask_p[:, None] & mask_k[None, :], other=0.0)
    n_first = pid_s * TILES_PER_PROGRAM * BLOCK_N
    n_end = tl.minimum(n_first + TILES_PER_PROGRAM * BLOCK_N, N)
    dw2_tile = dw2_ptr + k0 * stride_dw2k + (tl.arange(0, BLOCK_N)[:, None] * stride_dw2n + ks[None, :] * stride_dw2k)
    for n0 in range(n_first, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask_n = _tile_columns_mask(cols, n_end, BLOCK_N, D_TILE)
        grad = tl.load(_kv_tile_pointers(g_ptr, rows, stride_gp, n0, BLOCK_N, Hkv, D, stride_gl, stride_gt, stride_gg,
                                         stride_gd, D_TILE),
                       mask=mask_p[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(tl.trans(grad), hidden, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), PRECISION)
        tl.store(dw2_tile + n0 * stride_dw2n, acc.to(dw2_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_k[None, :])
        if HAS_BIAS:
            if pid_k == 0:
                tl.store(db2_ptr + cols, tl.sum(grad.to(tl.float32), axis=0).to(db2_ptr.dtype.element_ty),
                         mask=mask_n)


@triton.jit
def prefix_mlp_bwd_kernel(
    g_ptr, h_ptr, w2_ptr, dw2_ptr, db2_ptr, dh_part_ptr,
    P, N, HID, Hkv, D, N_PER_SPLIT, NUM_DH_PROGRAMS, DW_TILES_PER_PROGRAM,
    stride_gl, stride_gt, stride_gg, stride_gp, stride_gd,
    stride_hp, stride_hk,
    stride_w2n, stride_w2k,
    stride_dw2n, stride_dw2k,
    stride_part_s, stride_part_p, stride_part_k,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ROLES: tl.constexpr,
    DH_BLOCK_P: tl.constexpr, DH_BLOCK_N: tl.constexpr, DH_BLOCK_K: tl.constexpr,
    DW_BLOCK_P: tl.constexpr, DW_BLOCK_N: tl.constexpr, DW_BLOCK_K: tl.constexpr, D_TILE: tl.constexpr,
    DH_W2_LHS: tl.constexpr,
):
    """``ROLES="both"``: programs [0, NUM_DH_PROGRAMS) compute the split-N partials of dH
    (``_bwd_dh_program``), the rest dW2 and db2 (``_bwd_dw2_program``). ``"dh"`` / ``"dw2"``: every
    program takes that one role, so the compiled kernel holds only its registers and shared
    memory (the launcher's two-launch configs); ``"dw2_strip"``: the dW2 role by strips of
    ``DW_TILES_PER_PROGRAM`` tiles (``_bwd_dw2_strip_program``, DW_BLOCK_P covering P). Every
    output element has one writer: no atomics, and the result does not depend on scheduling."""
    pid = tl.program_id(0).to(tl.int64)
    if ROLES == "dh":
        _bwd_dh_program(pid, g_ptr, w2_ptr, dh_part_ptr, P, N, HID, Hkv, D, N_PER_SPLIT,
                        stride_gl, stride_gt, stride_gg, stride_gp, stride_gd, stride_w2n, stride_w2k,
                        stride_part_s, stride_part_p, stride_part_k,
                        PRECISION, DH_BLOCK_P, DH_BLOCK_N, DH_BLOCK_K, D_TILE,
                        DH_W2_LHS)
    elif ROLES == "dw2":
        _bwd_dw2_program(pid, g_ptr, h_ptr, dw2_ptr, db2_ptr, P, N, HID, Hkv, D,
                         stride_gl, stride_gt, stride_gg, stride_gp, stride_gd, stride_hp, stride_hk,
                         stride_dw2n, stride_dw2k, HAS_BIAS, PRECISION, DW_BLOCK_P, DW_BLOCK_N, DW_BLOCK_K,
                         D_TILE)
    elif ROLES == "dw2_strip":
        _bwd_dw2_strip_program(pid, g_ptr, h_ptr, dw2_ptr, db2_ptr, P, N, HID, Hkv, D, DW_TILES_PER_PROGRAM,
                               stride_gl, stride_gt, stride_gg, stride_gp, stride_gd, stride_hp, stride_hk,
                               stride_dw2n, stride_dw2k, HAS_BIAS, PRECISION, DW_BLOCK_P, DW_BLOCK_N, DW_BLOCK_K,
                               D_TILE)
    elif pid < NUM_DH_PROGRAMS:
        _bwd_dh_program(pid, g_ptr, w2_ptr, dh_part_ptr, P, N, HID, Hkv, D, N_PER_SPLIT,
                        stride_gl, stride_gt, stride_gg, stride_gp, stride_gd, stride_w2n, stride_w2k,
                        stride_part_s, stride_part_p, stride_part_k,
                        PRECISION, DH_BLOCK_P, DH_BLOCK_N, DH_BLOCK_K, D_TILE,
                        DH_W2_LHS)
    else:
        _bwd_dw2_program(pid - NUM_DH_PROGRAMS, g_ptr, h_ptr, dw2_ptr, db2_ptr, P, N, HID, Hkv, D,
                         stride_gl, stride_gt, stride_gg, stride_gp, stride_gd, stride_hp, stride_hk,
                         stride_dw2n, stride_dw2k, HAS_BIAS, PRECISION, DW_BLOCK_P, DW_BLOCK_N, DW_BLOCK_K,
                         D_TILE)


@triton.jit
def prefix_mlp_bwd_hidden_kernel(
    dh_part_ptr, h_ptr, dz_ptr, db1_ptr,
    P, HID, NUM_SPLITS,
    stride_part_s, stride_part_p, stride_part_k,
    stride_hp, stride_hk, stride_dzp, stride_dzk,
    HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dZ = (sum over splits of the dH partials) * (1 - H^2); db1 = sum over P of dZ.

    One program per hidden chunk covers every P row, so db1 is summed in a fixed order.
    """
    pid_k = tl.program_id(0).to(tl.int64)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = ks < HID
    db1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask_p = rows < P
        dz = _dz_tile(dh_part_ptr, h_ptr, rows, ks, mask_p, mask_k, NUM_SPLITS, stride_part_s, stride_part_p,
                      stride_part_k, stride_hp, stride_hk)
        tl.store(dz_ptr + rows[:, None] * stride_dzp + ks[None, :] * stride_dzk, dz,
                 mask=mask_p[:, None] & mask_k[None, :])
        db1 += tl.sum(dz, axis=0)
    if HAS_BIAS:
        tl.store(db1_ptr + ks, db1.to(db1_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _dz_tile(dh_part_ptr, h_ptr, rows, ks, mask_p, mask_k, NUM_SPLITS, stride_part_s, stride_part_p, stride_part_k,
             stride_hp, stride_hk):
    """dZ[rows, ks] = (the dH partials summed over splits, in split order) * (1 - H^2), float32."""
    mask = mask_p[:, None] & mask_k[None, :]
    offsets = rows[:, None] * stride_part_p + ks[None, :] * stride_part_k
    dh = tl.zeros((rows.shape[0], ks.shape[0]), dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        dh += tl.load(dh_part_ptr + s * stride_part_s + offsets, mask=mask, other=0.0)
    hidden = tl.load(h_ptr + rows[:, None] * stride_hp + ks[None, :] * stride_hk, mask=mask, other=0.0)
    return dh * (1.0 - hidden * hidden)


@triton.jit
def prefix_mlp_bwd_first_kernel(
    dh_part_ptr, h_ptr, e_ptr, w1_ptr, de_ptr, dw1_ptr, db1_ptr,
    P, HID, TOKEN_DIM, NUM_SPLITS,
    stride_part_s, stride_part_p, stride_part_k, stride_hp, stride_hk,
    stride_ep, stride_ed, stride_w1k, stride_w1d,
    stride_dep, stride_ded, stride_dw1k, stride_dw1d,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """A small MLP's backward of its first Linear and tanh in one launch (``small_mlp``), where
    ``prefix_mlp_bwd_hidden_kernel`` and ``prefix_mlp_matmul_pair_kernel`` take two: every tile
    computes the dZ it reads from the dH partials (``_dz_tile``, the hidden kernel's arithmetic).
    A 1-D grid: dE = dZ @ W1 tiles first ([P, d], over h), then dW1 = dZ^T @ E tiles ([h, d], over
    P), whose first column of tiles also sums db1 = sum_p dZ."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(TOKEN_DIM, BLOCK_N)
    tiles_de = tl.cdiv(P, BLOCK_M) * tiles_n
    is_de = pid < tiles_de
    tile = tl.where(is_de, pid, pid - tiles_de)
    pid_m = (tile // tiles_n).to(tl.int64)
    cols = (tile % tiles_n).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_d = cols < TOKEN_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if is_de:
        mask_p = offs_m < P
        for k0 in range(0, HID, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask_k = ks < HID
            dz = _dz_tile(dh_part_ptr, h_ptr, offs_m, ks, mask_p, mask_k, NUM_SPLITS, stride_part_s,
                          stride_part_p, stride_part_k, stride_hp, stride_hk)
            w1 = tl.load(w1_ptr + ks[:, None] * stride_w1k + cols[None, :] * stride_w1d,
                         mask=mask_k[:, None] & mask_d[None, :], other=0.0)
            acc = _mma(dz, w1, acc, PRECISION)
        tl.store(de_ptr + offs_m[:, None] * stride_dep + cols[None, :] * stride_ded,
                 acc.to(de_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_d[None, :])
    else:
        mask_k = offs_m < HID           # this tile's rows are hidden units
        db1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_K):
            rows = p0 + tl.arange(0, BLOCK_K)
            mask_p = rows < P
            dz = _dz_tile(dh_part_ptr, h_ptr, rows, offs_m, mask_p, mask_k, NUM_SPLITS, stride_part_s,
                          stride_part_p, stride_part_k, stride_hp, stride_hk)
            e = tl.load(e_ptr + rows[:, None] * stride_ep + cols[None, :] * stride_ed,
                        mask=mask_p[:, None] & mask_d[None, :], other=0.0)
            acc = _mma(tl.trans(dz), e, acc, PRECISION)
            if HAS_BIAS:
                db1 += tl.sum(dz, axis=0)
        tl.store(dw1_ptr + offs_m[:, None] * stride_dw1k + cols[None, :] * stride_dw1d,
                 acc.to(dw1_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_d[None, :])
        if HAS_BIAS:
            if tile % tiles_n == 0:
                tl.store(db1_ptr + offs_m, db1.to(db1_ptr.dtype.element_ty), mask=mask_k)


# --------------------------------------------------------------------------------------------
# [P, N] rows <-> [L, 2, Hkv, P, D] with dropout: P-Tuning v2 forward/backward, dropout's dG
# --------------------------------------------------------------------------------------------

@triton.jit
def prefix_kv_copy_kernel(
    src_ptr, dst_ptr, seed_ptr,
    P, N, Hkv, D, dropout_p,
    src_l, src_t, src_g, src_p, src_d,
    dst_l, dst_t, dst_g, dst_p, dst_d,
    HAS_DROPOUT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dst[p, c] = dropout(src[p, c])`` over the logical [P, N] matrix; both sides are addressed
    as [L, 2, Hkv, P, D] strides (a plain [P, N] matrix is one too: stride_l = 2*Hkv*D*stride_n, ...)."""
    pid_p = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < P)[:, None] & (cols < N)[None, :]
    src_offsets = rows[:, None] * src_p + _kv_column_offsets(cols, Hkv, D, src_l, src_t, src_g, src_d)[None, :]
    x = tl.load(src_ptr + src_offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        x = _dropout(x, seed_ptr, rows, cols, N, dropout_p)
    dst_offsets = rows[:, None] * dst_p + _kv_column_offsets(cols, Hkv, D, dst_l, dst_t, dst_g, dst_d)[None, :]
    tl.store(dst_ptr + dst_offsets, x.to(dst_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _block_p(num_rows: int, cap: int) -> int:
    # tl.dot needs every block dimension >= 16.
    return min(max(16, next_power_of_2(num_rows)), cap)


def _rows_as_kv_strides(rows: torch.Tensor, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """Strides (l, t, g, p, d) that address a [P, N] matrix as its [L, 2, Hkv, P, D] view."""
    stride_p, stride_n = rows.stride()
    return (2 * num_kv_heads * head_dim * stride_n, num_kv_heads * head_dim * stride_n, head_dim * stride_n,
            stride_p, stride_n)


@functools.lru_cache(maxsize=None)
def _has_tf32_tensor_cores(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 8


def products(compute_dtype: torch.dtype, device: torch.device | None = None) -> str:
    """The kernels' ``PRECISION`` for products in ``compute_dtype`` on ``device`` (see the module
    docstring): float32 follows PyTorch's float32 matmul precision, like ``nn.Linear``; its exact
    products are "tf32x3" under ``TF32X3`` where the GPU has TF32 tensor cores."""
    if compute_dtype == torch.bfloat16:
        return "bf16"
    if compute_dtype == torch.float16:
        return "fp16"
    precision = input_precision(torch.float32)
    if precision != "ieee" or not TF32X3:
        return precision
    if device is not None and device.type == "cuda" and not _has_tf32_tensor_cores(device_index(device)):
        return "ieee"       # before sm_80 there is no TF32 to split into
    return "tf32x3"


def _matmul_plan(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, tensors, precision: str, has_bias: bool,
                 apply_tanh: bool) -> LaunchPlan:
    """The launch of ``c = act(a @ b + bias)`` for strided 2-d a [M, K], b [K, N], c [M, N], on
    ``tensors`` = (a, b, bias, c) as launched (an operand may be given as the tensor it views: a
    launch reads its address, the strides come from the view), its tile tuned on them."""
    m, k = a.shape
    n = b.shape[1]

    def plan_for(config):
        block_m, block_n, block_k, warps, stages = config
        return LaunchPlan(
            prefix_mlp_matmul_kernel, (cdiv(m, block_m), cdiv(n, block_n)),
            (m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1)),
            dict(HAS_BIAS=has_bias, APPLY_TANH=apply_tanh, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_K=block_k, num_warps=warps, num_stages=stages),
            key, config)

    key = ("mlp-matmul", a.device, m, n, k, has_bias, apply_tanh, precision, a.dtype, b.dtype, c.dtype)
    config = pick_config(key, lambda: matmul_candidates(m),
                         lambda config: plan_for(config).launch(tensors, launch_kernel))
    return plan_for(config)


def _matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, precision: str, bias: torch.Tensor | None = None,
            apply_tanh: bool = False) -> torch.Tensor:
    """``c = act(a @ b + bias)`` for strided 2-d a [M, K], b [K, N], c [M, N], launched now."""
    tensors = (a, b, bias, c)
    _matmul_plan(a, b, c, tensors, precision, bias is not None, apply_tanh).launch(tensors, launch_kernel)
    return c


def _matmul_pair_plan(a1: torch.Tensor, b1: torch.Tensor, c1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
                      c2: torch.Tensor, tensors, precision: str) -> LaunchPlan:
    """The launch of ``c1 = a1 @ b1`` and ``c2 = a2 @ b2`` (strided 2-d operands) on ``tensors`` =
    (a1, b1, c1, a2, b2, c2) as launched (see ``_matmul_plan``), one tile config for both (capped
    by the taller product, as ``matmul_candidates`` caps one), tuned on them."""
    (m1, k1), n1 = a1.shape, b1.shape[1]
    (m2, k2), n2 = a2.shape, b2.shape[1]

    def plan_for(config):
        block_m, block_n, block_k, warps, stages = config
        tiles = cdiv(m1, block_m) * cdiv(n1, block_n) + cdiv(m2, block_m) * cdiv(n2, block_n)
        return LaunchPlan(
            prefix_mlp_matmul_pair_kernel, (tiles,),
            (m1, n1, k1, m2, n2, k2,
             a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1), c1.stride(0), c1.stride(1),
             a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1), c2.stride(0), c2.stride(1)),
            dict(PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                 num_stages=stages),
            key, config)

    key = ("mlp-matmul-pair", a1.device, m1, n1, k1, m2, n2, k2, precision, a1.dtype, b1.dtype, c1.dtype, a2.dtype,
           b2.dtype, c2.dtype)
    config = pick_config(key, lambda: matmul_candidates(max(m1, m2), MATMUL_PAIR_TILES),
                         lambda config: plan_for(config).launch(tensors, launch_kernel))
    return plan_for(config)


def _matmul_pair(a1: torch.Tensor, b1: torch.Tensor, c1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
                 c2: torch.Tensor, precision: str) -> None:
    """``c1 = a1 @ b1`` and ``c2 = a2 @ b2`` in one launch, launched now."""
    tensors = (a1, b1, c1, a2, b2, c2)
    _matmul_pair_plan(a1, b1, c1, a2, b2, c2, tensors, precision).launch(tensors, launch_kernel)


_COPY_PLANS = plan_table()


def prefix_kv_copy(src: torch.Tensor, src_strides, dst: torch.Tensor, dst_strides, *, num_rows: int,
                   num_cols: int, num_kv_heads: int, head_dim: int, dropout_p: float,
                   seed: torch.Tensor | None) -> torch.Tensor:
    """Copy the logical [P, N] matrix from ``src`` to ``dst`` (each addressed by (l, t, g, p, d)
    strides), applying dropout when ``dropout_p > 0`` and casting to dst's dtype."""
    tensors = (src, dst, seed)
    key = (tensor_layouts(tensors), tuple(src_strides), tuple(dst_strides), num_rows, num_cols, num_kv_heads, head_dim,
           dropout_p)
    plan = kept_plan(_COPY_PLANS, key)
    if plan is None:
        block_p, block_n = 16, 128
        plan = LaunchPlan(
            prefix_kv_copy_kernel, (cdiv(num_rows, block_p), cdiv(num_cols, block_n)),
            (num_rows, num_cols, num_kv_heads, head_dim, float(dropout_p), *src_strides, *dst_strides),
            dict(HAS_DROPOUT=dropout_p > 0.0, BLOCK_P=block_p, BLOCK_N=block_n))
        keep_plan(_COPY_PLANS, key, plan)
    plan.launch(tensors, launch_kernel)
    return dst


# The one-launch forward (FUSE_HIDDEN): every forward program recomputes the H chunks it reads,
# P x h x d multiply-adds each, and reads all of W1 (from L2), so it serves small MLPs only: W1 of
# at most FUSED_MAX_W1 elements (Qwen2.5-0.5B's 128 x 128 is 16K; bloomz-560m's 1024 x 1024 is
# not), W2 below BWD_TWO_LAUNCH_MIN_W2, P within one forward P tile. There the forward is
# host-bound (the fourth H200 run: 0.145 ms for Qwen2.5-0.5B's, the device busy 9 us of it), and a
# launch is most of what it costs: the first GEMM's launch goes. Under FMA products ("ieee") the
# first tile, holding H's chunk beside the output tile, spilled 40 B at P tile 64 on Triton 3.9 and
# 296 B at 32 on 3.6 (sm_90, tests/tools/kernel_resources.py --kernels mlp): there P stops at 16.
FUSED_MAX_W1 = 1 << 16
FUSED_BLOCK_D = 32


def fused_max_rows(precision: str) -> int:
    """The largest P the one-launch forward takes under ``precision``."""
    return 16 if precision == "ieee" else MAX_BLOCK_P_FWD


def small_mlp(num_rows: int, token_dim: int, hidden_size: int, num_cols: int, precision: str) -> bool:
    """Whether the MLP is small (see FUSED_MAX_W1): its forward computes H inside its one launch,
    its backward of the first Linear is one launch too (``prefix_mlp_bwd_first_kernel``) and
    splits N into at most ``SMALL_MLP_MAX_SPLITS`` dH partials."""
    return (hidden_size * token_dim <= FUSED_MAX_W1 and num_cols * hidden_size < BWD_TWO_LAUNCH_MIN_W2
            and num_rows <= fused_max_rows(precision))


# Launch plans of the forward and backward (``PlannedCall``), by the layouts of their tensors and
# the options: a training step calls each once with the same layouts, and the launchers' host work
# (tile lookups, strides, grids, Triton's argument binding) is then done once, not every step.
_FWD_PLANS = plan_table()
_BWD_PLANS = plan_table()


def prefix_mlp_forward(embedding: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                       b2: torch.Tensor | None, *, num_layers: int, num_kv_heads: int, head_dim: int,
                       out_dtype: torch.dtype, compute_dtype: torch.dtype, dropout_p: float,
                       seed: torch.Tensor | None):
    """``(out [L, 2, Hkv, P, D] in out_dtype, hidden [P, h] float32)`` with products in
    ``compute_dtype`` (``products``); arguments already checked."""
    # The kernels read the biases at unit stride: a strided one (a view, rare: PEFT's are parameters
    # of their own) is copied, where the matrices' strides go to the kernels instead. (Strided ones
    # were read as if contiguous until 2026-11-28.)
    b1, b2 = (None if b is None else b.contiguous() for b in (b1, b2))
    num_rows, token_dim = embedding.shape
    hidden_size, num_cols = w1.shape[0], w2.shape[0]
    device = embedding.device
    precision = products(compute_dtype, device)
    fused = small_mlp(num_rows, token_dim, hidden_size, num_cols, precision)
    hidden = torch.empty(num_rows, hidden_size, device=device, dtype=torch.float32)
    out = torch.empty(num_layers, 2, num_kv_heads, num_rows, head_dim, device=device, dtype=out_dtype)
    call = PlannedCall(_FWD_PLANS, (tensor_layouts((embedding, w1, b1, w2, b2, seed)), device, num_layers,
                                    num_kv_heads, head_dim, out_dtype, precision, dropout_p, fused))
    if not fused:
        # (w1 stands for its transpose: the plan holds the strides of w1.t())
        first = (embedding, w1, b1, hidden)
        call.launch(lambda: _matmul_plan(embedding, w1.t(), hidden, first, precision, b1 is not None, True), first,
                    launch_kernel)
    tensors = (hidden, w2, b2, out, seed, *((embedding, w1, b1) if fused else (None, None, None)))
    call.launch(lambda: _forward_plan(tensors, token_dim, num_kv_heads, head_dim, precision, fused, dropout_p),
                tensors, launch_kernel)
    call.finish()
    return out, hidden


def _forward_plan(tensors, token_dim: int, num_kv_heads: int, head_dim: int, precision: str, fused: bool,
                  dropout_p: float) -> LaunchPlan:
    """``prefix_mlp_fwd_kernel``'s launch on ``tensors`` (``prefix_mlp_forward``'s: H, W2, b2, the
    output, the seed, and E, W1, b1 where it computes H itself), its tile tuned on them."""
    hidden, w2, b2, out, seed, embedding, w1, b1 = tensors
    num_rows, hidden_size = hidden.shape
    num_cols = w2.shape[0]
    first_strides = (*embedding.stride(), *w1.stride()) if fused else (0, 0, 0, 0)

    def plan_for(config):
        block_p, block_n, block_k, warps, stages, w2_lhs = config
        return LaunchPlan(
            prefix_mlp_fwd_kernel, (cdiv(num_rows, block_p), cdiv(num_cols, block_n)),
            (num_rows, num_cols, hidden_size, num_kv_heads, head_dim, float(dropout_p), token_dim,
             hidden.stride(0), hidden.stride(1), w2.stride(0), w2.stride(1), *out.stride(), *first_strides),
            dict(HAS_BIAS=b2 is not None, HAS_DROPOUT=dropout_p > 0.0, PRECISION=precision,
                 BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_K=block_k,
                 FUSE_HIDDEN=fused, HAS_B1=fused and b1 is not None, BLOCK_D=FUSED_BLOCK_D if fused else 16,
                 W2_LHS=w2_lhs, num_warps=warps, num_stages=stages),
            key, config)

    key = ("mlp-fwd-fused" if fused else "mlp-fwd", hidden.device, num_rows, num_cols, hidden_size, b2 is not None,
           dropout_p > 0.0, precision, w2.dtype, out.dtype)
    # The one-launch forward serves host-bound sizes, where tuning gains nothing: its first tile,
    # the one kernel_resources.py holds to no spills with H's chunk beside the output's.
    config = pick_config(key, lambda: fwd_configs(num_rows, num_cols, precision)[:1 if fused else None],
                         lambda config: plan_for(config).launch(tensors, launch_kernel))
    return plan_for(config)


# A small MLP's backward (small_mlp) re-sums its dH partials in every tile of its first Linear's
# backward: few of them. Its W2 (Qwen2.5-0.5B's: 6144 x 128) is then read by 16 programs of a
# 384-column range each, a few microseconds where the step around it is host-bound.
SMALL_MLP_MAX_SPLITS = 8


def _num_splits(num_cols: int, hidden_size: int, device: torch.device, cap: int | None = None) -> tuple[int, int]:
    """How many N ranges the backward splits W2 into (at most ``cap``), and the width of each.

    Enough programs (hidden chunks x splits) to fill the GPU about four times over, no more:
    each split costs one float32 [P, h] partial. Depends only on the sizes and the GPU, so the
    summation order (and the result) is the same on every run.
    """
    align = _bwd_split_align()
    max_splits = cdiv(num_cols, align) if cap is None else min(cap, cdiv(num_cols, align))
    if device.type == "cuda":
        target_programs = 4 * num_sms(device_index(device))
        splits = cdiv(target_programs, cdiv(hidden_size, 64))
    else:
        splits = 3  # interpreter: small, but several splits so the reduction is exercised
    splits = max(1, min(splits, max_splits))
    per_split = cdiv(cdiv(num_cols, splits), align) * align
    return cdiv(num_cols, per_split), per_split


def prefix_mlp_backward(grad_out: torch.Tensor, embedding: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                        w2: torch.Tensor, b2: torch.Tensor | None, hidden: torch.Tensor, *, num_layers: int,
                        num_kv_heads: int, head_dim: int, compute_dtype: torch.dtype, dropout_p: float,
                        seed: torch.Tensor | None):
    """Gradients ``(dE, dW1, db1, dW2, db2)`` (db1/db2 None without biases), each in its parameter's
    dtype, from ``grad_out`` [L, 2, Hkv, P, D] in any strides; products in ``compute_dtype`` as in
    the forward, float32 accumulation and results."""
    num_rows, hidden_size = hidden.shape
    num_cols = w2.shape[0]
    device = embedding.device
    precision = products(compute_dtype, device)
    small = small_mlp(num_rows, embedding.shape[1], hidden_size, num_cols, precision)
    call = PlannedCall(_BWD_PLANS, (tensor_layouts((grad_out, embedding, w1, b1, w2, b2, hidden, seed)), device,
                                    num_kv_heads, head_dim, precision, dropout_p, small))

    grad_rows = None
    if dropout_p > 0.0:
        # Apply the regenerated mask once here rather than once per hidden chunk in the main kernel.
        grad_rows = _gradient_rows(grad_out, num_rows, num_cols, num_kv_heads, head_dim, dropout_p, seed)
        grad, grad_strides = grad_rows, _rows_as_kv_strides(grad_rows, num_kv_heads, head_dim)
    else:
        grad, grad_strides = grad_out, grad_out.stride()

    num_splits, per_split = call.value("splits", lambda: _num_splits(
        num_cols, hidden_size, device, SMALL_MLP_MAX_SPLITS if small else None))
    dh_part = torch.empty(num_splits, num_rows, hidden_size, device=device, dtype=torch.float32)
    dw2 = torch.empty(w2.shape, device=device, dtype=w2.dtype)
    db2 = torch.empty(b2.shape, device=device, dtype=b2.dtype) if b2 is not None else None
    tensors = (grad, hidden, w2, dw2, db2, dh_part)

    def library_rows():
        return grad_rows if grad_rows is not None else _gradient_rows(grad_out, num_rows, num_cols, num_kv_heads,
                                                                      head_dim, 0.0, None)

    launched = call.launch(lambda: _products_plan(tensors, grad_strides, num_kv_heads, head_dim, num_splits,
                                                  per_split, precision, library_rows), tensors, launch_kernel)
    partials = 1 if launched is LIBRARY_PRODUCTS else num_splits

    db1 = torch.empty(b1.shape, device=device, dtype=b1.dtype) if b1 is not None else None
    d_embedding = torch.empty(embedding.shape, device=device, dtype=embedding.dtype)
    dw1 = torch.empty(w1.shape, device=device, dtype=w1.dtype)
    if small:
        first = (dh_part, hidden, embedding, w1, d_embedding, dw1, db1)
        call.launch(lambda: _first_linear_plan(first, partials, precision), first, launch_kernel)
    else:
        dz = torch.empty(num_rows, hidden_size, device=device, dtype=torch.float32)
        tanh_tensors = (dh_part, hidden, dz, db1)
        call.launch(lambda: _hidden_plan(tanh_tensors, partials), tanh_tensors, launch_kernel)
        # dE = dZ @ W1, dW1 = dZ^T @ E (dz stands for its transpose: the plan holds dz.t()'s strides)
        pair = (dz, w1, d_embedding, dz, embedding, dw1)
        call.launch(lambda: _matmul_pair_plan(dz, w1, d_embedding, dz.t(), embedding, dw1, pair, precision), pair,
                    launch_kernel)
    call.finish()
    return d_embedding, dw1, db1, dw2, db2


class _LibraryStep:
    """``LIBRARY_PRODUCTS`` as the backward's products step: ``torch.mm`` calls, not a Triton launch,
    so no plan (``current`` is False: a chain holding it, and so the call's gradient, is not kept).
    ``launch`` returns ``LIBRARY_PRODUCTS``."""

    def __init__(self, rows):
        self.rows = rows            # G as float32 [P, N] rows, made when launched

    def current(self) -> bool:
        return False

    def launch(self, tensors, launch_kernel):
        _grad, hidden, w2, dw2, db2, dh_part = tensors
        _library_products(self.rows(), hidden, w2, dw2, db2, dh_part[0])
        return LIBRARY_PRODUCTS


def _products_plan(tensors, grad_strides, num_kv_heads: int, head_dim: int, num_splits: int, per_split: int,
                   precision: str, library_rows):
    """The backward's W2 products on ``tensors`` (``prefix_mlp_backward``'s: G, H, W2, dW2, db2, the
    dH partials): ``prefix_mlp_bwd_kernel`` in one launch (a ``LaunchPlan``) or two (a
    ``LaunchGroup``), or a ``_LibraryStep``, as the tuner picks on them."""
    grad, hidden, w2, dw2, db2, dh_part = tensors
    num_rows, hidden_size = hidden.shape
    num_cols = w2.shape[0]
    device = hidden.device
    block_p = bwd_block_p(num_rows, precision)

    def plan_for(tile: BwdTile | LibraryProducts):
        if tile is LIBRARY_PRODUCTS:
            return _LibraryStep(library_rows)
        num_dh = cdiv(num_rows, block_p) * cdiv(hidden_size, tile.dh_block_k) * num_splits
        num_dw = cdiv(num_cols, tile.dw_block_n) * cdiv(hidden_size, tile.dw_block_k)

        def roles_plan(roles, num_programs, warps, stages, dw_block_p=bwd_dw_block_p(block_p), tiles_per_program=1):
            return LaunchPlan(
                prefix_mlp_bwd_kernel, (num_programs,),
                (num_rows, num_cols, hidden_size, num_kv_heads, head_dim, per_split, num_dh, tiles_per_program,
                 *grad_strides, hidden.stride(0), hidden.stride(1), w2.stride(0), w2.stride(1),
                 dw2.stride(0), dw2.stride(1), *dh_part.stride()),
                dict(HAS_BIAS=db2 is not None, PRECISION=precision, ROLES=roles,
                     DH_BLOCK_P=block_p, DH_BLOCK_N=tile.dh_block_n, DH_BLOCK_K=tile.dh_block_k,
                     DW_BLOCK_P=dw_block_p, DW_BLOCK_N=tile.dw_block_n, DW_BLOCK_K=tile.dw_block_k,
                     D_TILE=head_dim_tile(head_dim), DH_W2_LHS=tile.dh_w2_lhs, num_warps=warps, num_stages=stages),
                key, tile)

        if not tile.dw_num_warps:
            return roles_plan("both", num_dh + num_dw, tile.num_warps, tile.num_stages)
        dh = roles_plan("dh", num_dh, tile.num_warps, tile.num_stages)
        if tile.dw_strips and num_rows <= block_p:     # (bwd_candidates offers strips only then)
            num_n_tiles, num_k_chunks = cdiv(num_cols, tile.dw_block_n), cdiv(hidden_size, tile.dw_block_k)
            per_program = dw2_strip_tiles(num_n_tiles * num_k_chunks, device)
            dw = roles_plan("dw2_strip", num_k_chunks * cdiv(num_n_tiles, per_program), tile.dw_num_warps,
                            tile.dw_num_stages, dw_block_p=block_p, tiles_per_program=per_program)
        else:
            dw = roles_plan("dw2", num_dw, tile.dw_num_warps, tile.dw_num_stages)
        return LaunchGroup((dh, dw))

    key = ("mlp-bwd", device, num_rows, num_cols, hidden_size, num_splits, db2 is not None, precision, grad.dtype,
           w2.dtype)
    tile = pick_config(key, lambda: bwd_candidates(num_rows, precision, w2.numel(),
                                                   library_products_offered(precision, w2, db2)),
                       lambda tile: plan_for(tile).launch(tensors, launch_kernel))
    return plan_for(tile)


def _hidden_plan(tensors, partials: int) -> LaunchPlan:
    """``prefix_mlp_bwd_hidden_kernel``'s launch on ``tensors`` (the dH partials, H, dZ, db1):
    dZ = (sum of the first ``partials`` dH partials) * (1 - H^2), db1 = sum_p dZ. Untuned."""
    dh_part, hidden, dz, db1 = tensors
    num_rows, hidden_size = hidden.shape
    block_k = hidden_block_k(hidden_size, hidden.device)
    return LaunchPlan(
        prefix_mlp_bwd_hidden_kernel, (cdiv(hidden_size, block_k),),
        (num_rows, hidden_size, partials,
         *dh_part.stride(), hidden.stride(0), hidden.stride(1), dz.stride(0), dz.stride(1)),
        dict(HAS_BIAS=db1 is not None, BLOCK_P=min(next_power_of_2(num_rows), 64), BLOCK_K=block_k))


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of prefix_mlp_bwd_first_kernel: spill-free
# on sm_90 under every product precision on Triton 3.6 and 3.9, where the pair kernel's first tile
# (16, 64, 64, 4, 3) spilled 12-16 B with FMA and TF32 products (the dZ sums beside the operands).
BWD_FIRST_TILE = (32, 64, 64, 4, 3)


def _first_linear_plan(tensors, num_splits: int, precision: str) -> LaunchPlan:
    """``prefix_mlp_bwd_first_kernel``'s launch on ``tensors`` (the dH partials, H, E, W1, dE, dW1,
    db1): dE, dW1 and db1 from the first ``num_splits`` dH partials, at ``BWD_FIRST_TILE``, untuned
    (``small_mlp``'s sizes are host-bound)."""
    dh_part, hidden, embedding, w1, d_embedding, dw1, db1 = tensors
    num_rows, hidden_size = hidden.shape
    token_dim = embedding.shape[1]

    def plan_for(config):
        block_m, block_n, block_k, warps, stages = config
        tiles = (cdiv(num_rows, block_m) + cdiv(hidden_size, block_m)) * cdiv(token_dim, block_n)
        return LaunchPlan(
            prefix_mlp_bwd_first_kernel, (tiles,),
            (num_rows, hidden_size, token_dim, num_splits,
             *dh_part.stride(), hidden.stride(0), hidden.stride(1),
             embedding.stride(0), embedding.stride(1), w1.stride(0), w1.stride(1),
             d_embedding.stride(0), d_embedding.stride(1), dw1.stride(0), dw1.stride(1)),
            dict(HAS_BIAS=db1 is not None, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                 num_warps=warps, num_stages=stages),
            key, config)

    key = ("mlp-bwd-first", hidden.device, num_rows, hidden_size, token_dim, db1 is not None, precision,
           embedding.dtype, w1.dtype)
    config = pick_config(key, [INTERPRETER_MATMUL_TILE if triton_interpret() else BWD_FIRST_TILE],
                         lambda config: plan_for(config).launch(tensors, launch_kernel))
    return plan_for(config)


def _gradient_rows(grad_out: torch.Tensor, num_rows: int, num_cols: int, num_kv_heads: int, head_dim: int,
                   dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """The [L, 2, Hkv, P, D] gradient (any strides) as float32 [P, N] rows, dropout's mask applied."""
    rows = torch.empty(num_rows, num_cols, device=grad_out.device, dtype=torch.float32)
    return prefix_kv_copy(grad_out, grad_out.stride(), rows, _rows_as_kv_strides(rows, num_kv_heads, head_dim),
                          num_rows=num_rows, num_cols=num_cols, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          dropout_p=dropout_p, seed=seed)


def _library_products(rows, hidden, w2, dw2, db2, dh) -> None:
    """``LIBRARY_PRODUCTS``: ``dh = G @ W2``, ``dW2 = G^T @ H``, ``db2 = sum_p G`` by ``torch.mm``,
    from G as float32 [P, N] ``rows`` (``_gradient_rows``)."""
    torch.mm(rows, w2, out=dh)
    torch.mm(rows.t(), hidden, out=dw2)
    if db2 is not None:
        torch.sum(rows, 0, out=db2)


def prefix_rows_forward(embedding: torch.Tensor, *, num_layers: int, num_kv_heads: int, head_dim: int,
                        out_dtype: torch.dtype, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """P-Tuning v2: ``dropout(E)`` [P, N] written as [L, 2, Hkv, P, D] in out_dtype."""
    num_rows, num_cols = embedding.shape
    out = torch.empty(num_layers, 2, num_kv_heads, num_rows, head_dim, device=embedding.device, dtype=out_dtype)
    return prefix_kv_copy(embedding, _rows_as_kv_strides(embedding, num_kv_heads, head_dim), out, out.stride(),
                          num_rows=num_rows, num_cols=num_cols, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          dropout_p=dropout_p, seed=seed)


def prefix_rows_backward(grad_out: torch.Tensor, embedding: torch.Tensor, *, num_kv_heads: int, head_dim: int,
                         dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    """P-Tuning v2: dE [P, N] in the embedding's dtype from grad_out [L, 2, Hkv, P, D] in any strides."""
    num_rows, num_cols = embedding.shape
    d_embedding = torch.empty(embedding.shape, device=embedding.device, dtype=embedding.dtype)
    return prefix_kv_copy(grad_out, grad_out.stride(), d_embedding,
                          _rows_as_kv_strides(d_embedding, num_kv_heads, head_dim),
                          num_rows=num_rows, num_cols=num_cols, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          dropout_p=dropout_p, seed=seed)
