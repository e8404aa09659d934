// The launcher of merge_attention_states (the kernel: merge_attention_states.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "merge_attention_states.cuh"

namespace prefixkern {

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
  TORCH_CHECK(splits > 0, "merge_attention_states: out_partial must hold at least one part, got 0");
  const int head_dim = static_cast<int>(parts.size(-1));
  const int64_t rows = lses.numel() / splits;
  auto out_sizes = parts.sizes().slice(1).vec();
  auto out = at::empty(out_sizes, parts.options().dtype(out_dtype));
  auto lse = at::empty(lses.sizes().slice(1).vec(), lses.options());
  if (rows == 0) return {out, lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (out_dtype == at::kHalf) {
    merge_attention_states_kernel<at::Half><<<rows, kMergeThreads, 0, stream>>>(
        parts.data_ptr<float>(), lses.data_ptr<float>(), out.data_ptr<at::Half>(), lse.data_ptr<float>(), rows, splits,
        head_dim);
  } else {
    merge_attention_states_kernel<at::BFloat16><<<rows, kMergeThreads, 0, stream>>>(
        parts.data_ptr<float>(), lses.data_ptr<float>(), out.data_ptr<at::BFloat16>(), lse.data_ptr<float>(), rows,
        splits, head_dim);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace prefixkern

TORCH_LIBRARY_IMPL(prefixkern_cuda, CUDA, m) { m.impl("merge_attention_states", &prefixkern::merge_attention_states); }
