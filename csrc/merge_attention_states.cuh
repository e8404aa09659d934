// Log-sum-exp merge of partial attention states: out = sum_s w_s * out_s / sum_s w_s with
// w_s = exp(lse_s - max lse), lse = max + log(sum w). A row whose every part saw no key
// (all lse = -inf) gives 0 and -inf. One block per row. Its device code also compiles as host C++
// for the CPU emulation test (tests/csrc_emu).
//
// The splits are read in parallel, not one after another: the block's threads share the LSEs
// (block-wide max and sum), and each thread sums 4 columns (one float4) over every G-th split,
// G = 128 / (D / 4) groups of threads (4 at D = 128), summed across groups at the end. The loop
// this replaced walked every split in every thread, three times over, one dependent L2 read after
// another: 9.7 us for 11 splits x 256 rows on the H200 (Nsight Compute, P = 30, cache 4096, batch 8;
// the partial kernel before it took 51.8), and decoding at batch 1 runs up to one split per SM.
#pragma once

#include <cmath>
#include <cstdint>

#include "decode_common.cuh"

namespace prefixkern {

constexpr int kMergeThreads = 128;
// Splits whose weights a block keeps in shared memory (4 KiB): a wave of blocks on any GPU of this
// decade. A merge of more (a forced num_splits past it) recomputes the rest from their LSEs.
constexpr int kMergeSmemSplits = 1024;

// A part's weight exp(lse - max_lse): 0 for a part that saw no key (its output is not read).
__device__ __forceinline__ float merge_weight(float part_lse, float max_lse) {
  return part_lse == -INFINITY ? 0.f : __expf(part_lse - max_lse);
}

// The max (MAX) or sum of one float per thread over the block, the same value in every thread
// (each sums the warps' results in the same order). `scratch` holds a float per warp.
template <bool MAX>
__device__ __forceinline__ float merge_block_reduce(float x, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, x, offset);
    x = MAX ? fmaxf(x, other) : x + other;
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  x = scratch[0];
#pragma unroll
  for (int w = 1; w < kMergeThreads / 32; ++w) x = MAX ? fmaxf(x, scratch[w]) : x + scratch[w];
  __syncthreads();   // every thread has read scratch before the next reduction writes it
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kMergeThreads) merge_attention_states_kernel(
    const float* __restrict__ out_partial, const float* __restrict__ lse_partial, T* __restrict__ out,
    float* __restrict__ lse, int64_t rows, int splits, int head_dim) {
  __shared__ float weights[kMergeSmemSplits];
  __shared__ float scratch[kMergeThreads / 32];
  __shared__ __align__(16) float4 sums[kMergeThreads];
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;

  // ---- the parts' weights: block-wide max and sum of the LSEs, a thread per split ----
  float part_max = -INFINITY;
  for (int s = tid; s < splits; s += kMergeThreads) part_max = fmaxf(part_max, lse_partial[s * rows + row]);
  const float max_lse = merge_block_reduce<true>(part_max, scratch);
  float part_sum = 0.f;
  for (int s = tid; s < splits; s += kMergeThreads) {
    const float w = merge_weight(lse_partial[s * rows + row], max_lse);
    if (s < kMergeSmemSplits) weights[s] = w;
    part_sum += w;
  }
  const float total = merge_block_reduce<false>(part_sum, scratch);   // (its barriers publish weights)
  const float inv_total = total > 0.f ? 1.f / total : 0.f;

  // ---- out = sum_s w_s out_s / total ----
  const bool vectors = head_dim % 4 == 0 && head_dim <= 4 * kMergeThreads &&
                       reinterpret_cast<uintptr_t>(out_partial) % 16 == 0;
  if (vectors) {
    const int vec_cols = head_dim / 4;
    const int groups = kMergeThreads / vec_cols;
    const int col = tid % vec_cols;
    const int group = tid / vec_cols;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (group < groups) {
      const float4* parts = reinterpret_cast<const float4*>(out_partial) + row * vec_cols + col;
      const int64_t split_stride = rows * vec_cols;
      // Unrolled so that several splits' reads are in flight together; a weight-0 part is skipped by
      // a select, not a branch, which would hold each read back until its weight is known.
#pragma unroll 4
      for (int s = group; s < splits; s += groups) {
        const float w = s < kMergeSmemSplits ? weights[s] : merge_weight(lse_partial[s * rows + row], max_lse);
        const float4 x = parts[s * split_stride];
        acc.x += w > 0.f ? w * x.x : 0.f;
        acc.y += w > 0.f ? w * x.y : 0.f;
        acc.z += w > 0.f ? w * x.z : 0.f;
        acc.w += w > 0.f ? w * x.w : 0.f;
      }
    }
    sums[tid] = acc;
    __syncthreads();
    if (tid < vec_cols) {
      for (int g = 1; g < groups; ++g) {
        const float4 other = sums[g * vec_cols + tid];
        acc.x += other.x;
        acc.y += other.y;
        acc.z += other.z;
        acc.w += other.w;
      }
      T* dst = out + row * head_dim + 4 * tid;
      dst[0] = from_float<T>(acc.x * inv_total);
      dst[1] = from_float<T>(acc.y * inv_total);
      dst[2] = from_float<T>(acc.z * inv_total);
      dst[3] = from_float<T>(acc.w * inv_total);
    }
  } else {   // a head dim that is not a multiple of 4, or an unaligned view: a thread per column
    for (int d = tid; d < head_dim; d += kMergeThreads) {
      float acc = 0.f;
      for (int s = 0; s < splits; ++s) {
        const float w = s < kMergeSmemSplits ? weights[s] : merge_weight(lse_partial[s * rows + row], max_lse);
        const float x = out_partial[(s * rows + row) * head_dim + d];
        acc += w > 0.f ? w * x : 0.f;
      }
      out[row * head_dim + d] = from_float<T>(acc * inv_total);
    }
  }
  if (tid == 0) lse[row] = total > 0.f ? max_lse + logf(total) : -INFINITY;
}

}  // namespace prefixkern
