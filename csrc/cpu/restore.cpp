// CPU kernel of fasp_ext::restore (semantics: fasp_ext/reference.py).
//   W' = W[:, S] + W[:, ~S] H[~S, S] (H[S, S] + lambda I)^-1,  lambda = damp * mean(diag H[S, S])
// in fp32 (fp64 with use_fp64), solved by Cholesky (LAPACK through ATen). When the factorisation
// fails (or the solve is not finite) lambda is raised with next_lambda() up to max_retries times,
// then an eigen-decomposition pseudo-inverse is used. Returns (W' in W's dtype, contiguous;
// report float64 CPU [path, lambda, attempts]).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../fasp_math.h"

namespace fasp_ext {
namespace {

int64_t check_restore_args(const at::Tensor& W, const at::Tensor& H, const at::Tensor& kept, double damp,
                           int64_t max_retries) {
  TORCH_CHECK_VALUE(W.dim() == 2, "restore: W must be 2-D (out, m), got ", W.dim(), "-D");
  const auto wt = W.scalar_type();
  TORCH_CHECK_VALUE(wt == at::kFloat || wt == at::kHalf || wt == at::kBFloat16 || wt == at::kDouble,
                    "restore: W must be a floating tensor, got ", wt);
  const int64_t m = W.size(1);
  TORCH_CHECK_VALUE(H.dim() == 2 && H.size(0) == m && H.size(1) == m, "restore: H must be (", m, ", ", m,
                    ") to match W's columns, got ", H.sizes());
  TORCH_CHECK_VALUE(H.scalar_type() == at::kFloat || H.scalar_type() == at::kDouble,
                    "restore: H must be float32 or float64, got ", H.scalar_type());
  TORCH_CHECK_VALUE(kept.scalar_type() == at::kLong && kept.dim() == 1,
                    "restore: kept must be a 1-D int64 tensor, got ", kept.scalar_type(), " ", kept.dim(), "-D");
  TORCH_CHECK_VALUE(kept.size(0) <= m, "restore: kept has ", kept.size(0), " entries but W has only m=", m,
                    " columns");
  TORCH_CHECK_VALUE(H.device() == W.device(), "restore: H is on ", H.device(), " but W is on ", W.device());
  TORCH_CHECK_VALUE(kept.device() == W.device(), "restore: kept is on ", kept.device(), " but W is on ",
                    W.device());
  TORCH_CHECK_VALUE(damp >= 0.0 && std::isfinite(damp), "restore: damp must be a finite number >= 0, got ",
                    damp);
  TORCH_CHECK_VALUE(max_retries >= 0, "restore: max_retries must be >= 0, got ", max_retries);
  return m;
}

// Value checks that need the data (CPU tensors).
void check_restore_values(const at::Tensor& H, const at::Tensor& kc, int64_t m) {
  const int64_t k = kc.numel();
  const int64_t* kp = kc.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK_VALUE(kp[i] >= 0 && kp[i] < m, "restore: kept indices must lie in [0, ", m, ")");
  }
  for (int64_t i = 1; i < k; ++i) {
    TORCH_CHECK_VALUE(kp[i] > kp[i - 1], "restore: kept must be strictly increasing (sorted, no duplicates)");
  }
  TORCH_CHECK_VALUE(at::isfinite(H).all().item<bool>(), "restore: H contains NaN or Inf");
}

at::Tensor make_report(int path, double lam, int64_t attempts) {
  at::Tensor r = at::empty({3}, at::TensorOptions().dtype(at::kDouble));
  double* p = r.mutable_data_ptr<double>();
  p[0] = path;
  p[1] = lam;
  p[2] = static_cast<double>(attempts);
  return r;
}

// The C++ signature must equal the CUDA kernel's (csrc/cuda): the dispatcher checks it at load.
std::tuple<at::Tensor, at::Tensor> restore_cpu(const at::Tensor& W, const at::Tensor& H, const at::Tensor& kept,
                                               double damp, bool use_fp64, int64_t max_retries) {
  const int64_t m = check_restore_args(W, H, kept, damp, max_retries);
  TORCH_CHECK_VALUE(W.device().is_cpu(), "restore: W must be a CPU tensor for the CPU kernel");
  const at::Tensor kc = kept.contiguous();
  check_restore_values(H, kc, m);

  const auto ct = use_fp64 ? at::kDouble : at::kFloat;
  const int64_t k = kc.numel();

  // Removed columns ~S, ascending.
  std::vector<int64_t> removed_v;
  removed_v.reserve(static_cast<size_t>(m - k));
  {
    std::vector<char> is_kept(static_cast<size_t>(m), 0);
    const int64_t* kp = kc.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < k; ++i) is_kept[kp[i]] = 1;
    for (int64_t j = 0; j < m; ++j)
      if (!is_kept[j]) removed_v.push_back(j);
  }
  const int64_t nr = static_cast<int64_t>(removed_v.size());
  const at::Tensor removed = at::from_blob(removed_v.data(), {nr}, at::kLong).clone();

  // Gathers: only the needed blocks, converted to the compute type after gathering.
  const at::Tensor Wk = W.index_select(1, kc).to(ct);      // (out, k)
  const at::Tensor Hk = H.index_select(1, kc);              // (m, k): the columns of S, one pass
  at::Tensor Hss = Hk.index_select(0, kc).to(ct);           // (k, k): row gathers are contiguous
  const double mean_diag = k ? Hss.diagonal().mean().item<double>() : 0.0;
  double lam = damp * mean_diag;
  if (k == 0 || nr == 0 || mean_diag <= 0.0) {
    return {Wk.to(W.scalar_type()).contiguous(), make_report(kPathTrivial, lam, 0)};
  }
  // B = W[:, ~S] H[~S, S] (no symmetry of H assumed, exactly as the reference).
  const at::Tensor Hrs = Hk.index_select(0, removed).to(ct);  // (nr, k)
  const at::Tensor B = at::matmul(W.index_select(1, removed).to(ct), Hrs);  // (out, k)
  const at::Tensor Bt = B.t();  // (k, out), column-major: what LAPACK wants, no copy

  auto damped = [&](double l) {
    at::Tensor A = Hss.clone();
    A.diagonal().add_(l);
    return A;
  };
  int64_t attempts = 0;
  for (int64_t attempt = 0; attempt <= max_retries; ++attempt) {
    ++attempts;
    auto [L, info] = at::linalg_cholesky_ex(damped(lam));
    if (info.item<int>() == 0) {
      at::Tensor corr = at::cholesky_solve(Bt, L).t();  // (out, k)
      if (at::isfinite(corr).all().item<bool>()) {
        const int path = attempt == 0 ? kPathCholesky : kPathCholeskyRetry;
        return {corr.add_(Wk).to(W.scalar_type()).contiguous(), make_report(path, lam, attempts)};
      }
    }
    lam = next_lambda(lam, mean_diag);
  }
  // Eigen fallback: pseudo-inverse with eigenvalues below a relative floor dropped.
  auto [evals, evecs] = at::linalg_eigh(damped(lam));
  const double eps = use_fp64 ? std::numeric_limits<double>::epsilon() : std::numeric_limits<float>::epsilon();
  const at::Tensor floor = evals.abs().max() * static_cast<double>(k) * eps;
  const at::Tensor inv = at::where(evals > floor, evals.clamp_min(floor).reciprocal(), at::zeros_like(evals));
  at::Tensor corr = at::matmul(at::matmul(B, evecs).mul_(inv), evecs.t());
  return {corr.add_(Wk).to(W.scalar_type()).contiguous(), make_report(kPathEigen, lam, attempts + 1)};
}

}  // namespace
}  // namespace fasp_ext

TORCH_LIBRARY_IMPL(fasp_ext, CPU, m) {
  m.impl("restore", &fasp_ext::restore_cpu);
}
