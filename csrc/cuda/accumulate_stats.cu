// CUDA kernels of fasp_ext::accumulate_stats and fasp_ext::accumulate_stats_deferred:
// s += sum over tokens of x^2, H += X^T X (fp32).
//
// The column squared norms are one fused, coalesced, deterministic column reduction
// (common.cuh) into a temporary, whose finiteness is checked on the device; a second tiny kernel
// adds the temporary to s only when every entry is finite, so s is left untouched on error.
// accumulate_stats reads that flag back (its one host wait: it must raise before touching H).
// accumulate_stats_deferred never waits: the reduction ORs a non-finite column sum into the
// caller's `bad` flag (int32, one element, on the device), s stays as it was from the first bad
// batch on, and the caller reads the flag once before using s or H (fasp_ext/calibration.py's
// Stats.reduce), which are not to be trusted once it is set. The Gram goes through
// cublasGemmEx on the current stream with fp32 output and fp32 compute (tensor cores for
// fp16/bf16 inputs, reduced-precision reductions disallowed; fp32 inputs honour
// torch.backends.cuda.matmul.allow_tf32). GEMM rather than SYRK keeps H += X^T X exact in meaning
// even for a non-symmetric H passed in by a caller.
//
// accumulate_stats_lower (CUDA builds only; what the pipeline calls on a GPU) is the deferred op
// with half the Gram's flops: only H's lower triangle (i >= j) receives X^T X, by one GEMM per block
// column of gram_lower_block(m) columns (csrc/fasp_math.h): H[j0:, j0:j0+w] += X[:, j0:]^T X[:, j0:j0+w]
// (the diagonal blocks whole, so some entries above the diagonal change too; the rest of the upper
// triangle is left as it was). H is then valid on and below its diagonal only, and the caller
// mirrors it once, after the last batch, before anything reads it (Stats.reduce, by
// fasp_ext.ops.mirror_lower_). Its plain-torch twin: fasp_ext/reference.py gram_lower_update_.
#include <torch/library.h>

#include <climits>

#include "common.cuh"

namespace fasp_ext {
namespace cuda {
namespace {

__global__ void guarded_add_kernel(float* __restrict__ s, const float* __restrict__ part,
                                   const int* __restrict__ flag, int64_t m) {
  if (*flag != 0) return;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < m;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    s[j] += part[j];
  }
}

void check_args(const at::Tensor& X, const at::Tensor& s, const std::optional<at::Tensor>& H) {
  TORCH_CHECK_VALUE(X.dim() >= 1,
                    "accumulate_stats: X must be a tensor with at least 1 dimension (..., m)");
  const auto xt = X.scalar_type();
  TORCH_CHECK_VALUE(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16,
                    "accumulate_stats: X must be float32, float16 or bfloat16, got ", py_dtype(xt));
  const int64_t m = X.size(-1);
  TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == m,
                    "accumulate_stats: s must be a float32 vector of length m=", m, ", got ",
                    py_dtype(s.scalar_type()), " ", py_shape(s.sizes()));
  TORCH_CHECK_VALUE(s.is_contiguous(), "accumulate_stats: s must be contiguous");
  TORCH_CHECK_VALUE(s.device() == X.device(), "accumulate_stats: s is on ", py_device(s.device()),
                    " but X is on ", py_device(X.device()));
  if (H.has_value() && H->defined()) {
    const auto& h = *H;
    TORCH_CHECK_VALUE(h.scalar_type() == at::kFloat && h.dim() == 2 && h.size(0) == m &&
                          h.size(1) == m,
                      "accumulate_stats: H must be a float32 (", m, ", ", m, ") matrix, got ",
                      py_dtype(h.scalar_type()), " ", py_shape(h.sizes()));
    TORCH_CHECK_VALUE(h.is_contiguous(), "accumulate_stats: H must be contiguous");
    TORCH_CHECK_VALUE(h.device() == X.device(), "accumulate_stats: H is on ", py_device(h.device()),
                      " but X is on ", py_device(X.device()));
  }
  TORCH_CHECK_VALUE(X.is_cuda(), "accumulate_stats: X must be a CUDA tensor for the CUDA kernel, got ",
                    py_device(X.device()));
}

cudaDataType_t cuda_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "fasp_ext: unsupported dtype ", st);
  }
}

// H (m x m, fp32, contiguous) += X2^T X2 for a row-major X2 (n x m, row stride ld); with `lower`,
// only the block lower triangle of H (see the file's comment), in (nb + 1) / (2 nb) of the flops
// for nb block columns.
void gram_update(const at::Tensor& X2, int64_t n, int64_t m, int64_t ld, at::Tensor& H, bool lower) {
  TORCH_CHECK(m <= INT_MAX && ld <= INT_MAX, "accumulate_stats: m too large for cuBLAS");
  // The pooled handle comes bound to the current stream with ATen's workspace. Re-binding only if
  // needed: cublasSetStream also resets the workspace to cuBLAS's default pool.
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaStream_t bound = nullptr;
  FASP_CUBLAS_CHECK(cublasGetStream(handle, &bound));
  if (bound != stream) FASP_CUBLAS_CHECK(cublasSetStream(handle, stream));
  cublasMath_t old_mode;
  FASP_CUBLAS_CHECK(cublasGetMathMode(handle, &old_mode));
  const auto st = X2.scalar_type();
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  if (st == at::kFloat) {
    FASP_CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
    if (at::globalContext().allowTF32CuBLAS()) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
  } else {
    // fp16/bf16 products accumulate in fp32 all the way (no reduced-precision split-K).
    FASP_CUBLAS_CHECK(cublasSetMathMode(
        handle, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                          CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  }
  const cudaDataType_t dt = cuda_dtype(st);
  const float alpha = 1.f, beta = 1.f;
  const size_t esize = X2.element_size();
  const char* base = static_cast<const char*>(X2.const_data_ptr());
  // Column-major view: A = X2^T is (m x n) with lda = ld; H += A A^T (symmetric, so the storage
  // order of H does not matter). Rows are chunked so every cuBLAS dimension fits in an int.
  // Row-major H is column-major H^T, so the row-major block column H[j0:, j0:j0+w] is the
  // column-major (w x (m - j0)) block at H + j0 * (m + 1) with ld m:
  // C[r, c] = H[j0 + c, j0 + r] += sum_k X[k, j0 + r] X[k, j0 + c] = A[j0:j0+w, :] A[j0:, :]^T.
  const int64_t bs = lower ? gram_lower_block(m) : m;
  float* h = H.data_ptr<float>();
  constexpr int64_t kChunk = int64_t(1) << 30;
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  for (int64_t r0 = 0; r0 < n && status == CUBLAS_STATUS_SUCCESS; r0 += kChunk) {
    const int nk = static_cast<int>(std::min<int64_t>(kChunk, n - r0));
    const char* A = base + static_cast<size_t>(r0) * ld * esize;
    for (int64_t j0 = 0; j0 < m && status == CUBLAS_STATUS_SUCCESS; j0 += bs) {
      const int w = static_cast<int>(std::min<int64_t>(bs, m - j0));
      const void* Aj = A + static_cast<size_t>(j0) * esize;
      status = cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, w, static_cast<int>(m - j0), nk,
                            &alpha, Aj, dt, static_cast<int>(ld), Aj, dt, static_cast<int>(ld),
                            &beta, h + j0 * (m + 1), CUDA_R_32F, static_cast<int>(m), compute,
                            CUBLAS_GEMM_DEFAULT);
    }
  }
  cublasSetMathMode(handle, old_mode);
  FASP_CUBLAS_CHECK(status);
}

// X as a row-major (n x m) matrix with row stride ld (a view where possible).
struct Rows {
  at::Tensor X2;
  int64_t n = 0, m = 0, ld = 0;
};

Rows as_rows(const at::Tensor& X) {
  Rows r;
  r.m = X.size(-1);
  if (r.m == 0) return r;
  at::Tensor Xc = X.stride(-1) == 1 ? X : X.contiguous();
  r.X2 = Xc.reshape({-1, r.m});
  r.n = r.X2.size(0);
  if (r.n == 0) return r;
  if (!(r.X2.stride(1) == 1 || r.m == 1) || (r.n > 1 && r.X2.stride(0) < r.m)) r.X2 = r.X2.contiguous();
  r.ld = r.n == 1 ? r.m : r.X2.stride(0);
  return r;
}

// s += column sums of x^2, unless a column sum is non-finite or *flag is already set: then only
// *flag is set (flag: device int32, one element). Queued on the current stream, no host wait.
void add_squares(const Rows& r, at::Tensor& s, at::Tensor& flag) {
  auto fopts = r.X2.options().dtype(at::kFloat);
  at::Tensor part = at::empty({r.m}, fopts);
  dispatch_float_types(r.X2.scalar_type(), "accumulate_stats: X", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    column_reduce<T, ColOp::kSquare>(static_cast<const T*>(r.X2.const_data_ptr()), r.n, r.m, r.ld,
                                     part.data_ptr<float>(), flag.data_ptr<int>(), fopts);
  });
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((r.m + threads - 1) / threads, 1024));
  guarded_add_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      s.data_ptr<float>(), part.data_ptr<float>(), flag.data_ptr<int>(), r.m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The signature must match the CPU kernel's exactly (the dispatcher checks it at load time).
void accumulate_stats_cuda(const at::Tensor& X, at::Tensor s, std::optional<at::Tensor> H) {
  check_args(X, s, H);
  const c10::cuda::CUDAGuard guard(X.device());
  const Rows r = as_rows(X);
  if (r.m == 0 || r.n == 0) return;
  at::Tensor flag = at::zeros({1}, X.options().dtype(at::kInt));
  add_squares(r, s, flag);
  // The op raises (and leaves s and H untouched) on non-finite statistics.
  TORCH_CHECK_VALUE(flag.item<int>() == 0,  // HOST_SYNC: accumulate_stats.flag
                    "accumulate_stats: X contains NaN or Inf (or values whose square overflows fp32)");
  if (H.has_value() && H->defined()) {
    at::Tensor h = *H;
    gram_update(r.X2, r.n, r.m, r.ld, h, /*lower=*/false);
  }
}

// No host wait: NaN/Inf set `bad` instead of raising (see the file's comment).
void deferred(const at::Tensor& X, at::Tensor& s, const std::optional<at::Tensor>& H, at::Tensor& bad,
              bool lower) {
  check_args(X, s, H);
  TORCH_CHECK_VALUE(bad.scalar_type() == at::kInt && bad.numel() == 1 && bad.device() == X.device(),
                    "accumulate_stats: bad must be an int32 tensor of one element on ",
                    py_device(X.device()), ", got ", py_dtype(bad.scalar_type()), " ",
                    py_shape(bad.sizes()), " on ", py_device(bad.device()));
  const c10::cuda::CUDAGuard guard(X.device());
  const Rows r = as_rows(X);
  if (r.m == 0 || r.n == 0) return;
  at::Tensor flag = bad.is_contiguous() ? bad : bad.contiguous();
  add_squares(r, s, flag);
  if (!flag.is_same(bad)) bad.copy_(flag);
  if (H.has_value() && H->defined()) {
    at::Tensor h = *H;
    gram_update(r.X2, r.n, r.m, r.ld, h, lower);
  }
}

void accumulate_stats_deferred_cuda(const at::Tensor& X, at::Tensor s, std::optional<at::Tensor> H,
                                    at::Tensor bad) {
  deferred(X, s, H, bad, /*lower=*/false);
}

// The deferred op with only H's block lower triangle updated (see the file's comment).
void accumulate_stats_lower_cuda(const at::Tensor& X, at::Tensor s, at::Tensor H, at::Tensor bad) {
  deferred(X, s, std::optional<at::Tensor>(H), bad, /*lower=*/true);
}

}  // namespace
}  // namespace cuda
}  // namespace fasp_ext

// CUDA builds only (the CPU checks each batch as it comes, with no device to wait for); the
// Python wrapper (fasp_ext/ops.py) falls back to plain torch where this op is absent.
TORCH_LIBRARY_FRAGMENT(fasp_ext, m) {
  m.def("accumulate_stats_deferred(Tensor X, Tensor(a!) s, Tensor(b!)? H, Tensor(c!) bad) -> ()");
  // H's lower triangle only: the caller mirrors it once before use (fasp_ext.ops.mirror_lower_)
  m.def("accumulate_stats_lower(Tensor X, Tensor(a!) s, Tensor(b!) H, Tensor(c!) bad) -> ()");
}

TORCH_LIBRARY_IMPL(fasp_ext, CUDA, m) {
  m.impl("accumulate_stats", &fasp_ext::cuda::accumulate_stats_cuda);
  m.impl("accumulate_stats_deferred", &fasp_ext::cuda::accumulate_stats_deferred_cuda);
  m.impl("accumulate_stats_lower", &fasp_ext::cuda::accumulate_stats_lower_cuda);
}
