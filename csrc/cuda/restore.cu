// CUDA kernel of fasp_ext::restore:
//   W' = W[:, S] + W[:, R] H[R, S] (H[S, S] + lambda I)^-1,  lambda = damp * mean(diag H[S, S]),
// R the removed columns, the same algorithm as the CPU kernel (csrc/cpu/restore.cpp): with
// A = H[S, S] + lambda I factored by cuSOLVER potrf on the current stream, potrs takes
// min(|R|, out) right-hand sides:
//   |R| <= out:  Q = H[R, S] A^-1,  W' = W[:, S] + W[:, R] Q   (one GEMM)
//   |R| >  out:  B = W[:, R] H[R, S],  W' = W[:, S] + B A^-1
// The value checks (kept in range and increasing, W and H finite) and mean(diag H[S, S]) come back
// in one device-to-host copy; each factorisation attempt costs one more. On failure lambda is
// raised with next_lambda (fasp_math.h) up to max_retries times, then an eigen-based
// pseudo-inverse exactly as in reference.py. A non-positive mean diagonal skips the solve (path
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

// One handle per (thread, device), created on first use and deliberately never destroyed (as
// torch does for its pools: destroying at exit can race the CUDA context teardown).
cusolverDnHandle_t solver_handle() {
  thread_local std::unordered_map<int, cusolverDnHandle_t> handles;
  const int dev = c10::cuda::current_device();
  auto it = handles.find(dev);
  if (it == handles.end()) {
    cusolverDnHandle_t h = nullptr;
    FASP_CUSOLVER_CHECK(cusolverDnCreate(&h));
    it = handles.emplace(dev, h).first;
  }
  FASP_CUSOLVER_CHECK(cusolverDnSetStream(it->second, at::cuda::getCurrentCUDAStream()));
  return it->second;
}

template <typename T>
__global__ void add_diagonal_kernel(T* __restrict__ A, int64_t k, T lam) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < k;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A[i * k + i] += lam;
  }
}

// A (k x k, contiguous) += lam * I, with lam rounded to A's dtype first like `lam * eye` in torch.
void add_diagonal(at::Tensor& A, double lam) {
  const int64_t k = A.size(0);
  if (k == 0) return;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((k + threads - 1) / threads, 1024));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (A.scalar_type() == at::kDouble) {
    add_diagonal_kernel<double><<<blocks, threads, 0, stream>>>(A.data_ptr<double>(), k, lam);
  } else {
    add_diagonal_kernel<float>
        <<<blocks, threads, 0, stream>>>(A.data_ptr<float>(), k, static_cast<float>(lam));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// In-place Cholesky of a contiguous symmetric (k x k) matrix. Row-major lower triangle (what
// torch.linalg.cholesky reads) is the column-major upper triangle, hence CUBLAS_FILL_MODE_UPPER.
void potrf(cusolverDnHandle_t h, at::Tensor& A, at::Tensor& info) {
  const int k = static_cast<int>(A.size(0));
  int lwork = 0;
  if (A.scalar_type() == at::kDouble) {
    FASP_CUSOLVER_CHECK(cusolverDnDpotrf_bufferSize(h, CUBLAS_FILL_MODE_UPPER, k,
                                                    A.data_ptr<double>(), k, &lwork));
    at::Tensor work = at::empty({std::max(lwork, 1)}, A.options());
    FASP_CUSOLVER_CHECK(cusolverDnDpotrf(h, CUBLAS_FILL_MODE_UPPER, k, A.data_ptr<double>(), k,
                                         work.data_ptr<double>(), lwork, info.data_ptr<int>()));
  } else {
    FASP_CUSOLVER_CHECK(cusolverDnSpotrf_bufferSize(h, CUBLAS_FILL_MODE_UPPER, k,
                                                    A.data_ptr<float>(), k, &lwork));
    at::Tensor work = at::empty({std::max(lwork, 1)}, A.options());
    FASP_CUSOLVER_CHECK(cusolverDnSpotrf(h, CUBLAS_FILL_MODE_UPPER, k, A.data_ptr<float>(), k,
                                         work.data_ptr<float>(), lwork, info.data_ptr<int>()));
  }
}

// Solves (U^T U) X = R in place for the row-major (nrhs x k) R, i.e. the column-major (k x nrhs)
// right-hand sides: row-major X = R (H[S,S] + lambda I)^-1 since the matrix is symmetric.
void potrs(cusolverDnHandle_t h, const at::Tensor& U, at::Tensor& R, at::Tensor& info) {
  const int k = static_cast<int>(U.size(0));
  const int nrhs = static_cast<int>(R.size(0));
  if (nrhs == 0) return;
  if (U.scalar_type() == at::kDouble) {
    FASP_CUSOLVER_CHECK(cusolverDnDpotrs(h, CUBLAS_FILL_MODE_UPPER, k, nrhs,
                                         U.const_data_ptr<double>(), k, R.data_ptr<double>(), k,
                                         info.data_ptr<int>()));
  } else {
    FASP_CUSOLVER_CHECK(cusolverDnSpotrs(h, CUBLAS_FILL_MODE_UPPER, k, nrhs,
                                         U.const_data_ptr<float>(), k, R.data_ptr<float>(), k,
                                         info.data_ptr<int>()));
  }
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

// The data-dependent checks and mean(diag H[S, S]), gathered into one device-to-host copy.
// Indices are clamped for the diagonal gather so that a bad `kept` is reported, not a device assert.
double check_values_and_mean_diag(const at::Tensor& W, const at::Tensor& H, const at::Tensor& kept,
                                  int64_t m, at::ScalarType ct) {
  const auto dopts = kept.options().dtype(at::kDouble);
  at::Tensor zero = at::zeros({}, dopts);
  const bool nonempty = kept.numel() > 0;
  at::Tensor mean_diag =
      nonempty ? H.diagonal().index_select(0, kept.clamp(0, m - 1)).to(ct).mean().to(at::kDouble)
               : zero;
  at::Tensor flags =
      at::stack({nonempty ? kept.min().to(at::kDouble) : zero, nonempty ? kept.max().to(at::kDouble) : zero,
                 kept.numel() > 1 ? (kept.slice(0, 1).le(kept.slice(0, 0, -1))).any().to(at::kDouble) : zero,
                 at::isfinite(W).all().to(at::kDouble), at::isfinite(H).all().to(at::kDouble), mean_diag})
          .cpu();  // HOST_SYNC: restore.checks
  const double* f = flags.const_data_ptr<double>();
  if (nonempty) {
    TORCH_CHECK_VALUE(f[0] >= 0 && f[1] < static_cast<double>(m), "restore: kept indices must lie in [0, ", m,
                      ")");
    TORCH_CHECK_VALUE(f[2] == 0, "restore: kept must be strictly increasing (sorted, no duplicates)");
  }
  TORCH_CHECK_VALUE(f[3] != 0, "restore: W contains NaN or Inf");
  TORCH_CHECK_VALUE(f[4] != 0, "restore: H contains NaN or Inf");
  return f[5];
}

at::Tensor make_report(int path, double lam, int64_t attempts) {
  return at::tensor({static_cast<double>(path), lam, static_cast<double>(attempts)},
                    at::TensorOptions().dtype(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor> restore_cuda(const at::Tensor& W, const at::Tensor& H,
                                                const at::Tensor& kept, double damp, bool use_fp64,
                                                int64_t max_retries) {
  const int64_t m = check_args(W, H, kept, damp, max_retries);
  const c10::cuda::CUDAGuard guard(W.device());
  const auto ct = use_fp64 ? at::kDouble : at::kFloat;
  // mean(diag H[S, S]) in the compute type, as the reference computes it
  const double mean_diag = check_values_and_mean_diag(W, H, kept.contiguous(), m, ct);
  const int64_t k = kept.numel();
  const int64_t out_rows = W.size(0);
  const int64_t r = m - k;

  at::Tensor Wk = W.index_select(1, kept).to(ct);
  if (k == 0 || r == 0) {
    return {Wk.to(W.scalar_type()).contiguous(), make_report(kPathTrivial, damp * mean_diag, 0)};
  }
  if (!(mean_diag > 0.0)) {  // no signal on the kept columns: nothing to fit
    return {Wk.to(W.scalar_type()).contiguous(), make_report(kPathSkipped, 0.0, 0)};
  }
  double lam = damp * mean_diag;
  TORCH_CHECK(k <= INT_MAX && out_rows <= INT_MAX && r <= INT_MAX, "restore: matrix too large for cuSOLVER");

  // Removed columns, ascending; kept is validated strictly increasing so there are m - k of them.
  at::Tensor mask = at::ones({m}, W.options().dtype(at::kBool));
  mask.index_fill_(0, kept, false);
  at::Tensor removed = at::nonzero_static(mask, r).flatten();
  at::Tensor Hs = H.index_select(1, kept);                         // H[:, S]
  at::Tensor Hss = Hs.index_select(0, kept).to(ct);                // (k, k)
  at::Tensor Hrs = Hs.index_select(0, removed).to(ct);             // (|R|, k)
  at::Tensor Wr = W.index_select(1, removed).to(ct);               // (out, |R|)
  const bool rhs_removed = r <= out_rows;
  // Right-hand sides, row-major (nrhs x k); potrs overwrites its copy.
  const at::Tensor rhs = rhs_removed ? Hrs : at::mm(Wr, Hrs);
  auto finish = [&](const at::Tensor& X) {
    return rhs_removed ? at::addmm(Wk, Wr, X) : Wk.add_(X);
  };

  cusolverDnHandle_t handle = solver_handle();
  at::Tensor info = at::zeros({2}, W.options().dtype(at::kInt));
  int64_t attempts = 0;
  for (int64_t attempt = 0; attempt <= max_retries; ++attempt) {
    ++attempts;
    at::Tensor A = Hss.clone(at::MemoryFormat::Contiguous);
    add_diagonal(A, lam);
    at::Tensor info_f = info.slice(0, 0, 1), info_s = info.slice(0, 1, 2);
    potrf(handle, A, info_f);
    at::Tensor X = rhs.clone(at::MemoryFormat::Contiguous);
    potrs(handle, A, X, info_s);  // harmless garbage when potrf failed; saves a sync
    // One host sync per attempt: factorisation status and finiteness of the solve.
    at::Tensor st = at::cat({info.to(at::kInt), at::isfinite(X).all().to(at::kInt).reshape({1})})
                        .cpu();  // HOST_SYNC: restore.attempt
    const int* sp = st.const_data_ptr<int>();
    if (sp[0] == 0) {
      TORCH_CHECK(sp[1] == 0, "restore: cuSOLVER potrs reported invalid argument ", -sp[1]);
      if (sp[2] != 0) {
        const int path = attempt == 0 ? kPathCholesky : kPathCholeskyRetry;
        return {finish(X).to(W.scalar_type()).contiguous(), make_report(path, lam, attempts)};
      }
    }
    lam = next_lambda(lam, mean_diag);
  }

  // Eigen fallback: pseudo-inverse with eigenvalues below a relative floor dropped.
  at::Tensor A = Hss.clone(at::MemoryFormat::Contiguous);
  add_diagonal(A, lam);
  auto [evals, evecs] = at::linalg_eigh(A);  // HOST_SYNC: restore.eigen
  const double eps = use_fp64 ? std::numeric_limits<double>::epsilon()
                              : static_cast<double>(std::numeric_limits<float>::epsilon());
  at::Tensor floor = evals.abs().max().mul(k).mul(eps);
  at::Tensor inv = at::where(evals.gt(floor), evals.clamp_min(floor).reciprocal(),
                             at::zeros_like(evals));
  at::Tensor X = at::mm(at::mm(rhs, evecs).mul(inv), evecs.t());
  return {finish(X).to(W.scalar_type()).contiguous(), make_report(kPathEigen, lam, attempts + 1)};
}

}  // namespace
}  // namespace cuda
}  // namespace fasp_ext

TORCH_LIBRARY_IMPL(fasp_ext, CUDA, m) {
  m.impl("restore", &fasp_ext::cuda::restore_cuda);
}
