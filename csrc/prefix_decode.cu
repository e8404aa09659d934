// Decode attention over [prefix ; cache] for q_len 1..8 (flash-decoding): the key axis
// [0, P + L) (prefix keys first) is cut into `splits` chunks; one block per (chunk, batch row,
// KV head, block of query rows) computes an online softmax over its chunk for a block of query
// rows (the GQA group's heads x the step's query positions: up to 16 on CUDA cores, sized to the
// group by simt_rows; 8 on tensor cores), so each KV byte is read once per block of rows, and
// writes a float32 partial output and its log-sum-exp. merge_attention_states combines the chunks.
//
// Visibility: prefix keys always; cache key j for query position i of Sq iff j <= i + (L - Sq)
// (bottom-right causal), and key_padding_mask[b, j] != 0 when a mask is given.
//
// Two kernels do this work: the CUDA-core one of prefix_decode_simt.cuh (the default) and the
// tensor-core one of prefix_decode_mma.cuh (tensor_cores=True, sm_80+). This file holds the launcher
// that serves both, and registers it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "decode_common.cuh"
#include "prefix_decode_mma.cuh"
#include "prefix_decode_simt.cuh"

namespace prefixkern {

// merge_attention_states.cu
std::tuple<at::Tensor, at::Tensor> merge_attention_states(const at::Tensor& out_partial, const at::Tensor& lse_partial,
                                                          at::ScalarType out_dtype);

namespace {

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "prefix_decode_partial: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == q.device(), "prefix_decode_partial: ", name, " must be on q's device");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "prefix_decode_partial: ", name, " must have q's dtype");
  TORCH_CHECK(t.stride(-1) == 1, "prefix_decode_partial: ", name, "'s last dim must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "prefix_decode_partial: ", name,
              " must be 16-byte aligned");
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) % kVec == 0, "prefix_decode_partial: ", name, "'s stride ", d,
                " must be a multiple of 8 elements (16-byte rows)");
  }
}

constexpr int kMaxDevices = 64;

// A positive per-device value read once rather than on every decode step: slots[device] holds
// it, 0 until read (devices past kMaxDevices read every time).
template <typename Read>
int read_once(std::array<std::atomic<int>, kMaxDevices>& slots, int device, Read read) {
  const bool cacheable = device >= 0 && device < kMaxDevices;
  int value = cacheable ? slots[device].load(std::memory_order_relaxed) : 0;
  if (value == 0) {
    value = read();
    if (cacheable) slots[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

// A device attribute (the SM count, the compute capability's major version), read once per device.
template <cudaDeviceAttr ATTRIBUTE>
int device_attribute(int device) {
  static std::array<std::atomic<int>, kMaxDevices> cached{};
  return read_once(cached, device, [device] {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, ATTRIBUTE, device));
    return value;
  });
}

// The tensor-core kernel's dynamic shared memory (over the 48 KiB default at head dim 256, and at
// 128 with two stages).
template <typename T, int HEAD_DIM, int STAGES>
constexpr int mma_smem_bytes() {
  return static_cast<int>(sizeof(MmaTiles<T, HEAD_DIM, STAGES>));
}

// Lets the tensor-core kernel instance use its shared memory on `device`; once per device.
template <typename T, int HEAD_DIM, int STAGES>
void allow_mma_smem(int device) {
  static std::array<std::atomic<int>, kMaxDevices> done{};
  read_once(done, device, [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(prefix_decode_partial_mma_kernel<T, HEAD_DIM, STAGES>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        mma_smem_bytes<T, HEAD_DIM, STAGES>()));
    return 1;
  });
}

template <typename T, int HEAD_DIM, int STAGES>
int query_mma_resident_blocks(int device) {
  int blocks = 0;
  allow_mma_smem<T, HEAD_DIM, STAGES>(device);
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks, prefix_decode_partial_mma_kernel<T, HEAD_DIM, STAGES>, kMmaThreads, mma_smem_bytes<T, HEAD_DIM, STAGES>()));
  return blocks;
}

// Blocks of one kernel instance an SM holds at once (registers and shared memory decide), from the
// occupancy API. ROWS: the CUDA-core kernel's rows per block (the tensor-core kernel has one size,
// and `stages` K/V stages).
template <typename T, int HEAD_DIM, int ROWS>
int query_resident_blocks(bool tensor_cores, int stages, int device) {
  int blocks = 0;
  if (tensor_cores) {
    blocks = stages == 2 ? query_mma_resident_blocks<T, HEAD_DIM, 2>(device)
                         : query_mma_resident_blocks<T, HEAD_DIM, 1>(device);
  } else {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks, prefix_decode_partial_kernel<T, HEAD_DIM, ROWS>, kThreads, 0));
  }
  return std::max(blocks, 1);
}

// Runs f.template run<T, HEAD_DIM, ROWS>() for the kernel instance of a dtype, head dim and rows per
// block (functors rather than templated lambdas: the extension builds as C++17 too).
template <typename T, int HEAD_DIM, typename F>
int dispatch_rows(int rows, const F& f) {
  switch (rows) {
    case 4: return f.template run<T, HEAD_DIM, 4>();
    case 8: return f.template run<T, HEAD_DIM, 8>();
    default: return f.template run<T, HEAD_DIM, kMaxRows>();
  }
}

template <typename T, typename F>
int dispatch_head_dim(int head_dim, int rows, const F& f) {
  switch (head_dim) {
    case 64: return dispatch_rows<T, 64>(rows, f);
    case 128: return dispatch_rows<T, 128>(rows, f);
    case 256: return dispatch_rows<T, 256>(rows, f);
    default: TORCH_CHECK(false, "prefix_decode_partial: head dim must be 64, 128 or 256, got ", head_dim);
  }
  return 0;
}

template <typename F>
int dispatch(bool half, int head_dim, int rows, const F& f) {
  return half ? dispatch_head_dim<at::Half>(head_dim, rows, f) : dispatch_head_dim<at::BFloat16>(head_dim, rows, f);
}

struct ResidentBlocks {
  bool tensor_cores;
  int stages;
  int device;

  template <typename T, int HEAD_DIM, int ROWS>
  int run() const {
    return query_resident_blocks<T, HEAD_DIM, ROWS>(tensor_cores, stages, device);
  }
};

struct LaunchPartial {
  const DecodeParams& params;
  const DecodePlan& plan;
  int Hkv;
  bool tensor_cores;
  int stages;
  int device;
  cudaStream_t stream;

  template <typename T, int HEAD_DIM, int STAGES>
  void launch_mma(const dim3& grid) const {
    allow_mma_smem<T, HEAD_DIM, STAGES>(device);
    prefix_decode_partial_mma_kernel<T, HEAD_DIM, STAGES>
        <<<grid, kMmaThreads, mma_smem_bytes<T, HEAD_DIM, STAGES>(), stream>>>(params);
  }

  template <typename T, int HEAD_DIM, int ROWS>
  int run() const {
    const dim3 grid(plan.splits, Hkv * plan.row_blocks, params.B);
    if (tensor_cores) {
      if (stages == 2) {
        launch_mma<T, HEAD_DIM, 2>(grid);
      } else {
        launch_mma<T, HEAD_DIM, 1>(grid);
      }
    } else {
      prefix_decode_partial_kernel<T, HEAD_DIM, ROWS><<<grid, kThreads, 0, stream>>>(params);
    }
    return 0;
  }
};

// The tensor-core kernel's instances are dispatched as rows 16 (one per dtype, head dim and stages).
int resident_blocks_per_sm(int device, bool half, int head_dim, int rows, bool tensor_cores, int stages) {
  // Per kernel instance (kernel and stages x dtype x head dim x rows per block), per device.
  static std::array<std::array<std::atomic<int>, kMaxDevices>, 54> cached{};
  const int rows_index = rows == 4 ? 0 : rows == 8 ? 1 : 2;
  const int kernel = tensor_cores ? stages : 0;    // 0: CUDA cores; 1, 2: tensor cores, 1 or 2 stages
  const int instance = ((kernel * 2 + (half ? 1 : 0)) * 3 + (head_dim == 64 ? 0 : head_dim == 128 ? 1 : 2)) * 3 +
                       rows_index;
  return read_once(cached[instance], device,
                   [&] { return dispatch(half, head_dim, rows, ResidentBlocks{tensor_cores, stages, device}); });
}

// The partial kernel's launch: (out_partial [splits, B, Hq, Sq, D], lse_partial [splits, B, Hq, Sq],
// false), float32; or, with `may_finish` and a plan of one split, (out [B, Hq, Sq, D] in q's dtype,
// lse [B, Hq, Sq], true): the kernel writes what the merge of its one part would (no merge launch:
// batch 64 on Llama-3-8B heads fills a wave with one split at every cache length).
std::tuple<at::Tensor, at::Tensor, bool> launch_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                       const c10::optional<at::Tensor>& prefix_index,
                                                       const c10::optional<at::Tensor>& key_padding_mask, double scale,
                                                       int64_t num_splits, bool tensor_cores, int64_t stages,
                                                       bool may_finish) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "prefix_decode_partial: q, k, v must be 4-d");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "prefix_decode_partial: q must be float16 or bfloat16");
  check_operand(q, "q", q);
  check_operand(k, "k", q);
  check_operand(v, "v", q);
  check_operand(prefix_k, "prefix_k", q);
  check_operand(prefix_v, "prefix_v", q);
  const int B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D, "prefix_decode_partial: k/v shape");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "prefix_decode_partial: Hq must be a multiple of Hkv");
  TORCH_CHECK(Sq >= 1 && Sq <= 8, "prefix_decode_partial: q_len must be 1..8, got ", Sq);
  TORCH_CHECK(prefix_k.sizes() == prefix_v.sizes(), "prefix_decode_partial: prefix_k/prefix_v shape");
  TORCH_CHECK(prefix_k.dim() == 3 || prefix_k.dim() == 4, "prefix_decode_partial: prefix must be 3-d or 4-d");
  TORCH_CHECK(prefix_k.size(-3) == Hkv && prefix_k.size(-1) == D, "prefix_decode_partial: prefix heads/head dim");
  const bool shared = prefix_k.dim() == 3;
  const int P = prefix_k.size(-2);
  if (prefix_index.has_value()) {
    TORCH_CHECK(!shared && prefix_index->scalar_type() == at::kLong && prefix_index->numel() == B &&
                    prefix_index->is_cuda() && prefix_index->is_contiguous(),
                "prefix_decode_partial: prefix_index must be a contiguous int64 [B] on the GPU, with a 4-d prefix");
  } else {
    TORCH_CHECK(shared || prefix_k.size(0) == B, "prefix_decode_partial: a 4-d prefix without index is per row");
  }
  at::Tensor kpm;
  if (key_padding_mask.has_value()) {
    kpm = *key_padding_mask;
    TORCH_CHECK(kpm.dim() == 2 && kpm.size(0) == B && kpm.size(1) == L && kpm.is_cuda(),
                "prefix_decode_partial: key_padding_mask must be [B, L] on the GPU");
    if (kpm.scalar_type() == at::kBool) kpm = kpm.view(at::kByte);
    TORCH_CHECK(kpm.scalar_type() == at::kByte, "prefix_decode_partial: key_padding_mask must be bool or uint8");
  }

  const c10::cuda::CUDAGuard guard(q.device());
  const int device = q.get_device();
  TORCH_CHECK(B <= 65535, "prefix_decode_partial: at most 65535 batch rows, got ", B);
  TORCH_CHECK(!tensor_cores || device_attribute<cudaDevAttrComputeCapabilityMajor>(device) >= 8,
              "prefix_decode_partial: tensor_cores=True needs an sm_80 or newer GPU");
  TORCH_CHECK(stages == 1 || ((stages == 0 || stages == 2) && tensor_cores),
              "prefix_decode_partial: stages must be 1, or 0 (the launcher's choice) or 2 with tensor_cores=True, got ",
              stages);
  // (both 16-bit dtypes take the same space)
  const bool two_stages_fit =
      tensor_cores && (D == 64 ? mma_smem_bytes<at::Half, 64, 2>()
                       : D == 128 ? mma_smem_bytes<at::Half, 128, 2>() : mma_smem_bytes<at::Half, 256, 2>()) <=
                          device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device);
  TORCH_CHECK(stages != 2 || two_stages_fit, "prefix_decode_partial: two K/V stages at head dim ", D,
              " need more shared memory a block than this GPU gives (use stages=1 or 0)");
  const bool half = q.scalar_type() == at::kHalf;
  const int group = Hq / Hkv;
  // The CUDA-core kernel's rows per block, sized to the group (simt_rows); the tensor-core one's is 8.
  const int rows = tensor_cores ? kMaxRows : simt_rows(group * Sq);
  // One full wave of resident blocks (plan_decode). The CUDA-core kernel at D = 128 holds 5 per SM;
  // at 2 per SM (2.4 resident at B = 8 on Llama-3-8B heads) it read 887 GB/s on the H200.
  const int sms = device_attribute<cudaDevAttrMultiProcessorCount>(device);
  DecodePlan plan;
  if (tensor_cores) {
    // The two-stage wave is asked for only where it can be chosen (its occupancy query sets the
    // kernel's shared-memory limit).
    const int wave1 = stages == 2 ? 0 : sms * resident_blocks_per_sm(device, half, D, rows, true, 1);
    const int wave2 = stages == 1 || !two_stages_fit ? 0 : sms * resident_blocks_per_sm(device, half, D, rows, true, 2);
    const MmaDecodePlan chosen = plan_mma_decode(B, Hkv, group, Sq, P, L, kMmaRows, kMmaTileKeys, wave1, wave2,
                                                 two_stages_fit, num_splits, static_cast<int>(stages));
    plan = chosen.plan;
    stages = chosen.stages;
  } else {
    plan = plan_decode(B, Hkv, group, Sq, P, L, rows, tile_keys(D),
                       sms * resident_blocks_per_sm(device, half, D, rows, false, 1), num_splits);
  }
  TORCH_CHECK(static_cast<int64_t>(Hkv) * plan.row_blocks <= 65535, "prefix_decode_partial: too many heads");
  const int splits = plan.splits;

  auto opts = q.options().dtype(at::kFloat);
  const bool finish = may_finish && splits == 1;
  auto out = finish ? at::empty({B, Hq, Sq, D}, q.options()) : at::empty({splits, B, Hq, Sq, D}, opts);
  auto lse = finish ? at::empty({B, Hq, Sq}, opts) : at::empty({splits, B, Hq, Sq}, opts);

  DecodeParams params{};
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.pk = prefix_k.data_ptr();
  params.pv = prefix_v.data_ptr();
  params.prefix_index = prefix_index.has_value() ? prefix_index->data_ptr<int64_t>() : nullptr;
  params.kpm = key_padding_mask.has_value() ? kpm.data_ptr<uint8_t>() : nullptr;
  if (finish) {
    params.out = out.data_ptr();
    params.lse = lse.data_ptr<float>();
  } else {
    params.out_partial = out.data_ptr<float>();
    params.lse_partial = lse.data_ptr<float>();
  }
  params.q_sb = q.stride(0), params.q_sh = q.stride(1), params.q_ss = q.stride(2);
  params.k_sb = k.stride(0), params.k_sh = k.stride(1), params.k_ss = k.stride(2);
  params.v_sb = v.stride(0), params.v_sh = v.stride(1), params.v_ss = v.stride(2);
  const int off = shared ? 1 : 0;  // a shared prefix has no batch dim: batch stride 0
  params.pk_sb = shared ? 0 : prefix_k.stride(0), params.pk_sh = prefix_k.stride(1 - off),
  params.pk_ss = prefix_k.stride(2 - off);
  params.pv_sb = shared ? 0 : prefix_v.stride(0), params.pv_sh = prefix_v.stride(1 - off),
  params.pv_ss = prefix_v.stride(2 - off);
  params.kpm_sb = key_padding_mask.has_value() ? kpm.stride(0) : 0;
  params.kpm_ss = key_padding_mask.has_value() ? kpm.stride(1) : 0;
  params.B = B, params.Hq = Hq, params.Hkv = Hkv, params.Sq = Sq, params.L = L, params.P = P;
  params.group = group, params.row_blocks = plan.row_blocks, params.chunk = plan.chunk;
  params.scale = static_cast<float>(scale);

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(half, D, rows, LaunchPartial{params, plan, Hkv, tensor_cores, static_cast<int>(stages), device, stream});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse, finish};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefix_decode_partial(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                                         const c10::optional<at::Tensor>& prefix_index,
                                                         const c10::optional<at::Tensor>& key_padding_mask,
                                                         double scale, int64_t num_splits,
                                                         bool tensor_cores, int64_t stages) {
  auto launched = launch_decode(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, num_splits,
                                tensor_cores, stages, false);
  return {std::get<0>(launched), std::get<1>(launched)};
}

// A decoding step's attention in one call: the partial kernel over the key chunks, then their
// merge (none for a plan of one chunk: the kernel writes the result), returning (out [B, Hq, Sq, D]
// in q's dtype, lse float32 [B, Hq, Sq]). One dispatcher round trip per layer instead of two on the
// host, and outputs shaped like q, which torch.compile traces without the partials'
// data-dependent chunk count.
std::tuple<at::Tensor, at::Tensor> prefix_decode_attention(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& prefix_k,
                                                           const at::Tensor& prefix_v,
                                                           const c10::optional<at::Tensor>& prefix_index,
                                                           const c10::optional<at::Tensor>& key_padding_mask,
                                                           double scale, int64_t num_splits, bool tensor_cores,
                                                           int64_t stages) {
  const auto launched = launch_decode(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, num_splits,
                                      tensor_cores, stages, true);
  if (std::get<2>(launched)) return {std::get<0>(launched), std::get<1>(launched)};
  return merge_attention_states(std::get<0>(launched), std::get<1>(launched), q.scalar_type());
}

}  // namespace prefixkern

TORCH_LIBRARY_IMPL(prefixkern_cuda, CUDA, m) {
  m.impl("prefix_decode_partial", &prefixkern::prefix_decode_partial);
  m.impl("prefix_decode_attention", &prefixkern::prefix_decode_attention);
}
