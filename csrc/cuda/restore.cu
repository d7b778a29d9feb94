// CUDA kernel of fasp_ext::restore:
//   W' = W[:, S] + W[:, R] H[R, S] (H[S, S] + lambda I)^-1,  lambda = damp * mean(diag H[S, S]),
// R the removed columns, the same algorithm as the CPU kernel (csrc/cpu/restore.cpp): with
// A = H[S, S] + lambda I factored by cuSOLVER potrf on the current stream, potrs takes
// min(|R|, out) right-hand sides:
//   |R| <= out:  Q = H[R, S] A^-1,  W' = W[:, S] + W[:, R] Q   (one GEMM)
//   |R| >  out:  B = W[:, R] H[R, S],  W' = W[:, S] + B A^-1
// One host wait per call on the common path: the value checks (kept in range and increasing, W and
// H finite), mean(diag H[S, S]) and the first factorisation's status come back in one
// device-to-host copy, the first attempt being queued with lambda computed on the device. The
// gathers of H[S, S] and of the right-hand sides are the solver's own buffers (factored and solved
// in place); cuSOLVER's 64-bit API (cusolverDnXpotrf/Xpotrs, lower triangle, as torch's cholesky)
// takes its workspace from the caching allocator. On failure lambda is raised with next_lambda
// (fasp_math.h) up to max_retries times (one wait each), then an eigen-based pseudo-inverse
// exactly as in reference.py. A non-positive mean diagonal skips the solve (path
// "skipped"). Computed in fp32 (fp64 if use_fp64), returned in W's dtype with a float64 CPU
// report [path, lambda, attempts].
//
// cuSOLVER handle: at::cuda::getCurrentCUDASolverDnHandle() lives in libtorch_cuda_linalg.so
// (lazily loaded by torch, not linked by extensions), so the op keeps its own cusolverDn handle per
// thread and device, bound to the current stream before each use.
#include <torch/library.h>

#include <charconv>
#include <climits>
#include <cmath>
#include <limits>
#include <unordered_map>
#include <vector>

#include <cusolverDn.h>

#include "common.cuh"

#define FASP_CUSOLVER_CHECK(expr)                                                            \
  do {                                                                                       \
    cusolverStatus_t _st = (expr);                                                           \
    TORCH_CHECK(_st == CUSOLVER_STATUS_SUCCESS, "fasp_ext: cuSOLVER call failed: " #expr     \
                " returned status ", static_cast<int>(_st));                                 \
  } while (0)

namespace fasp_ext {
namespace cuda {
namespace {

// One handle (and one 64-bit API parameter set) per (thread, device), created on first use and
// deliberately never destroyed (as torch does for its pools: destroying at exit can race the CUDA
// context teardown).
struct Solver {
  cusolverDnHandle_t handle = nullptr;
  cusolverDnParams_t params = nullptr;
};

Solver solver() {
  thread_local std::unordered_map<int, Solver> solvers;
  const int dev = c10::cuda::current_device();
  auto it = solvers.find(dev);
  if (it == solvers.end()) {
    Solver s;
    FASP_CUSOLVER_CHECK(cusolverDnCreate(&s.handle));
    FASP_CUSOLVER_CHECK(cusolverDnCreateParams(&s.params));
    it = solvers.emplace(dev, s).first;
  }
  FASP_CUSOLVER_CHECK(cusolverDnSetStream(it->second.handle, at::cuda::getCurrentCUDAStream()));
  return it->second;
}

template <typename T>
__global__ void add_diagonal_kernel(T* __restrict__ A, int64_t k, T lam) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A[i * k + i] += lam;
  }
}

// The same with lambda = damp * (*mean_diag) read on the device (a double, rounded to T), so the
// first factorisation is queued before the host knows mean(diag H[S, S]).
template <typename T>
__global__ void add_diagonal_scaled_kernel(T* __restrict__ A, int64_t k, const double* __restrict__ mean_diag,
                                           double damp) {
  const T lam = static_cast<T>(damp * *mean_diag);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A[i * k + i] += lam;
  }
}

// A (k x k, contiguous) += lam * I, with lam rounded to A's dtype first like `lam * eye` in torch;
// lam = damp * mean_diag[0] (a device double) when mean_diag is given, else `lam`.
void add_diagonal(at::Tensor& A, double lam, const at::Tensor* mean_diag = nullptr, double damp = 0.0) {
  const int64_t k = A.size(0);
  if (k == 0) return;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((k + threads - 1) / threads, 1024));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (mean_diag != nullptr) {
    const double* md = mean_diag->const_data_ptr<double>();
    if (A.scalar_type() == at::kDouble) {
      add_diagonal_scaled_kernel<double><<<blocks, threads, 0, stream>>>(A.data_ptr<double>(), k, md, damp);
    } else {
      add_diagonal_scaled_kernel<float><<<blocks, threads, 0, stream>>>(A.data_ptr<float>(), k, md, damp);
    }
  } else if (A.scalar_type() == at::kDouble) {
    add_diagonal_kernel<double><<<blocks, threads, 0, stream>>>(A.data_ptr<double>(), k, lam);
  } else {
    add_diagonal_kernel<float>
        <<<blocks, threads, 0, stream>>>(A.data_ptr<float>(), k, static_cast<float>(lam));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// In-place Cholesky of a contiguous symmetric (k x k) matrix with the 64-bit API (what torch's
// cholesky uses), its workspace from the caching allocator. The row-major matrix is its own
// column-major transpose; the column-major lower triangle is factored, as torch does.
void potrf(const Solver& s, at::Tensor& A, at::Tensor& info) {
  const int64_t k = A.size(0);
  const cudaDataType dt = A.scalar_type() == at::kDouble ? CUDA_R_64F : CUDA_R_32F;
  size_t dev_bytes = 0, host_bytes = 0;
  FASP_CUSOLVER_CHECK(cusolverDnXpotrf_bufferSize(s.handle, s.params, CUBLAS_FILL_MODE_LOWER, k, dt,
                                                  A.const_data_ptr(), k, dt, &dev_bytes, &host_bytes));
  at::Tensor work = at::empty({static_cast<int64_t>(std::max<size_t>(dev_bytes, 1))},
                              A.options().dtype(at::kByte));
  std::vector<char> host_work(std::max<size_t>(host_bytes, 1));
  FASP_CUSOLVER_CHECK(cusolverDnXpotrf(s.handle, s.params, CUBLAS_FILL_MODE_LOWER, k, dt, A.data_ptr(), k, dt,
                                       work.data_ptr(), dev_bytes, host_work.data(), host_bytes,
                                       info.data_ptr<int>()));
}

// Solves (L L^T) X = R in place for the row-major (nrhs x k) R, i.e. the column-major (k x nrhs)
// right-hand sides: row-major X = R (H[S,S] + lambda I)^-1 since the matrix is symmetric.
void potrs(const Solver& s, const at::Tensor& L, at::Tensor& R, at::Tensor& info) {
  const int64_t k = L.size(0);
  const int64_t nrhs = R.size(0);
  if (nrhs == 0) return;
  const cudaDataType dt = L.scalar_type() == at::kDouble ? CUDA_R_64F : CUDA_R_32F;
  FASP_CUSOLVER_CHECK(cusolverDnXpotrs(s.handle, s.params, CUBLAS_FILL_MODE_LOWER, k, nrhs, dt,
                                       L.const_data_ptr(), k, dt, R.data_ptr(), k, info.data_ptr<int>()));
}

// Python's repr of a float, for messages identical to reference.py's.
std::string py_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), x);
  std::string r(buf, res.ptr);
  if (r.find_first_of(".e") == std::string::npos) r += ".0";
  return r;
}

int64_t check_args(const at::Tensor& W, const at::Tensor& H, const at::Tensor& kept, double damp,
                   int64_t max_retries) {
  TORCH_CHECK_VALUE(W.dim() == 2, "restore: W must be 2-D (out, m), got ", W.dim(), "-D");
  const auto wt = W.scalar_type();
  TORCH_CHECK_VALUE(wt == at::kFloat || wt == at::kHalf || wt == at::kBFloat16 || wt == at::kDouble,
                    "restore: W must be a floating tensor, got ", py_dtype(wt));
  const int64_t m = W.size(1);
  TORCH_CHECK_VALUE(H.dim() == 2 && H.size(0) == m && H.size(1) == m, "restore: H must be (", m,
                    ", ", m, ") to match W's columns, got ", py_shape(H.sizes()));
  TORCH_CHECK_VALUE(H.scalar_type() == at::kFloat || H.scalar_type() == at::kDouble,
                    "restore: H must be float32 or float64, got ", py_dtype(H.scalar_type()));
  TORCH_CHECK_VALUE(kept.scalar_type() == at::kLong && kept.dim() == 1,
                    "restore: kept must be a 1-D int64 tensor, got ", py_dtype(kept.scalar_type()),
                    " ", kept.dim(), "-D");
  TORCH_CHECK_VALUE(kept.size(0) <= m, "restore: kept has ", kept.size(0),
                    " entries but W has only m=", m, " columns");
  TORCH_CHECK_VALUE(H.device() == W.device(), "restore: H is on ", py_device(H.device()),
                    " but W is on ", py_device(W.device()));
  TORCH_CHECK_VALUE(kept.device() == W.device(), "restore: kept is on ", py_device(kept.device()),
                    " but W is on ", py_device(W.device()));
  TORCH_CHECK_VALUE(damp >= 0.0 && std::isfinite(damp),
                    "restore: damp must be a finite number >= 0, got ", py_float(damp));
  TORCH_CHECK_VALUE(max_retries >= 0, "restore: max_retries must be >= 0, got ", max_retries);
  TORCH_CHECK_VALUE(W.is_cuda(), "restore: W must be a CUDA tensor for the CUDA kernel, got ",
                    py_device(W.device()));
  return m;
}

// The data-dependent checks and mean(diag H[S, S]) on the device, as doubles: [min(kept), max(kept),
// kept not increasing somewhere, W finite, H finite, mean_diag]. Nothing is read here; `ks` is
// kept clamped into range, so a bad `kept` is reported after the one read, never a device assert.
at::Tensor device_checks(const at::Tensor& W, const at::Tensor& H, const at::Tensor& kept,
                         const at::Tensor& ks, at::ScalarType ct) {
  const auto dopts = kept.options().dtype(at::kDouble);
  at::Tensor zero = at::zeros({}, dopts);
  const bool nonempty = kept.numel() > 0;
  at::Tensor mean_diag = nonempty ? H.diagonal().index_select(0, ks).to(ct).mean().to(at::kDouble) : zero;
  return at::stack({nonempty ? kept.min().to(at::kDouble) : zero, nonempty ? kept.max().to(at::kDouble) : zero,
                    kept.numel() > 1 ? (kept.slice(0, 1).le(kept.slice(0, 0, -1))).any().to(at::kDouble) : zero,
                    at::isfinite(W).all().to(at::kDouble), at::isfinite(H).all().to(at::kDouble), mean_diag});
}

// Raises like reference.py on what device_checks found (f: its six values, read back).
void raise_on_checks(const double* f, int64_t m, bool nonempty) {
  if (nonempty) {
    TORCH_CHECK_VALUE(f[0] >= 0 && f[1] < static_cast<double>(m), "restore: kept indices must lie in [0, ", m,
                      ")");
    TORCH_CHECK_VALUE(f[2] == 0, "restore: kept must be strictly increasing (sorted, no duplicates)");
  }
  TORCH_CHECK_VALUE(f[3] != 0, "restore: W contains NaN or Inf");
  TORCH_CHECK_VALUE(f[4] != 0, "restore: H contains NaN or Inf");
}

at::Tensor make_report(int path, double lam, int64_t attempts) {
  return at::tensor({static_cast<double>(path), lam, static_cast<double>(attempts)},
                    at::TensorOptions().dtype(at::kDouble));
}

// One host wait on the common path: the checks, mean(diag H[S, S]), the first factorisation's
// status and the finiteness of its solve come back in one copy, after the whole first attempt is
// queued with lambda computed on the device. A retry (lambda raised) costs one wait more each; a
// non-positive mean diagonal discards the queued work (path "skipped").
std::tuple<at::Tensor, at::Tensor> restore_cuda(const at::Tensor& W, const at::Tensor& H,
                                                const at::Tensor& kept, double damp, bool use_fp64,
                                                int64_t max_retries) {
  const int64_t m = check_args(W, H, kept, damp, max_retries);
  const c10::cuda::CUDAGuard guard(W.device());
  const auto ct = use_fp64 ? at::kDouble : at::kFloat;
  const int64_t k = kept.numel();
  const int64_t out_rows = W.size(0);
  const int64_t r = m - k;
  TORCH_CHECK(k <= INT_MAX && out_rows <= INT_MAX && r <= INT_MAX, "restore: matrix too large");
  const at::Tensor kc = kept.contiguous();
  const at::Tensor ks = k > 0 && m > 0 ? kc.clamp(0, m - 1) : kc;
  const at::Tensor checks = device_checks(W, H, kc, ks, ct);
  at::Tensor Wk = W.index_select(1, ks).to(ct);

  if (k == 0 || r == 0) {
    const at::Tensor f = checks.cpu();  // HOST_SYNC: restore.checks (nothing to solve)
    raise_on_checks(f.const_data_ptr<double>(), m, k > 0);
    return {Wk.to(W.scalar_type()).contiguous(), make_report(kPathTrivial, damp * f.const_data_ptr<double>()[5], 0)};
  }

  // Removed columns, ascending (m - k of them once kept is valid; padded or cut short otherwise,
  // which the checks then report). The gathers write the solver's own buffers: A is factored in
  // place, the right-hand sides solved in place.
  at::Tensor mask = at::ones({m}, W.options().dtype(at::kBool));
  mask.index_fill_(0, ks, false);
  const at::Tensor removed = at::nonzero_static(mask, r, /*fill_value=*/0).flatten();
  const bool rhs_removed = r <= out_rows;
  auto gather_A = [&] {
    at::Tensor A = H.index_select(1, ks).index_select(0, ks).to(ct);
    return A.is_contiguous() ? A : A.contiguous();
  };
  const at::Tensor Wr = W.index_select(1, removed).to(ct);  // (out, |R|)
  auto gather_rhs = [&] {
    at::Tensor Hrs = H.index_select(0, removed).index_select(1, ks).to(ct);  // (|R|, k)
    at::Tensor rhs = rhs_removed ? Hrs : at::mm(Wr, Hrs);
    return rhs.is_contiguous() ? rhs : rhs.contiguous();
  };
  auto finish = [&](const at::Tensor& X) { return rhs_removed ? at::addmm(Wk, Wr, X) : Wk.add_(X); };

  const Solver sol = solver();
  at::Tensor info = at::zeros({2}, W.options().dtype(at::kInt));
  at::Tensor info_f = info.slice(0, 0, 1), info_s = info.slice(0, 1, 2);
  at::Tensor A = gather_A();
  const at::Tensor mean_diag_dev = checks.slice(0, 5, 6);
  add_diagonal(A, 0.0, &mean_diag_dev, damp);
  potrf(sol, A, info_f);
  at::Tensor X = gather_rhs();
  potrs(sol, A, X, info_s);  // harmless garbage when potrf failed; saves a wait
  const at::Tensor first = at::cat({checks, info.to(at::kDouble), at::isfinite(X).all().to(at::kDouble).reshape({1})})
                               .cpu();  // HOST_SYNC: restore.checks (with the first attempt's status)
  const double* f = first.const_data_ptr<double>();
  raise_on_checks(f, m, true);
  const double mean_diag = f[5];
  if (!(mean_diag > 0.0)) {  // no signal on the kept columns: nothing to fit
    return {Wk.to(W.scalar_type()).contiguous(), make_report(kPathSkipped, 0.0, 0)};
  }
  double lam = damp * mean_diag;
  if (f[6] == 0) {
    TORCH_CHECK(f[7] == 0, "restore: cuSOLVER potrs reported invalid argument ", -static_cast<int>(f[7]));
    if (f[8] != 0) return {finish(X).to(W.scalar_type()).contiguous(), make_report(kPathCholesky, lam, 1)};
  }
  int64_t attempts = 1;
  for (int64_t attempt = 1; attempt <= max_retries; ++attempt) {
    lam = next_lambda(lam, mean_diag);
    ++attempts;
    A = gather_A();
    add_diagonal(A, lam);
    potrf(sol, A, info_f);
    X = gather_rhs();
    potrs(sol, A, X, info_s);
    at::Tensor st = at::cat({info, at::isfinite(X).all().to(at::kInt).reshape({1})})
                        .cpu();  // HOST_SYNC: restore.attempt
    const int* sp = st.const_data_ptr<int>();
    if (sp[0] == 0) {
      TORCH_CHECK(sp[1] == 0, "restore: cuSOLVER potrs reported invalid argument ", -sp[1]);
      if (sp[2] != 0) {
        return {finish(X).to(W.scalar_type()).contiguous(), make_report(kPathCholeskyRetry, lam, attempts)};
      }
    }
  }
  lam = next_lambda(lam, mean_diag);

  // Eigen fallback: pseudo-inverse with eigenvalues below a relative floor dropped.
  A = gather_A();
  add_diagonal(A, lam);
  auto [evals, evecs] = at::linalg_eigh(A);  // HOST_SYNC: restore.eigen
  const double eps = use_fp64 ? std::numeric_limits<double>::epsilon()
                              : static_cast<double>(std::numeric_limits<float>::epsilon());
  at::Tensor floor = evals.abs().max().mul(k).mul(eps);
  at::Tensor inv = at::where(evals.gt(floor), evals.clamp_min(floor).reciprocal(),
                             at::zeros_like(evals));
  X = at::mm(at::mm(gather_rhs(), evecs).mul(inv), evecs.t());
  return {finish(X).to(W.scalar_type()).contiguous(), make_report(kPathEigen, lam, attempts + 1)};
}

}  // namespace
}  // namespace cuda
}  // namespace fasp_ext

TORCH_LIBRARY_IMPL(fasp_ext, CUDA, m) {
  m.impl("restore", &fasp_ext::cuda::restore_cuda);
}
