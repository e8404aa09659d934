// Decode attention on tensor cores (sm_80+): the kernel of prefix_decode_partial(tensor_cores=True).
//
// Same work split and outputs as the CUDA-core kernel in prefix_decode.cu (a block per (chunk,
// batch row, KV head, block of query rows), float32 partial output and log-sum-exp per chunk),
// but the products run as mma.sync m16n8k16 with the query rows as the N = 8 side:
//
//   S^T [16 keys, 8 rows]  = K [16 keys, D]   . Q^T [D, 8 rows]
//   O^T [D, 8 rows]       += V^T [D, 16 keys] . P^T [16 keys, 8 rows]
//
// With the keys (and the head dim) on the M side, a GQA group of up to 8 query rows wastes no
// accumulator registers (rows as M would pad 4 rows to 16). Each of the 4 warps takes 16 keys of
// every 64-key K/V tile and keeps its own online-softmax state; the warps' states are merged once,
// at the end. The CUDA-core kernel spent about 20 instructions per KV element on the dot products
// and P @ V; here a 16 x 8 x 16 product is one instruction, so the block's time is the tile copy,
// whose instructions are kept few too: a tile inside the cache is copied by stepping two pointers
// (load_kv_tile_stepping, as the CUDA-core kernel does), and each A fragment (K, and V^T) is one
// ldmatrix where it was 4 shared-memory loads (K) or 8 loads and 4 packs (V^T).
//
// STAGES: 1 copies a tile, waits for it and computes on it (the block's copies and products take
// turns; other resident blocks fill the gaps), 2 keeps the next tile's copies in flight during this
// tile's products, for twice the shared memory (half the resident blocks at head dim 128). One is
// the default; two is the experiment the decode suite times beside it (prefixkern_two_stage).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 * gid + tig:
//   A [16 x 16]: a[0] = (gid, 2tig..2tig+1), a[1] = (gid + 8, 2tig..), a[2] = (gid, 2tig + 8..),
//                a[3] = (gid + 8, 2tig + 8..)
//   B [16 x 8]:  b[0] = (2tig..2tig+1, gid), b[1] = (2tig + 8.., gid)
//   C [16 x 8]:  c[0] = (gid, 2tig), c[1] = (gid, 2tig + 1), c[2] = (gid + 8, 2tig), c[3] = (gid + 8, 2tig + 1)
// (pairs packed low index first). So a lane's scores and accumulators belong to rows 2tig and
// 2tig + 1: row r's softmax statistics are reduced over the 8 lanes of one tig.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "decode_common.cuh"

namespace prefixkern {

constexpr int kMmaThreads = 128;
constexpr int kMmaWarps = kMmaThreads / 32;
constexpr int kMmaRows = 8;                                   // query rows per block: the mma's N
constexpr int kMmaWarpKeys = 16;                              // keys per warp per tile: the mma's M
constexpr int kMmaTileKeys = kMmaWarps * kMmaWarpKeys;        // 64 keys per K/V tile

// D += A B on one m16n8k16 tile: 16-bit operands (T: bf16 or fp16), float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
#define PREFIXKERN_MMA_16816(TYPE)                                                                                  \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, " \
               "{%8, %9}, {%0, %1, %2, %3};\n"                                                                    \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                    \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    PREFIXKERN_MMA_16816("bf16");
  } else {
    PREFIXKERN_MMA_16816("f16");
  }
#undef PREFIXKERN_MMA_16816
#else
  __trap();   // the launcher refuses GPUs before sm_80
#endif
#elif defined(PREFIXKERN_EMULATE)
  prefixkern_emu::mma_m16n8k16<T>(d, a, b);
#endif
}

__device__ __forceinline__ uint32_t load32(const void* ptr) { return *reinterpret_cast<const uint32_t*>(ptr); }

// Four 8 x 8 matrices of 16-bit elements from shared memory in one instruction (ldmatrix .x4):
// lanes 8i..8i+7 give the addresses of matrix i's rows (16 bytes each), and lane l receives in r[i]
// the elements (row l/4, columns 2(l%4), 2(l%4)+1) of matrix i, or with TRANS (rows 2(l%4),
// 2(l%4)+1, column l/4): an mma A fragment, where reading it element by element took 4 (K) to 8
// (V^T, with the packing) shared-memory loads per register.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  const unsigned smem = static_cast<unsigned>(__cvta_generic_to_shared(row_address));
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem));
  }
#else
  __trap();   // the launcher refuses GPUs before sm_80
#endif
#elif defined(PREFIXKERN_EMULATE)
  prefixkern_emu::ldmatrix_x4<TRANS>(r, row_address);
#endif
}

// The block's shared memory (dynamic: 68 KiB at head dim 256 with one stage). STAGES K/V tiles:
// one (copy a tile, wait for it, compute on it) or two (the next tile's copies in flight while the
// block computes on this one). After the key loop the K tiles' space holds the warps' scaled
// outputs for the merge (`merge_outputs`).
template <typename T, int HEAD_DIM, int STAGES>
struct MmaTiles {
  static_assert(STAGES == 1 || STAGES == 2, "one or two K/V stages");
  T k[STAGES][kMmaTileKeys][HEAD_DIM + kPad];
  T v[STAGES][kMmaTileKeys][HEAD_DIM + kPad];
  T p[kMmaWarps][kMmaRows][kMmaWarpKeys];   // a warp's probabilities of the tile, [row][key]: P^T's B fragments
  float m[kMmaWarps][kMmaRows];             // each warp's running max (log2 units) per row
  float l[kMmaWarps][kMmaRows];             // and its sum of exponentials
};

template <typename T, int HEAD_DIM, int STAGES>
__device__ __forceinline__ float (*merge_outputs(MmaTiles<T, HEAD_DIM, STAGES>& tiles))[kMmaRows][HEAD_DIM] {
  static_assert(sizeof(float) * kMmaWarps * kMmaRows * HEAD_DIM <= sizeof(tiles.k[0]), "a K tile holds the merge");
  return reinterpret_cast<float (*)[kMmaRows][HEAD_DIM]>(&tiles.k[0][0][0]);
}

// A row's online-softmax state over the whole block: the maximum of the warps' running maxima
// and their sums of exponentials rescaled to it (log2 units).
struct RowState {
  float m, l;
};

template <typename T, int HEAD_DIM, int STAGES>
__device__ __forceinline__ RowState merged_row_state(const MmaTiles<T, HEAD_DIM, STAGES>& tiles, int row) {
  RowState all{-INFINITY, 0.f};
#pragma unroll
  for (int w = 0; w < kMmaWarps; ++w) all.m = fmaxf(all.m, tiles.m[w][row]);
#pragma unroll
  for (int w = 0; w < kMmaWarps; ++w) {
    all.l += tiles.m[w][row] == -INFINITY ? 0.f : tiles.l[w][row] * exp2f(tiles.m[w][row] - all.m);
  }
  return all;
}

template <typename T, int HEAD_DIM, int STAGES>
__global__ void __launch_bounds__(kMmaThreads) prefix_decode_partial_mma_kernel(const DecodeParams p) {
  constexpr int KSTEPS = HEAD_DIM / 16;   // k-steps of S^T, and M tiles of O^T: 16 head-dim columns each
  constexpr float kLog2e = 1.4426950408889634f;
#if defined(PREFIXKERN_EMULATE)
  auto& tiles = *reinterpret_cast<MmaTiles<T, HEAD_DIM, STAGES>*>(prefixkern_emu::dynamic_shared_memory());
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& tiles = *reinterpret_cast<MmaTiles<T, HEAD_DIM, STAGES>*>(smem_raw);
#endif

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int gid = lane / 4;    // the fragments' groupID
  const int tig = lane % 4;    // and thread-in-group
  const int split = blockIdx.x;
  const int rb = blockIdx.y % p.row_blocks;
  const int g = blockIdx.y / p.row_blocks;
  const int b = blockIdx.z;
  const int row0 = rb * kMmaRows;
  const int rows = min(kMmaRows, p.group * p.Sq - row0);
  const int k_begin = split * p.chunk;
  const int k_end = min(p.P + p.L, k_begin + p.chunk);
  const int diag = p.L - p.Sq;

  const T* kc = static_cast<const T*>(p.k) + b * p.k_sb + g * p.k_sh;
  const T* vc = static_cast<const T*>(p.v) + b * p.v_sb + g * p.v_sh;
  const int64_t pb = p.prefix_index != nullptr ? p.prefix_index[b] : b;
  const T* pk = static_cast<const T*>(p.pk) + pb * p.pk_sb + g * p.pk_sh;
  const T* pv = static_cast<const T*>(p.pv) + pb * p.pv_sb + g * p.pv_sh;

  // Q^T as the B operand, held for the whole chunk: column gid is query row row0 + gid (head
  // g * group + row / Sq, position row % Sq); rows past the block's are zero.
  uint32_t qb[KSTEPS][2];
  {
    const int row = row0 + gid;
    const T* q_row = static_cast<const T*>(p.q) + b * p.q_sb + (g * p.group + row / p.Sq) * p.q_sh +
                     (row % p.Sq) * p.q_ss;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      qb[ks][0] = gid < rows ? load32(q_row + 16 * ks + 2 * tig) : 0u;
      qb[ks][1] = gid < rows ? load32(q_row + 16 * ks + 8 + 2 * tig) : 0u;
    }
  }
  // This lane's two rows (2tig, 2tig + 1) as query positions, for the causal test.
  const int pos[2] = {(row0 + 2 * tig) % p.Sq, (row0 + 2 * tig + 1) % p.Sq};
  const float scale_log2 = p.scale * kLog2e;
  float m_run[2] = {-INFINITY, -INFINITY};   // running max per row, the same in the 8 lanes of a tig
  float l_run[2] = {0.f, 0.f};               // this lane's share of the row's sum of exponentials
  float acc[KSTEPS][4];                      // O^T fragments: [mt][0] = O[row 2tig][16mt + gid], see the C layout
#pragma unroll
  for (int mt = 0; mt < KSTEPS; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;

  const int key0 = warp * kMmaWarpKeys;      // the warp's 16 keys within each tile
  // Starts (and commits) the copies of the tile at key t into stage `into`.
  const auto start_tile = [&](int into, int t) {
    load_kv_tile_stepping<T, HEAD_DIM, kMmaTileKeys, kMmaThreads>(tiles.k[into], tiles.v[into], t, k_end, pk, pv, kc,
                                                                   vc, p);
    copy16_commit();
  };
  // Two stages: the chunk's first tile is in flight before the loop, and each iteration starts the
  // next tile's copies into the other stage before waiting for its own (cp.async.wait_group 1).
  if constexpr (STAGES == 2) {
    if (k_begin < k_end) start_tile(0, k_begin);
  }
  int stage = 0;                             // the stage this iteration computes on
  for (int t0 = k_begin; t0 < k_end; t0 += kMmaTileKeys) {
    if constexpr (STAGES == 1) {
      start_tile(0, t0);
      copy16_wait<0>();
    } else if (t0 + kMmaTileKeys < k_end) {
      // The other stage was last read in the previous iteration, before its closing barrier.
      start_tile(stage ^ 1, t0 + kMmaTileKeys);
      copy16_wait<1>();  // this tile's group has landed; the next one's may still be in flight
    } else {
      copy16_wait<0>();
    }
    __syncthreads();     // every thread's copies of this tile have landed

    // ---- S^T = K Q^T over the warp's 16 keys: s[e] is key key0 + gid (+8 for e >= 2), row 2tig + (e & 1) ----
    // A = K [16 keys, 16 head-dim columns] by ldmatrix: matrix i holds keys key0 + 8 (i % 2) .. + 7,
    // columns 16 ks + 8 (i / 2) .. + 7 (the fragment's a[0] .. a[3]). The padded rows (kPad) put the
    // 8 rows of a matrix in distinct banks.
    const int frag_row = lane % 8 + 8 * ((lane / 8) % 2);   // this lane's row address: its key
    const int frag_col = 8 * (lane / 16);                   // and its head-dim column within the step
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      uint32_t a[4];
      ldmatrix_x4<false>(a, &tiles.k[stage][key0 + frag_row][16 * ks + frag_col]);
      mma_m16n8k16<T>(s, a, qb[ks]);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = t0 + key0 + gid + (e >= 2 ? 8 : 0);
      bool visible = key < k_end;
      if (visible && key >= p.P) {
        const int j = key - p.P;
        visible = j <= pos[e & 1] + diag;
        if (visible && p.kpm != nullptr) visible = p.kpm[b * p.kpm_sb + j * p.kpm_ss] != 0;
      }
      s[e] = visible ? s[e] * scale_log2 : -INFINITY;
    }

    // ---- online softmax, per row over the 8 lanes that share a tig ----
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = fmaxf(s[r], s[r + 2]);
#pragma unroll
      for (int offset = 4; offset < 32; offset *= 2) {
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
      }
      const float m_new = fmaxf(m_run[r], tile_max);
      // Nothing visible yet: alpha = 1 (acc and l are still 0); first visible keys: exp2(-inf) = 0.
      alpha[r] = m_new == -INFINITY ? 1.f : exp2f(m_run[r] - m_new);
      m_run[r] = m_new;
    }
    float prob[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) prob[e] = s[e] == -INFINITY ? 0.f : exp2f(s[e] - m_run[e & 1]);
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + prob[r] + prob[r + 2];
#pragma unroll
    for (int mt = 0; mt < KSTEPS; ++mt) {
      acc[mt][0] *= alpha[0];
      acc[mt][1] *= alpha[1];
      acc[mt][2] *= alpha[0];
      acc[mt][3] *= alpha[1];
    }

    // ---- P^T as the B operand: the C fragment holds a lane's probabilities by key, the B
    // fragment wants them by row, so they go through shared memory (a transpose in the warp) ----
    tiles.p[warp][2 * tig][gid] = from_float<T>(prob[0]);
    tiles.p[warp][2 * tig + 1][gid] = from_float<T>(prob[1]);
    tiles.p[warp][2 * tig][gid + 8] = from_float<T>(prob[2]);
    tiles.p[warp][2 * tig + 1][gid + 8] = from_float<T>(prob[3]);
    __syncwarp();
    const uint32_t pb[2] = {load32(&tiles.p[warp][gid][2 * tig]), load32(&tiles.p[warp][gid][2 * tig + 8])};

    // ---- O^T += V^T P^T: A = V^T (head-dim columns x the warp's keys), two keys per register ----
    // By ldmatrix .trans from the [key][column] tile: matrix i holds keys key0 + 8 (i / 2) .. + 7,
    // columns 16 mt + 8 (i % 2) .. + 7, transposed (lane l: keys 2(l%4), 2(l%4)+1 of column l/4).
    const int v_row = key0 + lane % 8 + 8 * (lane / 16);
    const int v_col = 8 * ((lane / 8) % 2);
#pragma unroll
    for (int mt = 0; mt < KSTEPS; ++mt) {
      uint32_t a[4];
      ldmatrix_x4<true>(a, &tiles.v[stage][v_row][16 * mt + v_col]);
      mma_m16n8k16<T>(acc[mt], a, pb);
    }
    __syncthreads();     // the tile is read before later copies overwrite its stage
    if constexpr (STAGES == 2) stage ^= 1;
  }

  // ---- merge the 4 warps' states: row maxima and sums first, then the rescaled outputs ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int offset = 4; offset < 32; offset *= 2) l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], offset);
  }
  if (gid == 0) {
    tiles.m[warp][2 * tig] = m_run[0];
    tiles.m[warp][2 * tig + 1] = m_run[1];
    tiles.l[warp][2 * tig] = l_run[0];
    tiles.l[warp][2 * tig + 1] = l_run[1];
  }
  __syncthreads();
  float own[2];   // this warp's weight in the merged, normalised output of each row
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const RowState all = merged_row_state(tiles, 2 * tig + r);
    own[r] = (m_run[r] == -INFINITY || all.l == 0.f) ? 0.f : exp2f(m_run[r] - all.m) / all.l;
  }
  float (*outs)[kMmaRows][HEAD_DIM] = merge_outputs(tiles);   // the K tile's space: every warp is past it
#pragma unroll
  for (int mt = 0; mt < KSTEPS; ++mt) {
    const int d = 16 * mt + gid;
    outs[warp][2 * tig][d] = acc[mt][0] * own[0];
    outs[warp][2 * tig + 1][d] = acc[mt][1] * own[1];
    outs[warp][2 * tig][d + 8] = acc[mt][2] * own[0];
    outs[warp][2 * tig + 1][d + 8] = acc[mt][3] * own[1];
  }
  __syncthreads();

  const int64_t rows_total = static_cast<int64_t>(p.B) * p.Hq * p.Sq;
  for (int idx = tid; idx < rows * HEAD_DIM; idx += kMmaThreads) {
    const int r = idx / HEAD_DIM;
    const int d = idx % HEAD_DIM;
    const int row = row0 + r;
    const int64_t out_row = (static_cast<int64_t>(b) * p.Hq + g * p.group + row / p.Sq) * p.Sq + row % p.Sq;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) sum += outs[w][r][d];
    if (p.out != nullptr) {   // the launch's one split: the result itself
      static_cast<T*>(p.out)[out_row * HEAD_DIM + d] = from_float<T>(sum);
    } else {
      p.out_partial[(split * rows_total + out_row) * HEAD_DIM + d] = sum;
    }
    if (d == 0) {
      // Natural-log LSE of the scaled scores: the running max is in log2 units.
      const RowState all = merged_row_state(tiles, r);
      const float row_lse = all.l > 0.f ? (all.m + log2f(all.l)) / kLog2e : -INFINITY;
      (p.out != nullptr ? p.lse : p.lse_partial + split * rows_total)[out_row] = row_lse;
    }
  }
}

}  // namespace prefixkern
