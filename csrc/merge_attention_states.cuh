// Log-sum-exp merge of partial attention states: out = sum_s w_s * out_s / sum_s w_s with
// w_s = exp(lse_s - max lse), lse = max + log(sum w). A row whose every part saw no key
// (all lse = -inf) gives 0 and -inf. One block per row. Its device code also compiles as host C++
// for the CPU emulation test (tests/csrc_emu).
#pragma once

#include <cmath>
#include <cstdint>

#include "decode_common.cuh"

namespace prefixkern {

// Threads per row: one per output column up to 128.
inline int merge_threads(int head_dim) { return head_dim >= 128 ? 128 : 64; }

template <typename T>
__global__ void merge_attention_states_kernel(const float* __restrict__ out_partial, const float* __restrict__ lse_partial,
                                              T* __restrict__ out, float* __restrict__ lse, int64_t rows, int splits,
                                              int head_dim) {
  const int64_t row = blockIdx.x;
  float max_lse = -INFINITY;
  for (int s = 0; s < splits; ++s) max_lse = fmaxf(max_lse, lse_partial[s * rows + row]);
  float total = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float l = lse_partial[s * rows + row];
    total += (l == -INFINITY) ? 0.f : __expf(l - max_lse);
  }
  const float inv_total = total > 0.f ? 1.f / total : 0.f;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float l = lse_partial[s * rows + row];
      if (l != -INFINITY) acc += __expf(l - max_lse) * out_partial[(s * rows + row) * head_dim + d];
    }
    out[row * head_dim + d] = from_float<T>(acc * inv_total);
  }
  if (threadIdx.x == 0) lse[row] = total > 0.f ? max_lse + logf(total) : -INFINITY;
}

}  // namespace prefixkern
