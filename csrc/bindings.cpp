// Schemas of the CUDA ops; each .cu file registers its CUDA implementation.
#include <torch/library.h>

TORCH_LIBRARY(prefixkern_cuda, m) {
  // Partial attention of a decoding step (q_len 1..8) over [prefix ; cache], split over the key
  // axis: returns (out_partial float32 [splits, B, Hq, Sq, D], lse_partial float32 [splits, B, Hq, Sq]).
  // tensor_cores: the mma.sync kernel (sm_80+) instead of the CUDA-core one; stages: its K/V tiles
  // copied one at a time (1), the next one's copies in flight during this one's products (2), or
  // either as the launcher's rule picks for the shape and GPU (0; plan_mma_decode in decode_common.cuh).
  m.def(
      "prefix_decode_partial(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? prefix_index, Tensor? key_padding_mask, float scale, int num_splits, bool tensor_cores=False, "
      "int stages=1) -> (Tensor, Tensor)");
  // Log-sum-exp merge of partial attention states over dim 0: returns (out [..., D] in out_dtype, lse [...]).
  m.def("merge_attention_states(Tensor out_partial, Tensor lse_partial, ScalarType out_dtype) -> (Tensor, Tensor)");
  // Both in one call: returns (out [B, Hq, Sq, D] in q's dtype, lse float32 [B, Hq, Sq]).
  m.def(
      "prefix_decode_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? prefix_index, Tensor? key_padding_mask, float scale, int num_splits, bool tensor_cores=False, "
      "int stages=1) -> (Tensor, Tensor)");
}
