// A CPU stand-in for the CUDA built-ins the decode kernels use, so that their device code
// (csrc/prefix_decode_simt.cuh, csrc/prefix_decode_mma.cuh) runs on a machine with no GPU: each block runs as blockDim.x
// threads of the host, __syncthreads and __syncwarp are barriers, __shfl_xor_sync and
// mma.sync m16n8k16 exchange their operands through per-warp scratch, and __shared__ variables are
// function statics (blocks run one after another, so a block owns them while it runs).
//
// The mma follows the PTX ISA's fragment layouts (the same ones the kernel's comment spells; CUTLASS
// states them independently as CuTe's SM80_16x8x16 traits: A (m, k) = (t1 + 8 v1, 2 t0 + v0 + 8 v2),
// B (n, k) = (t1, 2 t0 + v0 + 8 v1), C (m, n) = (t1 + 8 v1, 2 t0 + v0) for lane = t0 + 4 t1 and value
// v = v0 + 2 v1 + 4 v2), with float32 products and accumulation. What this checks is the kernel's own
// logic: indexing, masks, the online softmax, the warp merge. Timing, cp.async and bank conflicts
// need the GPU.
#pragma once

#define PREFIXKERN_EMULATE 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <array>
#include <barrier>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

// The CUDA headers define these as attributes a host compiler ignores; the kernel needs __shared__
// to mean one object per block.
#undef __global__
#define __global__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __forceinline__
#define __forceinline__ inline

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline uint3 blockDim;
inline uint3 gridDim;

using std::max;
using std::min;

namespace prefixkern_emu {

struct Block {
  explicit Block(int threads, size_t smem_bytes)
      : block_barrier(threads), smem((smem_bytes + 15) / 16), scratch(threads) {
    for (int w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<uint4> smem;                           // dynamic shared memory, 16-byte aligned
  std::vector<std::array<uint32_t, 8>> scratch;      // per thread: operands a warp collective exchanges
};

inline Block* current_block = nullptr;

inline unsigned char* dynamic_shared_memory() { return reinterpret_cast<unsigned char*>(current_block->smem.data()); }

inline void sync_warp() { current_block->warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

// The 32 threads' scratch of this thread's warp.
inline std::array<uint32_t, 8>* warp_scratch() { return &current_block->scratch[threadIdx.x / 32 * 32]; }

template <typename V>
V shfl_xor(V value, int offset) {
  static_assert(sizeof(V) <= 4 * sizeof(uint32_t), "scratch holds 16 bytes of a value");
  const int lane = threadIdx.x % 32;
  std::memcpy(warp_scratch()[lane].data(), &value, sizeof(V));
  sync_warp();
  V out;
  std::memcpy(&out, warp_scratch()[lane ^ offset].data(), sizeof(V));
  sync_warp();   // everyone has read before the scratch is reused
  return out;
}

template <typename T>
float element(uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return static_cast<float>(T(bits, typename T::from_bits_t()));
}

// D[16 x 8] += A[16 x 16] B[16 x 8] from the 32 lanes' fragments (lane = 4 * gid + tig):
// A: a[0] (gid, 2tig..), a[1] (gid + 8, 2tig..), a[2] (gid, 2tig + 8..), a[3] (gid + 8, 2tig + 8..);
// B: b[0] (2tig.., gid), b[1] (2tig + 8.., gid); C/D: (gid, 2tig), (gid, 2tig + 1), (gid + 8, 2tig), (gid + 8, 2tig + 1).
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int lane = threadIdx.x % 32;
  auto* scratch = warp_scratch();
  for (int i = 0; i < 4; ++i) scratch[lane][i] = a[i];
  scratch[lane][4] = b[0];
  scratch[lane][5] = b[1];
  sync_warp();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int gid = l / 4, tig = l % 4;
    for (int h = 0; h < 2; ++h) {
      A[gid][2 * tig + h] = element<T>(scratch[l][0], h);
      A[gid + 8][2 * tig + h] = element<T>(scratch[l][1], h);
      A[gid][2 * tig + 8 + h] = element<T>(scratch[l][2], h);
      A[gid + 8][2 * tig + 8 + h] = element<T>(scratch[l][3], h);
      B[2 * tig + h][gid] = element<T>(scratch[l][4], h);
      B[2 * tig + 8 + h][gid] = element<T>(scratch[l][5], h);
    }
  }
  sync_warp();
  const int gid = lane / 4, tig = lane % 4;
  const int rows[4] = {gid, gid, gid + 8, gid + 8};
  const int cols[4] = {2 * tig, 2 * tig + 1, 2 * tig, 2 * tig + 1};
  for (int i = 0; i < 4; ++i) {
    float sum = d[i];
    for (int k = 0; k < 16; ++k) sum += A[rows[i]][k] * B[k][cols[i]];
    d[i] = sum;
  }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of 8 x 8
// matrix i; lane l receives (row l/4, columns 2(l%4), 2(l%4)+1) of each, transposed with TRANS
// (rows 2(l%4), 2(l%4)+1 of column l/4), the lower-indexed element in the low half (PTX ISA,
// "Warp-level matrix load instruction: ldmatrix").
template <bool TRANS>
void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
  const int lane = threadIdx.x % 32;
  auto* scratch = warp_scratch();
  const uintptr_t address = reinterpret_cast<uintptr_t>(row_address);
  std::memcpy(scratch[lane].data(), &address, sizeof(address));
  sync_warp();
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      const int row = TRANS ? 2 * (lane % 4) + h : lane / 4;
      const int col = TRANS ? lane / 4 : 2 * (lane % 4) + h;
      uintptr_t base;
      std::memcpy(&base, scratch[8 * i + row].data(), sizeof(base));
      std::memcpy(&e[h], reinterpret_cast<const void*>(base + 2 * col), sizeof(uint16_t));
    }
    r[i] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  sync_warp();   // everyone has read before the scratch is reused
}

// Runs kernel(args...) over grid x block as host threads, one block after another.
template <typename Kernel>
void launch(dim3 grid, int threads, size_t smem_bytes, Kernel kernel) {
  gridDim = make_uint3(grid.x, grid.y, grid.z);
  blockDim = make_uint3(threads, 1, 1);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block block(threads, smem_bytes);
        current_block = &block;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([=] {
            threadIdx = make_uint3(t, 0, 0);
            blockIdx = make_uint3(x, y, z);
            kernel();
          });
        }
        for (auto& thread : pool) thread.join();
        current_block = nullptr;
      }
    }
  }
}

}  // namespace prefixkern_emu

inline float __expf(float x) { return std::exp(x); }
inline void __syncthreads() { prefixkern_emu::current_block->block_barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { prefixkern_emu::sync_warp(); }
template <typename V>
V __shfl_xor_sync(unsigned, V value, int offset) {
  return prefixkern_emu::shfl_xor(value, offset);
}
