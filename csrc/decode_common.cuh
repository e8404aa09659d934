// Shared by the decode kernels: dtype conversion and the argument checks of the host launchers.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace prefixkern {

__device__ __forceinline__ float to_float(at::Half x) { return __half2float(static_cast<__half>(x)); }
__device__ __forceinline__ float to_float(at::BFloat16 x) { return __bfloat162float(static_cast<__nv_bfloat16>(x)); }
__device__ __forceinline__ float to_float(float x) { return x; }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ at::Half from_float<at::Half>(float x) { return at::Half(__float2half_rn(x)); }
template <> __device__ __forceinline__ at::BFloat16 from_float<at::BFloat16>(float x) {
  return at::BFloat16(__float2bfloat16_rn(x));
}

}  // namespace prefixkern
