// Shared by the decode kernels: dtype conversion, the launch parameters, the K/V tile copy and
// the split plan. Device code only needs c10's 16-bit types, so the tensor-core kernel's header
// also compiles as host C++ for the CPU emulation test (tests/csrc_emu, PREFIXKERN_EMULATE).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

namespace prefixkern {

constexpr int kVec = 8;   // 16-byte loads of 8 half/bf16 elements
constexpr int kPad = 8;   // K/V tile row padding (elements): spreads reads of one column over banks

__device__ __forceinline__ float to_float(at::Half x) { return __half2float(static_cast<__half>(x)); }
__device__ __forceinline__ float to_float(at::BFloat16 x) { return __bfloat162float(static_cast<__nv_bfloat16>(x)); }
__device__ __forceinline__ float to_float(float x) { return x; }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ at::Half from_float<at::Half>(float x) { return at::Half(__float2half_rn(x)); }
template <> __device__ __forceinline__ at::BFloat16 from_float<at::BFloat16>(float x) {
  return at::BFloat16(__float2bfloat16_rn(x));
}

struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  const void* pk;
  const void* pv;
  const int64_t* prefix_index;  // [B] or nullptr (shared or per-row prefix)
  const uint8_t* kpm;           // [B, L] (1 = real token) or nullptr
  float* out_partial;           // [splits, B, Hq, Sq, D]
  float* lse_partial;           // [splits, B, Hq, Sq]
  // A launch of one split may write the result itself: out [B, Hq, Sq, D] in q's dtype and lse
  // [B, Hq, Sq] float32, what merging its one part gives (no merge launch); nullptr: the partials.
  void* out;
  float* lse;
  int64_t q_sb, q_sh, q_ss;
  int64_t k_sb, k_sh, k_ss;
  int64_t v_sb, v_sh, v_ss;
  int64_t pk_sb, pk_sh, pk_ss;
  int64_t pv_sb, pv_sh, pv_ss;
  int64_t kpm_sb, kpm_ss;
  int B, Hq, Hkv, Sq, L, P, group, row_blocks, chunk;
  float scale;
};

// How a launch cuts the work: `splits` chunks of `chunk` keys (a multiple of the K/V tile) along
// [prefix ; cache], and `row_blocks` blocks of at most `rows_per_block` query rows per KV head.
struct DecodePlan {
  int splits, chunk, row_blocks;
};

// `wave`: blocks the GPU holds at once (SMs x resident blocks per SM); `num_splits` > 0 fixes the
// number of chunks. Otherwise one full wave: resident blocks are what keeps copies in flight while
// others compute, and no chunk is shorter than a tile.
inline DecodePlan plan_decode(int B, int Hkv, int group, int Sq, int P, int L, int rows_per_block, int tile,
                              int wave, int64_t num_splits) {
  DecodePlan plan{};
  plan.row_blocks = (group * Sq + rows_per_block - 1) / rows_per_block;
  const int num_keys = P + L;
  const int max_splits = (num_keys + tile - 1) / tile;
  int splits = static_cast<int>(num_splits);
  if (splits <= 0) splits = wave / (B * Hkv * plan.row_blocks);
  splits = std::max(1, std::min(splits, max_splits));
  plan.chunk = ((num_keys + splits - 1) / splits + tile - 1) / tile * tile;
  plan.splits = (num_keys + plan.chunk - 1) / plan.chunk;
  return plan;
}

// The tensor-core kernel's plan and K/V stages. `stages` 1 or 2 as the caller asks; 0 leaves them to
// this rule: two stages (the next tile's copies in flight during this tile's products, twice the
// shared memory, so fewer resident blocks: `wave2` against `wave1`) where the GPU gives a block
// their shared memory (`two_stages_fit`), the two-stage plan fits in one wave of its blocks, and
// each block gets two K/V tiles or more, so there is a next tile to overlap; one stage otherwise.
// What the H100 measured (2026-11-27, eighth run; bf16, P = 30 unless said): two stages took
// 0.905-0.959x the one-stage time where the rule picks them (4096 keys x batch 8 at head dims 64,
// 128 and 256, 32k keys x batch 1: 6 to 17 tiles a block), and lost where a block had one tile
// (512 keys x batch 1, P = 128: 1.19x) or the grid needed more than a two-stage wave (512 keys x
// batch 64, 512 blocks against 396 places: 1.06x). Points between (a grid of 1-2 two-stage waves,
// two or three tiles a block) were not timed apart.
struct MmaDecodePlan {
  DecodePlan plan;
  int stages;
};

inline MmaDecodePlan plan_mma_decode(int B, int Hkv, int group, int Sq, int P, int L, int rows_per_block, int tile,
                                     int wave1, int wave2, bool two_stages_fit, int64_t num_splits, int stages) {
  if (stages == 0 && two_stages_fit) {
    const DecodePlan two = plan_decode(B, Hkv, group, Sq, P, L, rows_per_block, tile, wave2, num_splits);
    const int64_t blocks = static_cast<int64_t>(two.splits) * two.row_blocks * Hkv * B;
    if (blocks <= wave2 && two.chunk >= 2 * tile) return {two, 2};
  }
  const int chosen = stages == 2 ? 2 : 1;
  return {plan_decode(B, Hkv, group, Sq, P, L, rows_per_block, tile, chosen == 2 ? wave2 : wave1, num_splits),
          chosen};
}

// 16-byte global -> shared copy, zero-filled when src is null (a key past the chunk); ``valid_src``
// is any mapped global address, for the zero fill. On sm_80+ it is asynchronous (cp.async, waited
// for with copy16_commit / copy16_wait): a tile's copies are all in flight at once and hold no
// registers. Older GPUs (and the CPU emulation) copy through a register, one load at a time.
__device__ __forceinline__ void copy16(void* dst, const void* src, const void* valid_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned smem = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(src != nullptr ? src : valid_src),
               "r"(src != nullptr ? 16 : 0));
#else
  *reinterpret_cast<uint4*>(dst) = src != nullptr ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void copy16_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void copy16_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Starts copying keys [t0, t0 + TK) of [prefix ; cache] into one K and one V tile (zeros past
// k_end), spread over THREADS threads; the caller commits and waits.
template <typename T, int HEAD_DIM, int TK, int THREADS, int K_COLS, int V_COLS>
__device__ __forceinline__ void load_kv_tile(T (&k_tile)[TK][K_COLS], T (&v_tile)[TK][V_COLS], int t0, int k_end,
                                             const T* pk, const T* pv, const T* kc, const T* vc,
                                             const DecodeParams& p) {
  constexpr int kCopies = TK * (HEAD_DIM / kVec) / THREADS;   // 16-byte copies per thread, per tensor
  static_assert(TK * (HEAD_DIM / kVec) % THREADS == 0, "a tile splits evenly over the block's threads");
  const int tid = threadIdx.x;
#pragma unroll 1   // cp.async does not wait, so unrolling adds no copies in flight, only registers
  for (int it = 0; it < kCopies; ++it) {
    const int idx = tid + it * THREADS;
    const int c = idx / (HEAD_DIM / kVec);
    const int d = (idx % (HEAD_DIM / kVec)) * kVec;
    const int key = t0 + c;
    const T* k_src = nullptr;
    const T* v_src = nullptr;
    if (key < k_end) {
      if (key < p.P) {
        k_src = pk + key * p.pk_ss + d;
        v_src = pv + key * p.pv_ss + d;
      } else {
        const int64_t j = key - p.P;
        k_src = kc + j * p.k_ss + d;
        v_src = vc + j * p.v_ss + d;
      }
    }
    copy16(&k_tile[c][d], k_src, kc);
    copy16(&v_tile[c][d], v_src, vc);
  }
}

// load_kv_tile for the CUDA-core kernel: a tile wholly inside the cache (every tile but the
// prefix's and a chunk's last) is copied by stepping two source pointers a fixed stride per pass,
// 25 instructions per pass in the sm_90 SASS against load_kv_tile's 82-91 (which addresses each
// key as a prefix or cache row and rebuilds the base pointers from the batch and head strides):
// about a third of that kernel's instructions went there. The tensor-core kernel copies this way
// too: 80 registers at head dim 128 for sm_80 and sm_90 with nvcc 13.0, six blocks per SM as its
// shared memory allows (an earlier compile of it took 95 for sm_80, and it kept load_kv_tile then).
template <typename T, int HEAD_DIM, int TK, int THREADS, int K_COLS, int V_COLS>
__device__ __forceinline__ void load_kv_tile_stepping(T (&k_tile)[TK][K_COLS], T (&v_tile)[TK][V_COLS], int t0,
                                                      int k_end, const T* pk, const T* pv, const T* kc, const T* vc,
                                                      const DecodeParams& p) {
  if (t0 < p.P || t0 + TK > k_end) {                    // the same for the whole block
    load_kv_tile<T, HEAD_DIM, TK, THREADS>(k_tile, v_tile, t0, k_end, pk, pv, kc, vc, p);
    return;
  }
  constexpr int kChunks = HEAD_DIM / kVec;               // 16-byte chunks per key row
  constexpr int kRowsPerPass = THREADS / kChunks;
  static_assert(THREADS % kChunks == 0 && TK % kRowsPerPass == 0, "a tile splits evenly over the block's threads");
  // The thread's chunk: column d of tile rows c0, c0 + kRowsPerPass, ... (load_kv_tile's assignment).
  const int d = (threadIdx.x % kChunks) * kVec;
  const int c0 = threadIdx.x / kChunks;
  const int64_t j0 = t0 + c0 - p.P;
  const T* k_src = kc + (j0 * p.k_ss + d);
  const T* v_src = vc + (j0 * p.v_ss + d);
  const int64_t k_step = kRowsPerPass * p.k_ss;
  const int64_t v_step = kRowsPerPass * p.v_ss;
#pragma unroll 1   // cp.async does not wait, so unrolling adds no copies in flight, only registers
  for (int c = c0; c < TK; c += kRowsPerPass) {
    copy16(&k_tile[c][d], k_src, kc);
    copy16(&v_tile[c][d], v_src, vc);
    k_src += k_step;
    v_src += v_step;
  }
}

}  // namespace prefixkern
