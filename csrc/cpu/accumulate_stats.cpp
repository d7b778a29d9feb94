// CPU kernel of fasp_ext::accumulate_stats (semantics: fasp_ext/reference.py).
//   s += sum over tokens of x^2   (fp32 result; each x widened to fp32 before squaring)
//   H += X^T X                    (fp32 GEMM through ATen/BLAS), when H is given.
// The column norms are computed into a temporary and checked for NaN/Inf before s or H change,
// so a bad batch leaves the running statistics untouched.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "../fasp_math.h"

namespace fasp_ext {
namespace {

void check_stats_args(const at::Tensor& X, const at::Tensor& s, const std::optional<at::Tensor>& H) {
  TORCH_CHECK_VALUE(X.dim() >= 1,
                    "accumulate_stats: X must be a tensor with at least 1 dimension (..., m)");
  const auto xt = X.scalar_type();
  TORCH_CHECK_VALUE(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16,
                    "accumulate_stats: X must be float32, float16 or bfloat16, got ", xt);
  const int64_t m = X.size(-1);
  TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == m,
                    "accumulate_stats: s must be a float32 vector of length m=", m, ", got ",
                    s.scalar_type(), " ", s.sizes());
  TORCH_CHECK_VALUE(s.is_contiguous(), "accumulate_stats: s must be contiguous");
  TORCH_CHECK_VALUE(s.device() == X.device(), "accumulate_stats: s is on ", s.device(),
                    " but X is on ", X.device());
  if (H.has_value()) {
    const auto& h = *H;
    TORCH_CHECK_VALUE(h.scalar_type() == at::kFloat && h.dim() == 2 && h.size(0) == m && h.size(1) == m,
                      "accumulate_stats: H must be a float32 (", m, ", ", m, ") matrix, got ",
                      h.scalar_type(), " ", h.sizes());
    TORCH_CHECK_VALUE(h.is_contiguous(), "accumulate_stats: H must be contiguous");
    TORCH_CHECK_VALUE(h.device() == X.device(), "accumulate_stats: H is on ", h.device(),
                      " but X is on ", X.device());
  }
}

// part[j] = sum_r float(x[r, j])^2 for a row-major (n, m) matrix. Parallel over column blocks;
// every column is summed over rows in order (fp64 accumulator), so the result does not depend on
// the number of threads.
template <typename scalar_t>
void column_sq_norms(const scalar_t* x, int64_t n, int64_t m, float* part) {
  constexpr int64_t kGrain = 256;  // columns per task: contiguous, vectorisable inner loop
  at::parallel_for(0, m, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t w = end - begin;
    std::vector<double> acc(static_cast<size_t>(w), 0.0);
    double* a = acc.data();
    for (int64_t r = 0; r < n; ++r) {
      const scalar_t* row = x + r * m + begin;
      for (int64_t j = 0; j < w; ++j) {
        a[j] += static_cast<double>(sq(static_cast<float>(row[j])));
      }
    }
    for (int64_t j = 0; j < w; ++j) part[begin + j] = static_cast<float>(a[j]);
  });
}

// H += X^T X computing only the block lower triangle (SYRK-like, (nb + 1) / (2 nb) of one GEMM's
// flops for nb column blocks) and adding each off-diagonal block to both triangles, so the update
// is exact for any H, symmetric or not. Small m: one GEMM.
void gram_update(at::Tensor& H, const at::Tensor& X) {
  const int64_t m = X.size(1);
  // measured on a quiet 2-core EPYC, 4096 tokens, 1 and 2 threads: 8 blocks from 1024 columns
  // (1.5-1.7x faster than one GEMM), 4 blocks at 576 (1.4x); one GEMM below 384
  const int64_t nb = m >= 1024 ? 8 : (m >= 384 ? 4 : 1);
  if (nb == 1) {
    H.addmm_(X.t(), X);
    return;
  }
  const int64_t bs = (m + nb - 1) / nb;
  for (int64_t j0 = 0; j0 < m; j0 += bs) {
    const int64_t w = std::min(bs, m - j0);
    // rows j0.. of column block [j0, j0 + w): X[:, j0:]^T X[:, j0:j0+w], a (m - j0) x w product
    at::Tensor blk = at::mm(X.narrow(1, j0, m - j0).t(), X.narrow(1, j0, w));
    H.narrow(0, j0, m - j0).narrow(1, j0, w).add_(blk);
    if (m - j0 - w > 0) {  // the mirrored upper part: H[j0:j0+w, j0+w:] += blk[w:, :]^T
      H.narrow(0, j0, w).narrow(1, j0 + w, m - j0 - w).add_(blk.narrow(0, w, m - j0 - w).t());
    }
  }
}

// The C++ signature must equal the CUDA kernel's (csrc/cuda): the dispatcher checks it at load.
void accumulate_stats_cpu(const at::Tensor& X, at::Tensor s, std::optional<at::Tensor> H) {
  check_stats_args(X, s, H);
  TORCH_CHECK_VALUE(X.device().is_cpu(), "accumulate_stats: X must be a CPU tensor for the CPU kernel");
  const int64_t m = X.size(-1);
  // (n, m) view of the tokens; a copy only when X is not contiguous.
  at::Tensor X2 = X.reshape({-1, m}).contiguous();
  // The Gram matrix needs fp32 X: convert half/bf16 once and reuse it for the norms too.
  if (H.has_value() && X2.scalar_type() != at::kFloat) X2 = X2.to(at::kFloat);
  const int64_t n = X2.size(0);

  at::Tensor part = at::empty({m}, s.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X2.scalar_type(), "accumulate_stats_cpu", [&] {
    column_sq_norms<scalar_t>(X2.const_data_ptr<scalar_t>(), n, m, part.mutable_data_ptr<float>());
  });
  const float* p = part.const_data_ptr<float>();
  for (int64_t j = 0; j < m; ++j) {
    TORCH_CHECK_VALUE(std::isfinite(p[j]),
                      "accumulate_stats: X contains NaN or Inf (or values whose square overflows fp32)");
  }
  s.add_(part);
  if (H.has_value() && n > 0) {
    gram_update(*H, X2);
  }
}

}  // namespace
}  // namespace fasp_ext

TORCH_LIBRARY_IMPL(fasp_ext, CPU, m) {
  m.impl("accumulate_stats", &fasp_ext::accumulate_stats_cpu);
}
