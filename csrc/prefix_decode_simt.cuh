// Decode attention on CUDA cores: the kernel of prefix_decode_partial (the default). One block of
// 128 threads per (chunk, batch row, KV head, block of up to ROWS query rows) copies each K/V
// tile with cp.async, then computes on it: scores with each thread on one key of the tile and its
// share of the block's rows (the key's 16-byte chunks read and converted once for all of them), an
// online softmax one warp per row, and P @ V with keys outer (each V element read from shared
// memory once per thread). Its device code also compiles as host C++ for the CPU emulation test
// (tests/csrc_emu).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "decode_common.cuh"

namespace prefixkern {

constexpr int kThreads = 128;
constexpr int kMaxRows = 16;  // query rows per block, at most

// The rows per block a launch compiles for: the smallest of 4, 8 and 16 that holds the GQA group's
// query rows (group x q_len; more take several blocks of 16). A block's accumulators, scores and
// query tile are sized by it: with 16 for every launch, a Llama-3 decode step (4 rows) spent
// three quarters of its P @ V instructions on rows that do not exist.
constexpr int simt_rows(int rows) { return rows <= 4 ? 4 : rows <= 8 ? 8 : kMaxRows; }

// Keys per K/V tile: 16 KiB of V per tile (static shared memory stays under 48 KiB).
constexpr int tile_keys(int head_dim) { return 8192 / head_dim; }

// The query tile in shared memory: float32 (converted once per block rather than once per key)
// where it fits beside the K/V tiles without costing a resident block (4 KiB), else the input dtype.
template <typename T, int ROWS, int HEAD_DIM>
using QueryTile = std::conditional_t<(ROWS * HEAD_DIM <= 1024), float, T>;

// Accumulator element a of a thread holds (row, column) (e / HEAD_DIM, e % HEAD_DIM) of the block's
// [ROWS, HEAD_DIM] output, e = tid + a * kThreads. Spelled so that the column is visibly the
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
// registers hold as many blocks as shared memory does (about 36-42 KiB per block: 4 at HEAD_DIM 64,
// 5 otherwise) where that costs no spill; HEAD_DIM 256 needs more registers per thread and gets 3.
// (A double-buffered variant, the next tile's copies in flight during this one's math, ran
// slower on the H200 than these resident blocks overlapping one another: removed.)
template <int HEAD_DIM>
constexpr int min_resident_blocks() {
  return HEAD_DIM == 64 ? 4 : HEAD_DIM == 256 ? 3 : 5;
}

// The score loop's pieces: a key's 8 head-dim elements converted once (16 bytes of the K tile), and
// their dot product with 8 elements of one query row, from the float32 query tile (or converted
// from the input dtype). Products summed in pairs, each pair's second element first: the order of
// the one-(row, key)-pair-per-thread loop this replaced, so the scores are the same.
// (The 16-bit elements are taken from the 32-bit words by shifts: read through a T pointer into
// the uint4, the host compiler of the CPU emulation, optimising under strict aliasing, read garbage.)
template <typename T>
__device__ __forceinline__ void key_chunk_to_float(const uint4& packed, float (&k)[8]) {
  const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    k[2 * w] = to_float(T(static_cast<uint16_t>(words[w] & 0xffffu), typename T::from_bits_t()));
    k[2 * w + 1] = to_float(T(static_cast<uint16_t>(words[w] >> 16), typename T::from_bits_t()));
  }
}

__device__ __forceinline__ float dot8_float_query(const float* q, const float (&k)[8]) {
  const float4 lo = *reinterpret_cast<const float4*>(q);
  const float4 hi = *reinterpret_cast<const float4*>(q + 4);
  float sum = 0.f;
  sum = fmaf(lo.x, k[0], fmaf(lo.y, k[1], sum));
  sum = fmaf(lo.z, k[2], fmaf(lo.w, k[3], sum));
  sum = fmaf(hi.x, k[4], fmaf(hi.y, k[5], sum));
  sum = fmaf(hi.z, k[6], fmaf(hi.w, k[7], sum));
  return sum;
}

template <typename T>
__device__ __forceinline__ float dot8_float_query(const T* q, const float (&k)[8]) {
  float qf[8];
  key_chunk_to_float<T>(*reinterpret_cast<const uint4*>(q), qf);
  float sum = 0.f;
#pragma unroll
  for (int e = 0; e < 8; e += 2) sum = fmaf(qf[e], k[e], fmaf(qf[e + 1], k[e + 1], sum));
  return sum;
}

template <typename T, int HEAD_DIM, int ROWS>
__global__ void __launch_bounds__(kThreads, (min_resident_blocks<HEAD_DIM>())) prefix_decode_partial_kernel(const DecodeParams p) {
  constexpr int TK = tile_keys(HEAD_DIM);
  constexpr int ACC = ROWS * HEAD_DIM / kThreads;  // accumulator elements per thread
  constexpr int COLS = kThreads % HEAD_DIM == 0 ? 1 : HEAD_DIM / kThreads;   // distinct columns among them
  constexpr int KEY_GROUPS = kThreads / TK;        // threads per key in the score loop (1, 2 or 4)
  constexpr int ROWS_PER_THREAD = ROWS / KEY_GROUPS;
  using QT = QueryTile<T, ROWS, HEAD_DIM>;
  // Rows past the block's (a group of 7 in 8 rows, say) get probability 0 and alpha 1, so P @ V
  // needs no test per row: one made the compiler branch around each row's four FMAs, doubling the
  // loop's instructions. At 16 rows the untested loops need more registers than the launch bounds
  // leave (16-56 B spilled at head dims 64 and 256): there such rows are skipped by a test.
  constexpr bool kTestRows = ROWS == kMaxRows;
  static_assert(kThreads % HEAD_DIM == 0 || HEAD_DIM % kThreads == 0, "see acc_col");
  static_assert(ROWS * HEAD_DIM % kThreads == 0 && ROWS <= kMaxRows, "whole accumulators per thread");
  static_assert(kThreads % TK == 0 && ROWS % KEY_GROUPS == 0, "the score loop's threads cover keys x rows");
  static_assert(TK % 4 == 0, "P @ V reads four probabilities at a time");
  __shared__ __align__(16) QT q_s[ROWS][HEAD_DIM];
  __shared__ __align__(16) T k_tile[TK][HEAD_DIM + kPad];
  __shared__ __align__(16) T v_tile[TK][HEAD_DIM];
  __shared__ __align__(16) float s_s[ROWS][TK];
  __shared__ float alpha_s[ROWS];
  __shared__ float m_s[ROWS];
  __shared__ float l_s[ROWS];

  const int tid = threadIdx.x;
  // Grid (split, KV head x row block, batch row): the order of one (b, g, rb) axis without its
  // 65535 limit on gridDim.y.
  const int split = blockIdx.x;
  const int rb = blockIdx.y % p.row_blocks;
  const int g = blockIdx.y / p.row_blocks;
  const int b = blockIdx.z;
  const int total_rows = p.group * p.Sq;
  const int row0 = rb * ROWS;
  const int rows = min(ROWS, total_rows - row0);
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

  // Query rows of this block: row r is head g * group + (row0 + r) / Sq at position (row0 + r) % Sq
  // (rows past the block's are zeros).
  for (int idx = tid; idx < ROWS * (HEAD_DIM / kVec); idx += kThreads) {
    const int r = idx / (HEAD_DIM / kVec);
    const int d = (idx % (HEAD_DIM / kVec)) * kVec;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < rows) {
      const int row = row0 + r;
      const int h = g * p.group + row / p.Sq;
      const int i = row % p.Sq;
      val = *reinterpret_cast<const uint4*>(q + b * p.q_sb + h * p.q_sh + i * p.q_ss + d);
    }
    if constexpr (std::is_same_v<QT, float>) {
      float converted[8];
      key_chunk_to_float<T>(val, converted);
      *reinterpret_cast<float4*>(&q_s[r][d]) = make_float4(converted[0], converted[1], converted[2], converted[3]);
      *reinterpret_cast<float4*>(&q_s[r][d + 4]) = make_float4(converted[4], converted[5], converted[6], converted[7]);
    } else {
      *reinterpret_cast<uint4*>(&q_s[r][d]) = val;
    }
  }
  if (tid < ROWS) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
    alpha_s[tid] = 1.f;   // stays 1 for the rows past the block's (the softmax skips them)
  }
  float acc[ACC];
#pragma unroll
  for (int a = 0; a < ACC; ++a) acc[a] = 0.f;
  __syncthreads();

  // The score loop's assignment: key c of the tile, rows r_first, r_first + KEY_GROUPS, ... (a warp's
  // threads share their rows, so the query reads are broadcasts).
  const int c = tid % TK;
  const int r_first = tid / TK;

  for (int t0 = k_begin; t0 < k_end; t0 += TK) {
    // ---- K and V tiles: prefix rows from the prefix tensors, the rest from the cache ----
    // The whole tile's copies in flight together (32 KiB per block): the synchronous loop this
    // replaces waited for each 16-byte load before issuing the next, 4 KiB per block in
    // flight, which capped the kernel at 887 GB/s on the H200 (B = 8, cache 4096).
    load_kv_tile_stepping<T, HEAD_DIM, TK, kThreads>(k_tile, v_tile, t0, k_end, pk, pv, kc, vc, p);
    copy16_commit();
    copy16_wait<0>();
    __syncthreads();     // every thread's copies have landed

    // ---- scores of key c against the thread's rows ----
    // In passes of at most 8 rows: 16 dot products per thread (16 rows at head dim 64) took more
    // registers than the launch bounds leave (4 B spilled); that instance reads each key twice.
    {
      const int key = t0 + c;
      const int j = key - p.P;                 // the cache position of a cache key
      bool key_visible = key < k_end;
      if (key_visible && j >= 0 && p.kpm != nullptr) key_visible = p.kpm[b * p.kpm_sb + j * p.kpm_ss] != 0;
      constexpr int PASS_ROWS = ROWS_PER_THREAD < 8 ? ROWS_PER_THREAD : 8;
#pragma unroll 1
      for (int first = 0; first < ROWS_PER_THREAD; first += PASS_ROWS) {
        float dot[PASS_ROWS];
#pragma unroll
        for (int i = 0; i < PASS_ROWS; ++i) dot[i] = 0.f;
        if (key_visible) {
#pragma unroll
          for (int d = 0; d < HEAD_DIM; d += kVec) {  // 16-byte shared-memory loads of the key, once a pass
            float k8[8];
            key_chunk_to_float<T>(*reinterpret_cast<const uint4*>(&k_tile[c][d]), k8);
#pragma unroll
            for (int i = 0; i < PASS_ROWS; ++i) {
              dot[i] += dot8_float_query(&q_s[r_first + (first + i) * KEY_GROUPS][d], k8);
            }
          }
        }
#pragma unroll
        for (int i = 0; i < PASS_ROWS; ++i) {
          const int r = r_first + (first + i) * KEY_GROUPS;
          // Bottom-right causal: cache key j is visible to query position i_q iff j <= i_q + diag.
          const bool visible = key_visible && (j < 0 || j <= (row0 + r) % p.Sq + diag);
          if (kTestRows && r >= rows) continue;
          s_s[r][c] = r >= rows ? 0.f : visible ? dot[i] * p.scale : -INFINITY;   // (0: see kTestRows)
        }
      }
    }
    __syncthreads();

    // ---- online softmax: one warp per row, its lanes across the tile's keys ----
    // (Each lane's TK / 32 scores read once into registers, in unrolled loops: the runtime-bounded
    // loops over shared memory this replaced took about 230 instructions per row and tile.)
    {
      constexpr int PER_LANE = TK / 32;
      static_assert(TK % 32 == 0, "whole warps of keys");
      const int warp = tid / 32;
      const int lane = tid % 32;
      for (int r = warp; r < rows; r += kThreads / 32) {
        float s[PER_LANE];
        float tile_max = -INFINITY;
#pragma unroll
        for (int t = 0; t < PER_LANE; ++t) {
          s[t] = s_s[r][lane + 32 * t];
          tile_max = fmaxf(tile_max, s[t]);
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) {
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
        }
        const float m_old = m_s[r];
        const float m_new = fmaxf(m_old, tile_max);
        // Nothing visible yet: keep alpha = 1 (acc and l are still 0). First visible keys: alpha = 0.
        const float alpha = m_new == -INFINITY ? 1.f : (m_old == -INFINITY ? 0.f : __expf(m_old - m_new));
        float sum = 0.f;
#pragma unroll
        for (int t = 0; t < PER_LANE; ++t) {
          const float e = (s[t] == -INFINITY) ? 0.f : __expf(s[t] - m_new);
          s_s[r][lane + 32 * t] = e;
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
      if (!kTestRows || acc_row<HEAD_DIM>(tid, a) < rows) acc[a] *= alpha_s[acc_row<HEAD_DIM>(tid, a)];
    }
#pragma unroll 2
    for (int cc = 0; cc < TK; cc += 4) {
      float v_val[COLS][4];
#pragma unroll
      for (int jj = 0; jj < COLS; ++jj) {
#pragma unroll
        for (int i = 0; i < 4; ++i) v_val[jj][i] = to_float(v_tile[cc + i][acc_col<HEAD_DIM>(tid, jj)]);
      }
#pragma unroll
      for (int a = 0; a < ACC; ++a) {
        const int r = acc_row<HEAD_DIM>(tid, a);
        if (!kTestRows || r < rows) {
          const float4 prob = *reinterpret_cast<const float4*>(&s_s[r][cc]);
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
      const float value = l > 0.f ? acc[a] / l : 0.f;
      const float row_lse = l > 0.f ? m_s[r] + logf(l) : -INFINITY;
      if (p.out != nullptr) {   // the launch's one split: the result itself
        static_cast<T*>(p.out)[out_row * HEAD_DIM + d] = from_float<T>(value);
        if (d == 0) p.lse[out_row] = row_lse;
      } else {
        p.out_partial[(split * rows_total + out_row) * HEAD_DIM + d] = value;
        if (d == 0) p.lse_partial[split * rows_total + out_row] = row_lse;
      }
    }
  }
}

}  // namespace prefixkern
