// CPU kernel of fasp_ext::accumulate_stats (semantics: fasp_ext/reference.py).
//   s += sum over tokens of x^2   (fp32 result; each x widened to fp32 before squaring)
//   H += X^T X                    (fp32 GEMM through ATen/BLAS), when H is given: MKL's SYRK (half a
//                                 GEMM's flops) where torch ships MKL, else blocked GEMMs.
// The column norms are computed into a temporary and checked for NaN/Inf before s or H change,
// so a bad batch leaves the running statistics untouched. With H given and SYRK used on one panel
// (128 <= m <= 4096) they are the diagonal of the SYRK product, which the Gram update computes
// anyway (fp32 accumulation inside MKL): no separate pass over X, about 5 % of the update at
// m = 1536. Otherwise one pass over X with fp64 accumulators.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#if defined(__linux__) && defined(__x86_64__)
#include <dlfcn.h>
#define FASP_EXT_TRY_MKL_SYRK 1
#endif

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

// ---- MKL's SYRK, found at run time -------------------------------------------------------------
// torch's x86-64 Linux wheels link MKL statically into libtorch_cpu.so and export its BLAS layer,
// ssyrk included, but no CBLAS name: look it up there (dladdr on a libtorch_cpu function, then
// dlsym), check it once on a small product against at::mm, and fall back to blocked GEMMs when it
// is missing, wrong, or disabled (FASP_EXT_SYRK=0). Fortran calling convention: every argument by
// reference; the integers are passed as int64, which an LP64 build reads correctly too (values
// below 2^31, little-endian).
using SyrkFn = void (*)(const char* uplo, const char* trans, const int64_t* n, const int64_t* k,
                        const float* alpha, const float* a, const int64_t* lda, const float* beta,
                        float* c, const int64_t* ldc);

// C (w x w, row-major, leading dimension ldc) lower triangle = alpha X^T X + beta C for X (n x w,
// row-major, leading dimension ldx: a column panel of a wider matrix). Row-major X is column-major
// X^T (w x n, ld ldx), and the row-major lower triangle is the column-major upper one:
// ssyrk('U', 'N', w, n).
void call_syrk(SyrkFn f, const float* X, int64_t n, int64_t w, int64_t ldx, float beta, float* C, int64_t ldc) {
  const char uplo = 'U', trans = 'N';
  const float alpha = 1.f;
  f(&uplo, &trans, &w, &n, &alpha, X, &ldx, &beta, C, &ldc);
}

SyrkFn find_syrk() {
#ifdef FASP_EXT_TRY_MKL_SYRK
  const char* env = std::getenv("FASP_EXT_SYRK");
  if (env != nullptr && std::strcmp(env, "0") == 0) return nullptr;
  if (!at::hasMKL()) return nullptr;
  Dl_info info;
  // a function defined in libtorch_cpu.so (not inline) names the library torch loaded
  if (dladdr(reinterpret_cast<void*>(&at::Context::hasMKL), &info) == 0 || info.dli_fname == nullptr) return nullptr;
  void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) return nullptr;
  auto f = reinterpret_cast<SyrkFn>(dlsym(lib, "mkl_blas_ssyrk"));
  dlclose(lib);  // RTLD_NOLOAD took a reference to the already loaded library; torch keeps it loaded
  if (f == nullptr) return nullptr;
  // one small check: a 7 x 5 product, lower triangle against at::mm, upper triangle untouched
  at::Tensor x = at::arange(35, at::kFloat).reshape({7, 5}).sin();
  at::Tensor c = at::full({5, 5}, 3.f);
  call_syrk(f, x.const_data_ptr<float>(), 7, 5, 5, 1.f, c.mutable_data_ptr<float>(), 5);
  at::Tensor want = at::mm(x.t(), x) + 3.f;
  const bool ok = at::allclose(c.tril(), want.tril(), 1e-5, 1e-5) &&
                  at::equal(c.triu(1), at::full({5, 5}, 3.f).triu(1));
  return ok ? f : nullptr;
#else
  return nullptr;
#endif
}

SyrkFn mkl_syrk() {
  static const SyrkFn f = find_syrk();
  return f;
}

// H[i, j] += T[i, j] and, off the diagonal, H[j, i] += T[i, j], for the lower triangle of the w x w
// matrix T (leading dimension ldt) and the w x w block of H at ``H`` (leading dimension ldh): the full
// symmetric update from a triangle, exact for any H. Work is split by square tiles of the lower
// triangle (tile pairs (I, J), J <= I, numbered row by row), which keeps the transposed accesses in
// cache and the threads' shares even; each pair writes only H[I, J] and H[J, I], so no two threads
// write the same element.
void add_lower_symmetric(float* H, int64_t ldh, const float* T, int64_t ldt, int64_t w) {
  constexpr int64_t kTile = 64;
  const int64_t nt = (w + kTile - 1) / kTile;
  at::parallel_for(0, nt * (nt + 1) / 2, 4, [&](int64_t pb, int64_t pe) {
    // pair p = I (I + 1) / 2 + J
    int64_t I = static_cast<int64_t>((std::sqrt(8.0 * static_cast<double>(pb) + 1.0) - 1.0) / 2.0);
    while (I * (I + 1) / 2 > pb) --I;
    while ((I + 1) * (I + 2) / 2 <= pb) ++I;
    int64_t J = pb - I * (I + 1) / 2;
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t i0 = I * kTile, i1 = std::min(w, i0 + kTile);
      const int64_t j0 = J * kTile, j1 = std::min(w, j0 + kTile);
      if (I == J) {  // diagonal tile: its lower triangle, mirrored inside the tile
        for (int64_t i = i0; i < i1; ++i) {
          const float* t = T + i * ldt;
          float* h = H + i * ldh;
          for (int64_t j = j0; j <= i; ++j) h[j] += t[j];
          for (int64_t j = j0; j < i; ++j) H[j * ldh + i] += t[j];
        }
      } else {
        for (int64_t i = i0; i < i1; ++i) {
          const float* t = T + i * ldt;
          float* h = H + i * ldh;
          for (int64_t j = j0; j < j1; ++j) h[j] += t[j];
        }
        for (int64_t j = j0; j < j1; ++j) {  // H[J, I] += T[I, J]^T, rows of H written contiguously
          float* h = H + j * ldh;
          for (int64_t i = i0; i < i1; ++i) h[i] += T[i * ldt + j];
        }
      }
      if (++J > I) {
        ++I;
        J = 0;
      }
    }
  });
}

// H += X^T X computing only the lower triangle. With MKL's SYRK (half a GEMM's flops): column panels
// of at most kSyrkPanel columns, so the scratch stays at most kSyrkPanel^2 floats (64 MiB) however
// wide H is; each diagonal panel block by SYRK into the scratch, then added to both triangles of H;
// each block below it by one GEMM, added to H and, transposed, to its mirror. Otherwise the block
// lower triangle by GEMMs ((nb + 1) / (2 nb) of one GEMM's flops for nb column blocks), each
// off-diagonal block added to both triangles. Small m: one GEMM.
constexpr int64_t kSyrkPanel = 4096;

// Whether gram_update runs SYRK on a single panel for m columns, so the batch's sum x^2 is the
// diagonal of its product (syrk_single_panel).
bool single_syrk_panel(int64_t m) { return m >= 128 && m <= kSyrkPanel && mkl_syrk() != nullptr; }

// The single-panel case of gram_update: T = X^T X (lower triangle) by SYRK, its diagonal (the
// per-column sum x^2) checked and added to s, then T added to both triangles of H. Nothing changes
// when a column's sum is not finite.
void syrk_single_panel(at::Tensor& H, at::Tensor& s, const at::Tensor& X) {
  const int64_t m = X.size(1), n = X.size(0);
  at::Tensor T = at::empty({m, m}, H.options());
  float* t = T.mutable_data_ptr<float>();
  call_syrk(mkl_syrk(), X.const_data_ptr<float>(), n, m, m, 0.f, t, m);
  float* sp = s.mutable_data_ptr<float>();
  for (int64_t j = 0; j < m; ++j) {
    TORCH_CHECK_VALUE(std::isfinite(t[j * m + j]),
                      "accumulate_stats: X contains NaN or Inf (or values whose square overflows fp32)");
  }
  for (int64_t j = 0; j < m; ++j) sp[j] += t[j * m + j];
  add_lower_symmetric(H.mutable_data_ptr<float>(), m, t, m, m);
}

void gram_update(at::Tensor& H, const at::Tensor& X) {
  const int64_t m = X.size(1), n = X.size(0);
  if (m >= 128) {
    if (SyrkFn f = mkl_syrk()) {
      const int64_t P = std::min(m, kSyrkPanel);
      at::Tensor T = at::empty({P, P}, H.options());
      float* h = H.mutable_data_ptr<float>();
      for (int64_t i0 = 0; i0 < m; i0 += P) {
        const int64_t wi = std::min(P, m - i0);
        call_syrk(f, X.const_data_ptr<float>() + i0, n, wi, m, 0.f, T.mutable_data_ptr<float>(), wi);
        add_lower_symmetric(h + i0 * m + i0, m, T.const_data_ptr<float>(), wi, wi);
        for (int64_t j0 = 0; j0 < i0; j0 += P) {  // H[i0:, j0:] += X[:, i0:]^T X[:, j0:], and its mirror
          const int64_t wj = std::min(P, i0 - j0);
          at::Tensor blk = at::mm(X.narrow(1, i0, wi).t(), X.narrow(1, j0, wj));
          H.narrow(0, i0, wi).narrow(1, j0, wj).add_(blk);
          H.narrow(0, j0, wj).narrow(1, i0, wi).add_(blk.t());
        }
      }
      return;
    }
  }
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
  if (H.has_value() && n > 0 && single_syrk_panel(m)) {
    syrk_single_panel(*H, s, X2);
    return;
  }

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

// Which Gram update the CPU kernel runs in this process, for benchmarks and tests.
TORCH_LIBRARY_FRAGMENT(fasp_ext, m) {
  m.def("cpu_gram_backend() -> str",
        []() -> std::string { return fasp_ext::mkl_syrk() != nullptr ? "mkl-syrk" : "blocked-gemm"; });
}
