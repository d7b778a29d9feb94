// Per-element maths shared by the CPU (.cpp) and CUDA (.cu) kernels, so the CPU tests cover it.
// Keep these tiny, branch-free where possible, and identical in meaning to fasp_ext/reference.py.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASP_HD __host__ __device__ __forceinline__
#else
#define FASP_HD inline
#endif

namespace fasp_ext {

// Square of an activation, always in fp32 (fp16/bf16 are widened before squaring).
FASP_HD float sq(float x) { return x * x; }

// Column score: sqrt(s_j) * sum_i |W[i, j]|; negative s (impossible, but rounding) clamps to 0.
FASP_HD float column_score(float s, float abs_colsum) {
  return sqrtf(s > 0.f ? s : 0.f) * abs_colsum;
}

// Selection order: higher score first, ties broken by lower index (deterministic).
FASP_HD bool ranks_before(float score_a, int64_t idx_a, float score_b, int64_t idx_b) {
  return score_a > score_b || (score_a == score_b && idx_a < idx_b);
}

// Damping: lambda = damp * mean(diag H[S, S]); on Cholesky failure the next lambda is 10x, or a
// tiny multiple of the mean diagonal when lambda was 0.
FASP_HD double next_lambda(double lam, double mean_diag) {
  return lam > 0.0 ? lam * 10.0 : 1e-6 * mean_diag;
}

// Block width of the lower-triangle Gram update (accumulate_stats_lower; reference.py's
// gram_lower_block is its twin): one GEMM below 512 columns, else at most ~16 block columns of a
// multiple of 128 columns, 256 at least, so each GEMM stays wide enough for the tensor cores.
// nb equal block columns cost (nb + 1) / (2 nb) of the full product's flops: 7/12 at m = 1536,
// 17/32 at m = 8192 (0.70 at m = 576: blocks of 256, 256 and 64).
FASP_HD int64_t gram_lower_block(int64_t m) {
  if (m < 512) return m > 0 ? m : 1;
  const int64_t per = (m + 15) / 16;
  const int64_t b = (per + 127) / 128 * 128;
  return b > 256 ? b : 256;
}

// Report codes (see reference.py).
constexpr int kPathCholesky = 0;
constexpr int kPathCholeskyRetry = 1;
constexpr int kPathEigen = 2;
constexpr int kPathTrivial = 3;   // nothing to solve: k == 0 or nothing removed
constexpr int kPathSkipped = 4;   // mean(diag H[S, S]) <= 0: no signal on the kept columns, W[:, S] returned

}  // namespace fasp_ext
