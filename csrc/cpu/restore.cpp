// CPU kernel of fasp_ext::restore (semantics: fasp_ext/reference.py).
//   W' = W[:, S] + W[:, R] H[R, S] (H[S, S] + lambda I)^-1,  lambda = damp * mean(diag H[S, S]),
// R the removed columns (~S). With A = H[S, S] + lambda I (Cholesky A = U^T U, LAPACK potrf/potrs)
// the solve takes min(|R|, out) right-hand sides:
//   |R| <= out:  Q = H[R, S] A^-1   (|R| right-hand sides),  W' = W[:, S] + W[:, R] Q   (one GEMM)
//   |R| >  out:  B = W[:, R] H[R, S] (one GEMM),              W' = W[:, S] + B A^-1    (out RHS)
// Both give the same W' (A is read from its lower triangle as torch.linalg.cholesky does; H is not
// assumed symmetric). One pass over W and one over H gather the blocks in the compute type and
// check that both are finite (O(out m + m^2), done once); nothing else touches O(m^2) data.
// When the factorisation fails (or the solve is not finite) lambda is raised with next_lambda() up
// to max_retries times, then an eigen-decomposition pseudo-inverse is used. A non-positive mean
// diagonal of H[S, S] (no calibration signal on the kept columns) skips the solve: W[:, S] with
// path "skipped". Returns (W' in W's dtype, contiguous; report float64 CPU [path, lambda, attempts]).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../fasp_math.h"

// LAPACK (LP64) as exported by libtorch_cpu (MKL or OpenBLAS inside the official wheels). Weak, so a
// torch without them still loads the library: the kernel then uses ATen's cholesky / cholesky_solve
// (also when the environment variable FASP_EXT_RESTORE_ATEN is set, which lets the tests cover it).
extern "C" {
void spotrf_(const char* uplo, const int* n, float* a, const int* lda, int* info) __attribute__((weak));
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info) __attribute__((weak));
void spotrs_(const char* uplo, const int* n, const int* nrhs, const float* a, const int* lda, float* b,
             const int* ldb, int* info) __attribute__((weak));
void dpotrs_(const char* uplo, const int* n, const int* nrhs, const double* a, const int* lda, double* b,
             const int* ldb, int* info) __attribute__((weak));
}

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

at::Tensor make_report(int path, double lam, int64_t attempts) {
  at::Tensor r = at::empty({3}, at::TensorOptions().dtype(at::kDouble));
  double* p = r.mutable_data_ptr<double>();
  p[0] = path;
  p[1] = lam;
  p[2] = static_cast<double>(attempts);
  return r;
}

// True when some entry is NaN or Inf (exponent bits all ones). An integer max over the masked
// exponents: vectorises without fast-math, unlike a floating-point reduction.
template <typename T>
inline bool has_nonfinite(const T* p, int64_t n) {
  uint32_t acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = static_cast<float>(p[i]);
    uint32_t b;
    std::memcpy(&b, &x, sizeof b);
    const uint32_t e = b & 0x7f800000u;
    acc = acc > e ? acc : e;
  }
  return acc == 0x7f800000u;
}
template <>
inline bool has_nonfinite<double>(const double* p, int64_t n) {
  uint64_t acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t b;
    std::memcpy(&b, p + i, sizeof b);
    const uint64_t e = b & 0x7ff0000000000000ull;
    acc = acc > e ? acc : e;
  }
  return acc == 0x7ff0000000000000ull;
}

// Column routing: pos[j] = t >= 0 when j is the t-th kept column, -(t + 1) when the t-th removed one.
struct Split {
  std::vector<int64_t> kept, removed, pos;
};

Split split_columns(const at::Tensor& kc, int64_t m) {
  Split sp;
  const int64_t k = kc.numel();
  const int64_t* kp = kc.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK_VALUE(kp[i] >= 0 && kp[i] < m, "restore: kept indices must lie in [0, ", m, ")");
  }
  for (int64_t i = 1; i < k; ++i) {
    TORCH_CHECK_VALUE(kp[i] > kp[i - 1], "restore: kept must be strictly increasing (sorted, no duplicates)");
  }
  sp.kept.assign(kp, kp + k);
  sp.pos.assign(static_cast<size_t>(m), 0);
  sp.removed.reserve(static_cast<size_t>(m - k));
  int64_t t = 0;
  for (int64_t j = 0; j < m; ++j) {
    if (t < k && kp[t] == j) {
      sp.pos[j] = t++;
    } else {
      sp.pos[j] = -static_cast<int64_t>(sp.removed.size()) - 1;
      sp.removed.push_back(j);
    }
  }
  return sp;
}

// Wk = W[:, S], Wr = W[:, R] in the compute type; returns false if W holds a NaN or Inf.
template <typename TW, typename TC>
bool gather_w(const TW* W, int64_t rows, int64_t m, const Split& sp, TC* Wk, TC* Wr) {
  const int64_t k = static_cast<int64_t>(sp.kept.size()), r = static_cast<int64_t>(sp.removed.size());
  std::atomic<bool> bad{false};
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(m, 1)), [&](int64_t b, int64_t e) {
    bool nf = false;
    for (int64_t i = b; i < e; ++i) {
      const TW* row = W + i * m;
      nf |= has_nonfinite(row, m);
      TC* dk = Wk + i * k;
      for (int64_t t = 0; t < k; ++t) dk[t] = static_cast<TC>(row[sp.kept[t]]);
      TC* dr = Wr + i * r;
      for (int64_t t = 0; t < r; ++t) dr[t] = static_cast<TC>(row[sp.removed[t]]);
    }
    if (nf) bad = true;
  });
  return !bad;
}

// Rows of H: a row of S goes (at the columns S) to A, a row of R to Hrs (at the columns S), when
// that destination is given. With check, every row is also tested for NaN/Inf (returns false).
template <typename TH, typename TC>
bool gather_h(const TH* H, int64_t m, const Split& sp, TC* A, TC* Hrs, bool check) {
  const int64_t k = static_cast<int64_t>(sp.kept.size());
  std::atomic<bool> bad{false};
  at::parallel_for(0, m, std::max<int64_t>(1, 32768 / std::max<int64_t>(m, 1)), [&](int64_t b, int64_t e) {
    bool nf = false;
    for (int64_t i = b; i < e; ++i) {
      const TH* row = H + i * m;
      const int64_t p = sp.pos[i];
      TC* dst = p >= 0 ? (A ? A + p * k : nullptr) : (Hrs ? Hrs + (-p - 1) * k : nullptr);
      if (!dst && !check) continue;
      if (check) nf |= has_nonfinite(row, m);
      if (dst) {
        for (int64_t t = 0; t < k; ++t) dst[t] = static_cast<TC>(row[sp.kept[t]]);
      }
    }
    if (nf) bad = true;
  });
  return !bad;
}

template <typename TC>
bool all_finite(const at::Tensor& t) {
  const TC* p = t.const_data_ptr<TC>();
  const int64_t n = t.numel();
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, 65536, [&](int64_t b, int64_t e) {
    if (has_nonfinite(p + b, e - b)) bad = true;
  });
  return !bad;
}

// In-place Cholesky of the contiguous (k x k) A: the row-major lower triangle (what
// torch.linalg.cholesky reads) is LAPACK's column-major upper one. Returns LAPACK's info.
bool use_lapack() { return std::getenv("FASP_EXT_RESTORE_ATEN") == nullptr; }

template <typename TC>
int potrf_inplace(at::Tensor& A) {
  const int n = static_cast<int>(A.size(0));
  int info = 0;
  const char uplo = 'U';
  if (!use_lapack()) {
  } else if constexpr (std::is_same_v<TC, float>) {
    if (spotrf_) {
      spotrf_(&uplo, &n, A.data_ptr<float>(), &n, &info);
      return info;
    }
  } else {
    if (dpotrf_) {
      dpotrf_(&uplo, &n, A.data_ptr<double>(), &n, &info);
      return info;
    }
  }
  auto [L, inf] = at::linalg_cholesky_ex(A);  // ATen fallback: A := L (row-major lower)
  info = inf.item<int>();
  if (info == 0) A.copy_(L);
  return info;
}

// X := X A^-1 for the row-major (nrhs x k) X, given potrf_inplace(A) (A symmetric).
template <typename TC>
void potrs_inplace(const at::Tensor& A, at::Tensor& X) {
  const int n = static_cast<int>(A.size(0)), nrhs = static_cast<int>(X.size(0));
  if (nrhs == 0) return;
  int info = 0;
  const char uplo = 'U';
  if (!use_lapack()) {
  } else if constexpr (std::is_same_v<TC, float>) {
    if (spotrs_) {
      spotrs_(&uplo, &n, &nrhs, A.const_data_ptr<float>(), &n, X.data_ptr<float>(), &n, &info);
      TORCH_CHECK(info == 0, "restore: LAPACK potrs reported invalid argument ", -info);
      return;
    }
  } else {
    if (dpotrs_) {
      dpotrs_(&uplo, &n, &nrhs, A.const_data_ptr<double>(), &n, X.data_ptr<double>(), &n, &info);
      TORCH_CHECK(info == 0, "restore: LAPACK potrs reported invalid argument ", -info);
      return;
    }
  }
  X.copy_(at::cholesky_solve(X.t(), A.tril()).t());  // ATen fallback (A holds L row-major lower)
}

template <typename TW, typename TH, typename TC>
std::tuple<at::Tensor, at::Tensor> restore_impl(const at::Tensor& Wc, const at::Tensor& Hc, const Split& sp,
                                                double damp, int64_t max_retries, at::ScalarType out_type) {
  const int64_t out = Wc.size(0), m = Wc.size(1);
  const int64_t k = static_cast<int64_t>(sp.kept.size()), r = static_cast<int64_t>(sp.removed.size());
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<TC>::value);
  const TW* Wp = Wc.const_data_ptr<TW>();
  const TH* Hp = Hc.const_data_ptr<TH>();

  at::Tensor Wk = at::empty({out, k}, opts), Wr = at::empty({out, r}, opts);
  const bool w_ok = gather_w<TW, TC>(Wp, out, m, sp, Wk.data_ptr<TC>(), Wr.data_ptr<TC>());
  TORCH_CHECK_VALUE(w_ok, "restore: W contains NaN or Inf");
  const bool trivial = k == 0 || r == 0;
  at::Tensor A = at::empty({trivial ? 0 : k, trivial ? 0 : k}, opts);
  at::Tensor Hrs = at::empty({trivial ? 0 : r, k}, opts);  // H[R, S], row-major
  const bool h_ok = gather_h<TH, TC>(Hp, m, sp, trivial ? nullptr : A.data_ptr<TC>(),
                                     trivial ? nullptr : Hrs.data_ptr<TC>(), true);
  TORCH_CHECK_VALUE(h_ok, "restore: H contains NaN or Inf");
  auto result = [&](const at::Tensor& o) { return o.to(out_type).contiguous(); };
  if (trivial) {
    double lam = 0.0;
    if (k > 0) {  // the reported lambda stays damp * mean(diag H[S, S]) as the reference computes it
      double sum = 0.0;
      for (int64_t t = 0; t < k; ++t) sum += static_cast<double>(Hp[sp.kept[t] * m + sp.kept[t]]);
      lam = damp * static_cast<double>(static_cast<TC>(sum / static_cast<double>(k)));
    }
    return {result(Wk), make_report(kPathTrivial, lam, 0)};
  }
  TC* Ap = A.data_ptr<TC>();
  double diag_sum = 0.0;
  for (int64_t t = 0; t < k; ++t) diag_sum += static_cast<double>(Ap[t * k + t]);
  const double mean_diag = static_cast<double>(static_cast<TC>(diag_sum / static_cast<double>(k)));
  if (!(mean_diag > 0.0)) {  // no signal on the kept columns: nothing to fit
    return {result(Wk), make_report(kPathSkipped, 0.0, 0)};
  }
  double lam = damp * mean_diag;
  const bool rhs_removed = r <= out;  // solve with |R| right-hand sides, else with out
  auto refill_A = [&]() { gather_h<TH, TC>(Hp, m, sp, Ap, nullptr, false); };
  auto add_diag = [&](double l) {
    const TC lt = static_cast<TC>(l);
    for (int64_t t = 0; t < k; ++t) Ap[t * k + t] += lt;
  };
  // The right-hand sides, row-major (nrhs x k); rebuilt only if a finished solve was not finite.
  bool rhs_fresh = true;
  auto make_rhs = [&]() -> at::Tensor {
    if (rhs_removed) {
      if (!rhs_fresh) gather_h<TH, TC>(Hp, m, sp, nullptr, Hrs.data_ptr<TC>(), false);
      rhs_fresh = false;
      return Hrs;
    }
    return at::mm(Wr, Hrs);  // B = W[:, R] H[R, S]
  };
  auto finish = [&](const at::Tensor& X) {  // X = Q (|R| x k) or B A^-1 (out x k)
    return rhs_removed ? Wk.addmm_(Wr, X) : Wk.add_(X);  // Wk is this op's own gather
  };

  int64_t attempts = 0;
  for (int64_t attempt = 0; attempt <= max_retries; ++attempt) {
    ++attempts;
    if (attempt > 0) refill_A();
    add_diag(lam);
    if (potrf_inplace<TC>(A) == 0) {
      at::Tensor X = make_rhs();
      potrs_inplace<TC>(A, X);
      if (all_finite<TC>(X)) {
        const int path = attempt == 0 ? kPathCholesky : kPathCholeskyRetry;
        return {result(finish(X)), make_report(path, lam, attempts)};
      }
    }
    lam = next_lambda(lam, mean_diag);
  }
  // Eigen fallback: pseudo-inverse with eigenvalues below a relative floor dropped.
  refill_A();
  add_diag(lam);
  auto [evals, evecs] = at::linalg_eigh(A);
  const double eps = std::numeric_limits<TC>::epsilon();
  const at::Tensor floor = evals.abs().max() * static_cast<double>(k) * eps;
  const at::Tensor inv = at::where(evals > floor, evals.clamp_min(floor).reciprocal(), at::zeros_like(evals));
  const at::Tensor rhs = make_rhs();
  const at::Tensor X = at::matmul(at::matmul(rhs, evecs).mul_(inv), evecs.t());
  return {result(finish(X)), make_report(kPathEigen, lam, attempts + 1)};
}

// The C++ signature must equal the CUDA kernel's (csrc/cuda): the dispatcher checks it at load.
std::tuple<at::Tensor, at::Tensor> restore_cpu(const at::Tensor& W, const at::Tensor& H, const at::Tensor& kept,
                                               double damp, bool use_fp64, int64_t max_retries) {
  const int64_t m = check_restore_args(W, H, kept, damp, max_retries);
  TORCH_CHECK_VALUE(W.device().is_cpu(), "restore: W must be a CPU tensor for the CPU kernel");
  const Split sp = split_columns(kept.contiguous(), m);
  const at::Tensor Wc = W.contiguous(), Hc = H.contiguous();
  const auto wt = W.scalar_type();
  std::tuple<at::Tensor, at::Tensor> res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wt, "restore_cpu", [&] {
    using TW = scalar_t;
    if (H.scalar_type() == at::kDouble) {
      res = use_fp64 ? restore_impl<TW, double, double>(Wc, Hc, sp, damp, max_retries, wt)
                     : restore_impl<TW, double, float>(Wc, Hc, sp, damp, max_retries, wt);
    } else {
      res = use_fp64 ? restore_impl<TW, float, double>(Wc, Hc, sp, damp, max_retries, wt)
                     : restore_impl<TW, float, float>(Wc, Hc, sp, damp, max_retries, wt);
    }
  });
  return res;
}

}  // namespace
}  // namespace fasp_ext

TORCH_LIBRARY_IMPL(fasp_ext, CPU, m) {
  m.impl("restore", &fasp_ext::restore_cpu);
}
