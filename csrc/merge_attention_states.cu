// Log-sum-exp merge of partial attention states: out = sum_s w_s * out_s / sum_s w_s with
// w_s = exp(lse_s - max lse), lse = max + log(sum w). A row whose every part saw no key
// (all lse = -inf) gives 0 and -inf.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "decode_common.cuh"

namespace prefixkern {

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

std::tuple<at::Tensor, at::Tensor> merge_attention_states(const at::Tensor& out_partial, const at::Tensor& lse_partial,
                                                          at::ScalarType out_dtype) {
  TORCH_CHECK(out_partial.is_cuda() && lse_partial.is_cuda(), "merge_attention_states: tensors must be on a GPU");
  TORCH_CHECK(out_partial.scalar_type() == at::kFloat && lse_partial.scalar_type() == at::kFloat,
              "merge_attention_states: out_partial and lse_partial must be float32");
  TORCH_CHECK(out_partial.dim() >= 2 && lse_partial.dim() == out_partial.dim() - 1,
              "merge_attention_states: out_partial [splits, ..., D] and lse_partial [splits, ...] expected");
  TORCH_CHECK(out_partial.sizes().slice(0, out_partial.dim() - 1) == lse_partial.sizes(),
              "merge_attention_states: out_partial's leading dims must equal lse_partial's");
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "merge_attention_states: out_dtype must be float16 or bfloat16");
  const c10::cuda::CUDAGuard guard(out_partial.device());
  auto parts = out_partial.contiguous();
  auto lses = lse_partial.contiguous();
  const int splits = static_cast<int>(parts.size(0));
  const int head_dim = static_cast<int>(parts.size(-1));
  const int64_t rows = lses.numel() / splits;
  auto out_sizes = parts.sizes().slice(1).vec();
  auto out = at::empty(out_sizes, parts.options().dtype(out_dtype));
  auto lse = at::empty(lses.sizes().slice(1).vec(), lses.options());
  if (rows == 0) return {out, lse};
  const int threads = head_dim >= 128 ? 128 : 64;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (out_dtype == at::kHalf) {
    merge_attention_states_kernel<at::Half><<<rows, threads, 0, stream>>>(
        parts.data_ptr<float>(), lses.data_ptr<float>(), out.data_ptr<at::Half>(), lse.data_ptr<float>(), rows, splits,
        head_dim);
  } else {
    merge_attention_states_kernel<at::BFloat16><<<rows, threads, 0, stream>>>(
        parts.data_ptr<float>(), lses.data_ptr<float>(), out.data_ptr<at::BFloat16>(), lse.data_ptr<float>(), rows,
        splits, head_dim);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace prefixkern

TORCH_LIBRARY_IMPL(prefixkern_cuda, CUDA, m) { m.impl("merge_attention_states", &prefixkern::merge_attention_states); }
