// Runs the decode kernels of csrc/ (prefix_decode_simt.cuh, prefix_decode_mma.cuh) on the CPU
// (cuda_emulator.h) for tests/test_decode_emulated.py: reads a case from a directory, writes the
// kernel's outputs there.
//
//   decode_emulator DIR
//   DIR/params.txt: "name value" lines (shapes, dtype, strides in elements, splits, which kernel:
//   tensor_cores 0/1, and the tensor-core kernel's K/V stages 1/2, or 0 for the launcher's rule with
//   `wave2`, the two-stage blocks the GPU holds, and `two_stages_fit`; see run)
//   DIR/{q,k,v,prefix_k,prefix_v}.bin: 16-bit storage the strides index; prefix_index.bin (int64),
//   key_padding_mask.bin (uint8) when has_index / has_mask.
//   Writes DIR/out_partial.bin (float32 [splits, B, Hq, Sq, D]), DIR/lse_partial.bin (float32
//   [splits, B, Hq, Sq]), the merge kernel's DIR/out.bin (16-bit [B, Hq, Sq, D]) and DIR/lse.bin
//   (float32 [B, Hq, Sq]), and DIR/plan.txt ("splits chunk row_blocks rows_per_block stages"); for a
//   plan of one split also DIR/direct_out.bin and DIR/direct_lse.bin, what the kernel writes when it
//   writes the result itself. merge_only 1 in params.txt: the merge kernel alone (run_merge);
//   plan_only 1: plan.txt alone (no inputs read, no kernel run), for the plans of full-size shapes.
#include "cuda_emulator.h"

#include "merge_attention_states.cuh"
#include "prefix_decode_mma.cuh"
#include "prefix_decode_simt.cuh"

#include <fstream>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>

namespace {

std::map<std::string, double> read_params(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::map<std::string, double> params;
  std::string name;
  double value;
  while (in >> name >> value) params[name] = value;
  return params;
}

template <typename E>
std::vector<E> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot read " + path);
  const auto bytes = static_cast<size_t>(in.tellg());
  std::vector<E> data(bytes / sizeof(E) + 8);   // slack: the kernel's 16-byte copies stay inside
  in.seekg(0);
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(bytes));
  return data;
}

template <typename E>
void write_file(const std::string& path, const std::vector<E>& data) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(E)));
}

template <typename T, int HEAD_DIM>
void run(const std::string& dir, std::map<std::string, double>& a) {
  using namespace prefixkern;
  auto get = [&](const char* name) { return static_cast<int64_t>(a.at(name)); };
  const int B = get("B"), Hq = get("Hq"), Hkv = get("Hkv"), Sq = get("Sq"), L = get("L"), P = get("P");
  const int group = Hq / Hkv;
  const bool tensor_cores = get("tensor_cores") != 0;
  // The launcher's plan (prefix_decode.cu): `wave` (and `wave2`, two-stage blocks) stand in for the
  // GPU's resident blocks.
  // The CUDA-core kernel's rows per block, sized to the group as the launcher sizes it.
  const int rows = simt_rows(group * Sq);
  auto param = [&](const char* name, int64_t fallback) { return a.count(name) != 0 ? get(name) : fallback; };
  DecodePlan plan;
  int stages = 1;
  if (tensor_cores) {
    const MmaDecodePlan chosen = plan_mma_decode(
        B, Hkv, group, Sq, P, L, kMmaRows, kMmaTileKeys, get("wave"), param("wave2", get("wave")),
        param("two_stages_fit", 1) != 0, get("num_splits"), param("stages", 1));
    plan = chosen.plan;
    stages = chosen.stages;
  } else {
    plan = plan_decode(B, Hkv, group, Sq, P, L, rows, tile_keys(HEAD_DIM), get("wave"), get("num_splits"));
  }
  auto write_plan = [&] {
    std::ofstream(dir + "/plan.txt") << plan.splits << " " << plan.chunk << " " << plan.row_blocks << " "
                                     << (tensor_cores ? kMmaRows : rows) << " " << stages << "\n";
  };
  if (param("plan_only", 0) != 0) return write_plan();

  auto q = read_file<T>(dir + "/q.bin");
  auto k = read_file<T>(dir + "/k.bin");
  auto v = read_file<T>(dir + "/v.bin");
  auto pk = read_file<T>(dir + "/prefix_k.bin");
  auto pv = read_file<T>(dir + "/prefix_v.bin");
  std::vector<int64_t> index;
  std::vector<uint8_t> mask;
  if (get("has_index")) index = read_file<int64_t>(dir + "/prefix_index.bin");
  if (get("has_mask")) mask = read_file<uint8_t>(dir + "/key_padding_mask.bin");
  const int64_t rows_total = static_cast<int64_t>(B) * Hq * Sq;
  std::vector<float> out_partial(plan.splits * rows_total * HEAD_DIM, NAN);
  std::vector<float> lse_partial(plan.splits * rows_total, NAN);

  DecodeParams p{};
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.pk = pk.data(), p.pv = pv.data();
  p.prefix_index = get("has_index") ? index.data() : nullptr;
  p.kpm = get("has_mask") ? mask.data() : nullptr;
  p.out_partial = out_partial.data();
  p.lse_partial = lse_partial.data();
  p.q_sb = get("q_sb"), p.q_sh = get("q_sh"), p.q_ss = get("q_ss");
  p.k_sb = get("k_sb"), p.k_sh = get("k_sh"), p.k_ss = get("k_ss");
  p.v_sb = get("v_sb"), p.v_sh = get("v_sh"), p.v_ss = get("v_ss");
  p.pk_sb = get("pk_sb"), p.pk_sh = get("pk_sh"), p.pk_ss = get("pk_ss");
  p.pv_sb = get("pv_sb"), p.pv_sh = get("pv_sh"), p.pv_ss = get("pv_ss");
  p.kpm_sb = get("kpm_sb"), p.kpm_ss = get("kpm_ss");
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.Sq = Sq, p.L = L, p.P = P;
  p.group = group, p.row_blocks = plan.row_blocks, p.chunk = plan.chunk;
  p.scale = static_cast<float>(a.at("scale"));

  const dim3 grid(plan.splits, Hkv * plan.row_blocks, B);
  auto launch_partial = [&](const DecodeParams& p) {
    if (tensor_cores && stages == 2) {
      prefixkern_emu::launch(grid, kMmaThreads, sizeof(MmaTiles<T, HEAD_DIM, 2>),
                             [p] { prefix_decode_partial_mma_kernel<T, HEAD_DIM, 2>(p); });
    } else if (tensor_cores) {
      prefixkern_emu::launch(grid, kMmaThreads, sizeof(MmaTiles<T, HEAD_DIM, 1>),
                             [p] { prefix_decode_partial_mma_kernel<T, HEAD_DIM, 1>(p); });
    } else if (rows == 4) {
      prefixkern_emu::launch(grid, kThreads, 0, [p] { prefix_decode_partial_kernel<T, HEAD_DIM, 4>(p); });
    } else if (rows == 8) {
      prefixkern_emu::launch(grid, kThreads, 0, [p] { prefix_decode_partial_kernel<T, HEAD_DIM, 8>(p); });
    } else {
      prefixkern_emu::launch(grid, kThreads, 0, [p] { prefix_decode_partial_kernel<T, HEAD_DIM, kMaxRows>(p); });
    }
  };
  launch_partial(p);
  write_file(dir + "/out_partial.bin", out_partial);
  write_file(dir + "/lse_partial.bin", lse_partial);
  if (plan.splits == 1) {
    // The launch of one split as prefix_decode_attention makes it: the kernel writes the result.
    std::vector<T> direct(rows_total * HEAD_DIM);
    std::vector<float> direct_lse(rows_total, NAN);
    DecodeParams finish = p;
    finish.out_partial = nullptr;
    finish.lse_partial = nullptr;
    finish.out = direct.data();
    finish.lse = direct_lse.data();
    launch_partial(finish);
    write_file(dir + "/direct_out.bin", direct);
    write_file(dir + "/direct_lse.bin", direct_lse);
  }

  // The merge, as merge_attention_states launches it: one block per row.
  std::vector<T> out(rows_total * HEAD_DIM);
  std::vector<float> lse(rows_total, NAN);
  const float* parts = out_partial.data();
  const float* lses = lse_partial.data();
  T* merged = out.data();
  float* merged_lse = lse.data();
  const int splits = plan.splits;
  prefixkern_emu::launch(dim3(rows_total, 1, 1), kMergeThreads, 0, [=] {
    merge_attention_states_kernel<T>(parts, lses, merged, merged_lse, rows_total, splits, HEAD_DIM);
  });
  write_file(dir + "/out.bin", out);
  write_file(dir + "/lse.bin", lse);
  write_plan();
}

// merge_only mode: the merge kernel alone, on DIR/out_partial.bin (float32, `offset` floats of
// slack first: an unaligned start) and DIR/lse_partial.bin for `splits` x `rows` rows of any head
// dim D; writes DIR/out.bin and DIR/lse.bin.
template <typename T>
void run_merge(const std::string& dir, std::map<std::string, double>& a) {
  using namespace prefixkern;
  const int splits = static_cast<int>(a.at("splits"));
  const int64_t rows = static_cast<int64_t>(a.at("rows"));
  const int head_dim = static_cast<int>(a.at("D"));
  const int offset = static_cast<int>(a.at("offset"));
  const auto parts = read_file<float>(dir + "/out_partial.bin");
  const auto lses = read_file<float>(dir + "/lse_partial.bin");
  std::vector<T> out(rows * head_dim);
  std::vector<float> lse(rows, NAN);
  const float* parts_ptr = parts.data() + offset;
  const float* lses_ptr = lses.data();
  T* out_ptr = out.data();
  float* lse_ptr = lse.data();
  prefixkern_emu::launch(dim3(rows, 1, 1), kMergeThreads, 0, [=] {
    merge_attention_states_kernel<T>(parts_ptr, lses_ptr, out_ptr, lse_ptr, rows, splits, head_dim);
  });
  write_file(dir + "/out.bin", out);
  write_file(dir + "/lse.bin", lse);
}

template <typename T>
void run_head_dim(const std::string& dir, std::map<std::string, double>& params) {
  if (params.count("merge_only") != 0 && params.at("merge_only") != 0) return run_merge<T>(dir, params);
  switch (static_cast<int>(params.at("D"))) {
    case 64: return run<T, 64>(dir, params);
    case 128: return run<T, 128>(dir, params);
    case 256: return run<T, 256>(dir, params);
    default: throw std::runtime_error("head dim must be 64, 128 or 256");
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " DIR\n";
    return 2;
  }
  try {
    const std::string dir = argv[1];
    auto params = read_params(dir + "/params.txt");
    if (params.at("half") != 0) {
      run_head_dim<at::Half>(dir, params);
    } else {
      run_head_dim<at::BFloat16>(dir, params);
    }
  } catch (const std::exception& exc) {
    std::cerr << exc.what() << "\n";
    return 1;
  }
  return 0;
}
