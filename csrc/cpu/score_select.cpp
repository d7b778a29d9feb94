// CPU kernel of fasp_ext::score_select (semantics: fasp_ext/reference.py).
// One pass over W computes the fp32 column sums of |W|; score_j = sqrt(s_j) * sum_i |W[i, j]|;
// with groups (G, r) a group's score is the sum of its columns' scores; then the k/segments best
// of each contiguous segment are kept (higher score first, ties to the lower index) and returned
// as int64 indices sorted ascending. Deterministic: no step depends on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <vector>

#include "../fasp_math.h"

namespace fasp_ext {
namespace {

// Returns (G, kept per segment), raising ValueError with the reference's messages.
std::pair<int64_t, int64_t> check_score_args(const at::Tensor& W, const at::Tensor& s, int64_t k,
                                             const std::optional<at::Tensor>& groups, int64_t segments) {
  TORCH_CHECK_VALUE(W.dim() == 2, "score_select: W must be 2-D (out, m), got ", W.dim(), "-D");
  const auto wt = W.scalar_type();
  TORCH_CHECK_VALUE(wt == at::kFloat || wt == at::kHalf || wt == at::kBFloat16,
                    "score_select: W must be float32, float16 or bfloat16, got ", wt);
  const int64_t m = W.size(1);
  TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == m,
                    "score_select: s must be a float32 vector of length m=", m, ", got ", s.scalar_type(),
                    " ", s.sizes());
  TORCH_CHECK_VALUE(s.device() == W.device(), "score_select: s is on ", s.device(), " but W is on ",
                    W.device());
  int64_t G = m;
  if (groups.has_value()) {
    const auto& g = *groups;
    TORCH_CHECK_VALUE(g.scalar_type() == at::kLong && g.dim() == 2,
                      "score_select: groups must be an int64 (G, r) matrix, got ", g.scalar_type(), " ",
                      g.dim(), "-D");
    TORCH_CHECK_VALUE(g.device() == W.device(), "score_select: groups is on ", g.device(),
                      " but W is on ", W.device());
    G = g.size(0);
    if (g.numel() > 0 && g.device().is_cpu()) {
      const auto gc = g.contiguous();
      const int64_t* p = gc.const_data_ptr<int64_t>();
      const auto [lo, hi] = std::minmax_element(p, p + gc.numel());
      TORCH_CHECK_VALUE(*lo >= 0 && *hi < m, "score_select: groups entries must lie in [0, ", m, ")");
    }
  }
  TORCH_CHECK_VALUE(segments >= 1 && G % segments == 0, "score_select: segments=", segments,
                    " must be >= 1 and divide the number of groups ", G);
  TORCH_CHECK_VALUE(k >= 0 && k <= G, "score_select: k=", k, " out of range [0, ", G, "]");
  TORCH_CHECK_VALUE(k % segments == 0, "score_select: k=", k, " must be a multiple of segments=", segments);
  return {G, k / segments};
}

// colsum[j] = sum_i |W[i, j]| in fp32 (fp64 accumulator), parallel over column blocks: each column
// is summed over the rows in order, independent of the thread count.
template <typename scalar_t>
void abs_column_sums(const scalar_t* w, int64_t out, int64_t m, float* colsum) {
  constexpr int64_t kGrain = 256;
  at::parallel_for(0, m, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t n = end - begin;
    std::vector<double> acc(static_cast<size_t>(n), 0.0);
    double* a = acc.data();
    for (int64_t i = 0; i < out; ++i) {
      const scalar_t* row = w + i * m + begin;
      for (int64_t j = 0; j < n; ++j) a[j] += std::fabs(static_cast<double>(static_cast<float>(row[j])));
    }
    for (int64_t j = 0; j < n; ++j) colsum[begin + j] = static_cast<float>(a[j]);
  });
}

// The C++ signature must equal the CUDA kernel's (csrc/cuda): the dispatcher checks it at load.
at::Tensor score_select_cpu(const at::Tensor& W, const at::Tensor& s, int64_t k,
                            const std::optional<at::Tensor>& groups, int64_t segments) {
  const auto [G, per] = check_score_args(W, s, k, groups, segments);
  TORCH_CHECK_VALUE(W.device().is_cpu(), "score_select: W must be a CPU tensor for the CPU kernel");
  const int64_t out = W.size(0), m = W.size(1);
  const at::Tensor sc = s.contiguous();
  const float* sp = sc.const_data_ptr<float>();
  for (int64_t j = 0; j < m; ++j) {
    TORCH_CHECK_VALUE(std::isfinite(sp[j]), "score_select: s contains NaN or Inf");
  }

  // Column scores.
  std::vector<float> col(static_cast<size_t>(m));
  const at::Tensor Wc = W.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Wc.scalar_type(), "score_select_cpu", [&] {
    abs_column_sums<scalar_t>(Wc.const_data_ptr<scalar_t>(), out, m, col.data());
  });
  for (int64_t j = 0; j < m; ++j) col[j] = column_score(sp[j], col[j]);

  // Group scores (sum over each group's columns, in the order listed).
  std::vector<float> score;
  if (groups.has_value()) {
    const at::Tensor gc = groups->contiguous();
    const int64_t r = gc.size(1);
    const int64_t* gp = gc.const_data_ptr<int64_t>();
    score.assign(static_cast<size_t>(G), 0.f);
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int64_t c = 0; c < r; ++c) acc += col[gp[g * r + c]];
      score[g] = acc;
    }
  } else {
    score = std::move(col);
  }
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK_VALUE(std::isfinite(score[g]), "score_select: W contains NaN or Inf");
  }

  // Per-segment top-k: partial selection with the shared comparator, then ascending order.
  at::Tensor kept = at::empty({k}, W.options().dtype(at::kLong));
  if (k == 0) return kept;
  int64_t* kp = kept.mutable_data_ptr<int64_t>();
  const int64_t seg_len = G / segments;
  at::parallel_for(0, segments, 1, [&](int64_t sb, int64_t se) {
    std::vector<int64_t> idx(static_cast<size_t>(seg_len));
    for (int64_t sg = sb; sg < se; ++sg) {
      const int64_t base = sg * seg_len;
      std::iota(idx.begin(), idx.end(), base);
      const auto before = [&](int64_t a, int64_t b) { return ranks_before(score[a], a, score[b], b); };
      if (per < seg_len) std::nth_element(idx.begin(), idx.begin() + per, idx.end(), before);
      std::sort(idx.begin(), idx.begin() + per);
      std::copy(idx.begin(), idx.begin() + per, kp + sg * per);
    }
  });
  return kept;
}

}  // namespace
}  // namespace fasp_ext

TORCH_LIBRARY_IMPL(fasp_ext, CPU, m) {
  m.impl("score_select", &fasp_ext::score_select_cpu);
}
