// Decode attention on CUDA cores: the kernel of prefix_decode_partial (the default). One block of
// 128 threads per (chunk, batch row, KV head, block of up to kMaxRows query rows) copies each K/V
// tile with cp.async, then computes on it: scores of every (row, key) pair from shared memory, an
// online softmax one warp per row, and P @ V with keys outer (each V element read from shared
// memory once per thread). Its device code also compiles as host C++ for the CPU emulation test
// (tests/csrc_emu).
#pragma once

#include <cmath>
#include <cstdint>

#include "decode_common.cuh"

namespace prefixkern {

constexpr int kThreads = 128;
constexpr int kMaxRows = 16;  // query rows per block

// Keys per K/V tile: 16 KiB of V per tile (static shared memory stays under 48 KiB).
constexpr int tile_keys(int head_dim) { return 8192 / head_dim; }

// Accumulator element a of a thread holds (row, column) (e / HEAD_DIM, e % HEAD_DIM) of the block's
// [kMaxRows, HEAD_DIM] output, e = tid + a * kThreads. Spelled so that the column is visibly the
// same for every a when HEAD_DIM divides kThreads, and cycles through HEAD_DIM / kThreads columns
// (a % COLS) when kThreads divides HEAD_DIM.
template <int HEAD_DIM>
__device__ __forceinline__ int acc_row(int tid, int a) {
  if constexpr (kThreads % HEAD_DIM == 0) {
    return a * (kThreads / HEAD_DIM) + tid / HEAD_DIM;
  } else {
    return (tid + a * kThreads) / HEAD_DIM;
  }
}

template <int HEAD_DIM>
__device__ __forceinline__ int acc_col(int tid, int a) {
  if constexpr (kThreads % HEAD_DIM == 0) {
    return tid % HEAD_DIM;
  } else {
    return tid + (a % (HEAD_DIM / kThreads)) * kThreads;
  }
}

// Resident blocks per SM promised to ptxas (__launch_bounds__), which caps its registers so that
// registers hold as many blocks as shared memory does (about 42 KiB per block: 4 at HEAD_DIM 64,
// 5 otherwise) where that costs no spill; HEAD_DIM 256 needs more registers per thread and gets 3.
// (A double-buffered variant, the next tile's copies in flight during this one's math, ran
// slower on the H200 than these resident blocks overlapping one another: removed.)
template <int HEAD_DIM>
constexpr int min_resident_blocks() {
  return HEAD_DIM == 64 ? 4 : HEAD_DIM == 256 ? 3 : 5;
}

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads, (min_resident_blocks<HEAD_DIM>())) prefix_decode_partial_kernel(const DecodeParams p) {
  constexpr int TK = tile_keys(HEAD_DIM);
  constexpr int ACC = kMaxRows * HEAD_DIM / kThreads;  // accumulator elements per thread
  constexpr int COLS = kThreads % HEAD_DIM == 0 ? 1 : HEAD_DIM / kThreads;   // distinct columns among them
  static_assert(kThreads % HEAD_DIM == 0 || HEAD_DIM % kThreads == 0, "see acc_col");
  static_assert(TK % 4 == 0, "P @ V reads four probabilities at a time");
  __shared__ __align__(16) T q_s[kMaxRows][HEAD_DIM];
  __shared__ __align__(16) T k_tile[TK][HEAD_DIM + kPad];
  __shared__ __align__(16) T v_tile[TK][HEAD_DIM];
  __shared__ __align__(16) float s_s[kMaxRows][TK];
  __shared__ float alpha_s[kMaxRows];
  __shared__ float m_s[kMaxRows];
  __shared__ float l_s[kMaxRows];

  const int tid = threadIdx.x;
  // Grid (split, KV head x row block, batch row): the order of one (b, g, rb) axis without its
  // 65535 limit on gridDim.y.
  const int split = blockIdx.x;
  const int rb = blockIdx.y % p.row_blocks;
  const int g = blockIdx.y / p.row_blocks;
  const int b = blockIdx.z;
  const int total_rows = p.group * p.Sq;
  const int row0 = rb * kMaxRows;
  const int rows = min(kMaxRows, total_rows - row0);
  const int num_keys = p.P + p.L;
  const int k_begin = split * p.chunk;
  const int k_end = min(num_keys, k_begin + p.chunk);
  const int diag = p.L - p.Sq;

  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.k) + b * p.k_sb + g * p.k_sh;
  const T* vc = static_cast<const T*>(p.v) + b * p.v_sb + g * p.v_sh;
  const int64_t pb = p.prefix_index != nullptr ? p.prefix_index[b] : b;
  const T* pk = static_cast<const T*>(p.pk) + pb * p.pk_sb + g * p.pk_sh;
  const T* pv = static_cast<const T*>(p.pv) + pb * p.pv_sb + g * p.pv_sh;

  // Query rows of this block: row r is head g * group + (row0 + r) / Sq at position (row0 + r) % Sq.
  for (int idx = tid; idx < kMaxRows * (HEAD_DIM / kVec); idx += kThreads) {
    const int r = idx / (HEAD_DIM / kVec);
    const int d = (idx % (HEAD_DIM / kVec)) * kVec;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < rows) {
      const int row = row0 + r;
      const int h = g * p.group + row / p.Sq;
      const int i = row % p.Sq;
      val = *reinterpret_cast<const uint4*>(q + b * p.q_sb + h * p.q_sh + i * p.q_ss + d);
    }
    *reinterpret_cast<uint4*>(&q_s[r][d]) = val;
  }
  if (tid < kMaxRows) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  float acc[ACC];
#pragma unroll
  for (int a = 0; a < ACC; ++a) acc[a] = 0.f;
  __syncthreads();

  for (int t0 = k_begin; t0 < k_end; t0 += TK) {
    // ---- K and V tiles: prefix rows from the prefix tensors, the rest from the cache ----
    // The whole tile's copies in flight together (32 KiB per block): the synchronous loop this
    // replaces waited for each 16-byte load before issuing the next, 4 KiB per block in
    // flight, which capped the kernel at 887 GB/s on the H200 (B = 8, cache 4096).
    load_kv_tile<T, HEAD_DIM, TK, kThreads>(k_tile, v_tile, t0, k_end, pk, pv, kc, vc, p);
    copy16_commit();
    copy16_wait<0>();
    __syncthreads();     // every thread's copies have landed

    // ---- scores of every (row, key) pair of the tile ----
    for (int idx = tid; idx < rows * TK; idx += kThreads) {
      const int r = idx / TK;
      const int c = idx % TK;
      const int key = t0 + c;
      float s = -INFINITY;
      bool visible = key < k_end;
      if (visible && key >= p.P) {
        const int j = key - p.P;
        const int i = (row0 + r) % p.Sq;
        visible = j <= i + diag;
        if (visible && p.kpm != nullptr) visible = p.kpm[b * p.kpm_sb + j * p.kpm_ss] != 0;
      }
      if (visible) {
        float dot = 0.f;
#pragma unroll
        for (int d = 0; d < HEAD_DIM; d += kVec) {  // 16-byte shared-memory loads
          dot += dot8(*reinterpret_cast<const uint4*>(&q_s[r][d]), *reinterpret_cast<const uint4*>(&k_tile[c][d]),
                      T());
        }
        s = dot * p.scale;
      }
      s_s[r][c] = s;
    }
    __syncthreads();

    // ---- online softmax: one warp per row, its lanes across the tile's keys ----
    {
      const int warp = tid / 32;
      const int lane = tid % 32;
      for (int r = warp; r < rows; r += kThreads / 32) {
        float tile_max = -INFINITY;
        for (int c = lane; c < TK; c += 32) tile_max = fmaxf(tile_max, s_s[r][c]);
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) {
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
        }
        const float m_old = m_s[r];
        const float m_new = fmaxf(m_old, tile_max);
        // Nothing visible yet: keep alpha = 1 (acc and l are still 0). First visible keys: alpha = 0.
        const float alpha = m_new == -INFINITY ? 1.f : (m_old == -INFINITY ? 0.f : __expf(m_old - m_new));
        float sum = 0.f;
        for (int c = lane; c < TK; c += 32) {
          const float s = s_s[r][c];
          const float e = (s == -INFINITY) ? 0.f : __expf(s - m_new);
          s_s[r][c] = e;
          sum += e;
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        if (lane == 0) {   // every lane has read m_s[r] above (the shuffles synchronise the warp)
          l_s[r] = l_s[r] * alpha + sum;
          m_s[r] = m_new;
          alpha_s[r] = alpha;
        }
      }
    }
    __syncthreads();

    // ---- acc = acc * alpha + P @ V ----
    // Keys outer, the thread's rows inner: each V element is read from shared memory once per
    // thread (COLS distinct columns) rather than once per row, and four probabilities of a row
    // come in one 16-byte broadcast read.
#pragma unroll
    for (int a = 0; a < ACC; ++a) {
      const int r = acc_row<HEAD_DIM>(tid, a);
      if (r < rows) acc[a] *= alpha_s[r];
    }
#pragma unroll 2
    for (int c = 0; c < TK; c += 4) {
      float v_val[COLS][4];
#pragma unroll
      for (int j = 0; j < COLS; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) v_val[j][i] = to_float(v_tile[c + i][acc_col<HEAD_DIM>(tid, j)]);
      }
#pragma unroll
      for (int a = 0; a < ACC; ++a) {
        const int r = acc_row<HEAD_DIM>(tid, a);
        if (r < rows) {
          const float4 prob = *reinterpret_cast<const float4*>(&s_s[r][c]);
          const float* v4 = v_val[a % COLS];
          acc[a] = fmaf(prob.w, v4[3], fmaf(prob.z, v4[2], fmaf(prob.y, v4[1], fmaf(prob.x, v4[0], acc[a]))));
        }
      }
    }
    __syncthreads();
  }

  // ---- partial output (normalised within the chunk) and its log-sum-exp ----
  const int64_t rows_total = static_cast<int64_t>(p.B) * p.Hq * p.Sq;
#pragma unroll
  for (int a = 0; a < ACC; ++a) {
    const int r = acc_row<HEAD_DIM>(tid, a);
    const int d = acc_col<HEAD_DIM>(tid, a);
    if (r < rows) {
      const int row = row0 + r;
      const int h = g * p.group + row / p.Sq;
      const int i = row % p.Sq;
      const int64_t out_row = (static_cast<int64_t>(b) * p.Hq + h) * p.Sq + i;
      const float l = l_s[r];
      p.out_partial[(split * rows_total + out_row) * HEAD_DIM + d] = l > 0.f ? acc[a] / l : 0.f;
      if (d == 0) p.lse_partial[split * rows_total + out_row] = l > 0.f ? m_s[r] + logf(l) : -INFINITY;
    }
  }
}

}  // namespace prefixkern
