// Shared pieces of the CUDA kernels: a deterministic, coalesced column reduction over a row-major
// (rows x cols) matrix, library-status checks, and small launch helpers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "../fasp_math.h"

#define FASP_CUBLAS_CHECK(expr)                                                              \
  do {                                                                                       \
    cublasStatus_t _st = (expr);                                                             \
    TORCH_CHECK(_st == CUBLAS_STATUS_SUCCESS, "fasp_ext: cuBLAS call failed: " #expr         \
                " returned status ", static_cast<int>(_st));                                 \
  } while (0)

namespace fasp_ext {
namespace cuda {

// Every place the CUDA kernels make the host wait for the device: a read of a device value, a
// device-to-host copy, a device or stream synchronisation, or an ATen call that checks its result
// on the host. Each such line of csrc/cuda carries `// HOST_SYNC: <name>` with a name listed here;
// tests/test_sync_budget.py reads the sources, fails on any other waiting line, and checks that the
// waits per call on the common path (`per_call`) add up, op by op, to fasp_ext/ops.py's HOST_SYNCS.
// bench/gpu_check.sh confirms the counts on a GPU with torch.cuda.set_sync_debug_mode.
struct HostSync {
  const char* name;
  const char* op;
  int per_call;  // waits per call on the common path (one factorisation attempt, no fallback)
  const char* when;
};
inline constexpr HostSync kHostSyncs[] = {
    {"accumulate_stats.flag", "accumulate_stats", 1,
     "every call of the raising op: NaN/Inf raise before H is touched (the pipeline calls "
     "accumulate_stats_deferred on a GPU, which has none)"},
    {"score_select.flag", "score_select", 1, "every call: index range and NaN/Inf checks"},
    {"restore.checks", "restore", 1,
     "every call: kept in range and increasing, W and H finite, mean(diag H[S, S]), with the first "
     "factorisation's status and the finiteness of its solve"},
    {"restore.attempt", "restore", 0, "each retry with a raised lambda (none on the common path)"},
    {"restore.eigen", "restore", 0, "the eigen fallback only: linalg_eigh checks its result"},
};

// Per-element transform applied before the column sum.
enum class ColOp { kSquare, kAbs };

template <ColOp OP>
__device__ __forceinline__ float col_transform(float x) {
  if constexpr (OP == ColOp::kSquare) {
    return sq(x);
  } else {
    return fabsf(x);
  }
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) VecT {
  T v[VEC];
};

// Column reduction out[j] = sum_i f(X[i, j]) in fp32, deterministic for a given launch shape.
//
// Block (TX, TY): threads along columns (each owns VEC consecutive columns, loaded as one vector
// when aligned), TY row lanes. gridDim.x tiles the columns (TX * VEC per block), gridDim.y splits
// the rows into equal chunks. Each block reduces its chunk into one fp32 partial per column in a
// fixed order; when there is more than one chunk the partials go to `partials` (chunks x cols) and
// the last block to finish a column tile (counted in `tile_counters`, zeroed by the caller) sums
// them in chunk order into `out`. If `nonfinite_flag` is given, a non-finite out[j] sets it to 1.
template <typename T, int VEC, int TX, int TY, ColOp OP>
__global__ void __launch_bounds__(TX* TY)
    column_reduce_kernel(const T* __restrict__ X, int64_t rows, int64_t cols, int64_t ld,
                         int64_t rows_per_chunk, float* __restrict__ partials,
                         unsigned int* __restrict__ tile_counters, float* __restrict__ out,
                         int* __restrict__ nonfinite_flag) {
  __shared__ float red[TY][TX * VEC];
  __shared__ bool is_last;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * TX + tx) * VEC;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r_end = r_begin + rows_per_chunk < rows ? r_begin + rows_per_chunk : rows;

  float acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0.f;

  if (col0 < cols) {
    if constexpr (VEC > 1) {
      // The host only picks VEC > 1 when cols % VEC == 0, ld % VEC == 0 and X is 16-byte aligned.
#pragma unroll 4
      for (int64_t r = r_begin + ty; r < r_end; r += TY) {
        VecT<T, VEC> x = *reinterpret_cast<const VecT<T, VEC>*>(X + r * ld + col0);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += col_transform<OP>(static_cast<float>(x.v[v]));
      }
    } else {
#pragma unroll 4
      for (int64_t r = r_begin + ty; r < r_end; r += TY) {
        acc[0] += col_transform<OP>(static_cast<float>(X[r * ld + col0]));
      }
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) red[ty][tx * VEC + v] = acc[v];
  __syncthreads();

  const int nthreads = TX * TY;
  const int tid = ty * TX + tx;
  const int64_t tile_col0 = static_cast<int64_t>(blockIdx.x) * TX * VEC;
  for (int c = tid; c < TX * VEC; c += nthreads) {
    const int64_t col = tile_col0 + c;
    if (col >= cols) break;
    float sum = 0.f;
#pragma unroll
    for (int y = 0; y < TY; ++y) sum += red[y][c];
    if (gridDim.y == 1) {
      out[col] = sum;
      if (nonfinite_flag != nullptr && !isfinite(sum)) atomicOr(nonfinite_flag, 1);
    } else {
      partials[static_cast<int64_t>(blockIdx.y) * cols + col] = sum;
    }
  }
  if (gridDim.y == 1) return;

  // Last block of this column tile sums the chunk partials in chunk order (deterministic).
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    unsigned int done = atomicAdd(&tile_counters[blockIdx.x], 1u);
    is_last = (done == gridDim.y - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int c = tid; c < TX * VEC; c += nthreads) {
    const int64_t col = tile_col0 + c;
    if (col >= cols) break;
    float sum = 0.f;
    for (unsigned int y = 0; y < gridDim.y; ++y) sum += __ldcg(&partials[static_cast<int64_t>(y) * cols + col]);
    out[col] = sum;
    if (nonfinite_flag != nullptr && !isfinite(sum)) atomicOr(nonfinite_flag, 1);
  }
}

template <typename T, int VEC, int TX, int TY, ColOp OP>
void launch_column_reduce_impl(const T* X, int64_t rows, int64_t cols, int64_t ld, float* out,
                               int* nonfinite_flag, const at::TensorOptions& fopts) {
  constexpr int kColsPerBlock = TX * VEC;
  const int64_t tiles = (cols + kColsPerBlock - 1) / kColsPerBlock;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target_blocks = 4LL * sms;
  // Enough row chunks to fill the device, but at least ~4 row iterations per thread.
  const int64_t max_chunks = std::max<int64_t>(1, (rows + 4 * TY - 1) / (4 * TY));
  int64_t chunks = std::min<int64_t>({(target_blocks + tiles - 1) / tiles, max_chunks, 4096});
  chunks = std::max<int64_t>(chunks, 1);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  TORCH_CHECK(tiles <= 0x7fffffffLL, "fasp_ext: too many columns for one launch");

  at::Tensor partials, counters;
  if (chunks > 1) {
    partials = at::empty({chunks, cols}, fopts);
    counters = at::zeros({tiles}, fopts.dtype(at::kInt));
  }
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks));
  const dim3 block(TX, TY);
  auto stream = at::cuda::getCurrentCUDAStream();
  column_reduce_kernel<T, VEC, TX, TY, OP><<<grid, block, 0, stream>>>(
      X, rows, cols, ld, rows_per_chunk, chunks > 1 ? partials.data_ptr<float>() : nullptr,
      chunks > 1 ? reinterpret_cast<unsigned int*>(counters.data_ptr<int>()) : nullptr, out,
      nonfinite_flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[j] = sum_i f(X[i, j]) for a row-major (rows x cols) matrix with row stride ld (unit column
// stride). out must hold cols floats. rows may be 0 (out becomes 0). Deterministic.
template <typename T, ColOp OP>
void column_reduce(const T* X, int64_t rows, int64_t cols, int64_t ld, float* out,
                   int* nonfinite_flag, const at::TensorOptions& fopts) {
  if (cols == 0) return;
  if (rows == 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float) * cols, at::cuda::getCurrentCUDAStream()));
    return;
  }
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = (reinterpret_cast<uintptr_t>(X) % 16 == 0) && (cols % kVec == 0) &&
                       (ld % kVec == 0);
  if (aligned) {
    launch_column_reduce_impl<T, kVec, 32, 8, OP>(X, rows, cols, ld, out, nonfinite_flag, fopts);
  } else {
    launch_column_reduce_impl<T, 1, 128, 2, OP>(X, rows, cols, ld, out, nonfinite_flag, fopts);
  }
}

// Python spellings used by reference.py's messages: "torch.float32", "(4, 4)", "(4,)".
inline std::string py_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(st);
  }
}

inline std::string py_shape(at::IntArrayRef sizes) {
  std::string r = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) r += ", ";
    r += std::to_string(sizes[i]);
  }
  if (sizes.size() == 1) r += ",";
  return r + ")";
}

inline std::string py_device(const at::Device& d) { return d.str(); }

// Calls f(static_cast<T*>(nullptr)) with T the element type of a float32/float16/bfloat16 tensor.
template <typename F>
void dispatch_float_types(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat:
      f(static_cast<float*>(nullptr));
      break;
    case at::kHalf:
      f(static_cast<c10::Half*>(nullptr));
      break;
    case at::kBFloat16:
      f(static_cast<c10::BFloat16*>(nullptr));
      break;
    default:
      TORCH_CHECK_VALUE(false, what, " must be float32, float16 or bfloat16, got ", st);
  }
}

}  // namespace cuda
}  // namespace fasp_ext
