#pragma once
// CPU wheels of torch ship c10/cuda headers without this generated one; CUDA builds define exactly
// this. Used only by the compile-only check of csrc/ (tests/test_csrc_compile.py).
#define C10_CUDA_BUILD_SHARED_LIBS
