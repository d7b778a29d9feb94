// CUDA kernel of fasp_ext::score_select: kept group indices (int64, ascending) of the k best
// column_score(s_j, sum_i |W[i, j]|) scores, k / segments per contiguous segment, ties to the
// lower index (the ranks_before order of fasp_math.h).
//
// Two launches on the current stream with no host round trip between them:
//   1. a coalesced, deterministic column reduction of |W| into fp32 (common.cuh) over the whole
//      device. Every segment may reference any column through `groups`, so all column sums must
//      be complete before any segment can be scored: a grid-wide dependency, hence a second launch
//      (a cooperative grid sync would save one launch but restricts the grid size).
//   2. one block per segment: scores (group sums), finiteness / range checks into an error flag,
//      then a 4-pass 8-bit radix select of the per-segment threshold and one ordered pass that
//      writes the selected indices in ascending order (block-wide prefix sums, no sort needed).
// The single host sync at the end reads the error flag so the op raises like reference.py.
#include <torch/library.h>

#include "common.cuh"

namespace fasp_ext {
namespace cuda {
namespace {

constexpr int kSelectBlock = 512;
constexpr int kErrGroups = 1, kErrS = 2, kErrW = 4;

// Order-preserving map of a float onto uint32 (larger float -> larger key); -0 is made +0 first
// so that equal scores get equal keys and fall to the index tie-break.
__device__ __forceinline__ uint32_t order_key(float f) {
  if (f == 0.f) f = 0.f;
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive block-wide prefix sum of a 64-bit value; also returns the block total.
template <int BLOCK>
__device__ __forceinline__ unsigned long long block_exclusive_scan(unsigned long long v,
                                                                   unsigned long long* total) {
  constexpr int kWarps = BLOCK / 32;
  __shared__ unsigned long long warp_sums[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned long long inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long t = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += t;
  }
  if (lane == 31) warp_sums[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    unsigned long long w = lane < kWarps ? warp_sums[lane] : 0ull;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long t = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += t;
    }
    if (lane < kWarps) warp_sums[lane] = w;  // inclusive warp prefix
  }
  __syncthreads();
  const unsigned long long before = warp == 0 ? 0ull : warp_sums[warp - 1];
  *total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before + inc - v;
}

template <int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    score_select_kernel(const float* __restrict__ colsum, const float* __restrict__ s, int64_t m,
                        const int64_t* __restrict__ groups, int64_t r, int64_t n, int64_t per,
                        float* __restrict__ scores, int64_t* __restrict__ out,
                        int* __restrict__ flag) {
  const int tid = threadIdx.x;
  const int64_t seg = blockIdx.x;
  const int64_t base = seg * n;

  // This block's share of the finiteness check of s (all of s, as in reference.py).
  for (int64_t j = seg * BLOCK + tid; j < m; j += static_cast<int64_t>(gridDim.x) * BLOCK) {
    if (!isfinite(s[j])) atomicOr(flag, kErrS);
  }

  // Scores of this segment's groups.
  int err = 0;
  for (int64_t i = tid; i < n; i += BLOCK) {
    const int64_t g = base + i;
    float sc;
    if (groups == nullptr) {
      sc = column_score(s[g], colsum[g]);
    } else {
      sc = 0.f;
      for (int64_t t = 0; t < r; ++t) {
        const int64_t c = groups[g * r + t];
        if (c < 0 || c >= m) {
          err |= kErrGroups;
          continue;
        }
        sc += column_score(s[c], colsum[c]);
      }
    }
    if (!isfinite(sc)) err |= kErrW;
    scores[g] = sc;
  }
  if (err) atomicOr(flag, err);
  __syncthreads();  // scores of the segment visible to the whole block
  if (per == 0) return;

  // Radix select: the key T of the per-th highest score, and how many of the keys equal to T
  // are kept (the lowest indices among them).
  __shared__ unsigned int hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ unsigned long long s_take;
  uint32_t prefix = 0, mask = 0;
  unsigned long long remaining = static_cast<unsigned long long>(per);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += BLOCK) hist[b] = 0;
    __syncthreads();
    for (int64_t i = tid; i < n; i += BLOCK) {
      const uint32_t key = order_key(scores[base + i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      unsigned long long cum = 0;
      int d = 255;
      for (; d > 0; --d) {
        if (cum + hist[d] >= remaining) break;
        cum += hist[d];
      }
      s_prefix = prefix | (static_cast<uint32_t>(d) << shift);
      s_take = remaining - cum;
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_take;
    mask |= 0xffu << shift;
  }
  const uint32_t T = prefix;
  const unsigned long long take_eq = remaining;  // >= 1

  // One ordered pass: position = #(key > T before i) + min(#(key == T before i), take_eq).
  unsigned long long run_gt = 0, run_eq = 0;
  int64_t* seg_out = out + seg * per;
  for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
    const int64_t i = i0 + tid;
    bool gt = false, eq = false;
    if (i < n) {
      const uint32_t key = order_key(scores[base + i]);
      gt = key > T;
      eq = key == T;
    }
    const unsigned long long packed = (static_cast<unsigned long long>(gt) << 32) | eq;
    unsigned long long total;
    const unsigned long long excl = block_exclusive_scan<BLOCK>(packed, &total);
    const unsigned long long gt_before = run_gt + (excl >> 32);
    const unsigned long long eq_before = run_eq + (excl & 0xffffffffull);
    if (gt || (eq && eq_before < take_eq)) {
      const unsigned long long pos = gt_before + (eq_before < take_eq ? eq_before : take_eq);
      seg_out[pos] = base + i;
    }
    run_gt += total >> 32;
    run_eq += total & 0xffffffffull;
  }
}

void check_args(const at::Tensor& W, const at::Tensor& s, int64_t k,
                const std::optional<at::Tensor>& groups, int64_t segments, int64_t* G_out) {
  TORCH_CHECK_VALUE(W.dim() == 2, "score_select: W must be 2-D (out, m), got ", W.dim(), "-D");
  const auto wt = W.scalar_type();
  TORCH_CHECK_VALUE(wt == at::kFloat || wt == at::kHalf || wt == at::kBFloat16,
                    "score_select: W must be float32, float16 or bfloat16, got ", py_dtype(wt));
  const int64_t m = W.size(1);
  TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == m,
                    "score_select: s must be a float32 vector of length m=", m, ", got ",
                    py_dtype(s.scalar_type()), " ", py_shape(s.sizes()));
  TORCH_CHECK_VALUE(s.device() == W.device(), "score_select: s is on ", py_device(s.device()),
                    " but W is on ", py_device(W.device()));
  int64_t G = m;
  if (groups.has_value() && groups->defined()) {
    const auto& g = *groups;
    TORCH_CHECK_VALUE(g.scalar_type() == at::kLong && g.dim() == 2,
                      "score_select: groups must be an int64 (G, r) matrix, got ",
                      py_dtype(g.scalar_type()), " ", g.dim(), "-D");
    TORCH_CHECK_VALUE(g.device() == W.device(), "score_select: groups is on ",
                      py_device(g.device()), " but W is on ", py_device(W.device()));
    G = g.size(0);
    // The range check of the entries runs on the device (error flag read at the end).
  }
  TORCH_CHECK_VALUE(segments >= 1 && G % segments == 0, "score_select: segments=", segments,
                    " must be >= 1 and divide the number of groups ", G);
  TORCH_CHECK_VALUE(k >= 0 && k <= G, "score_select: k=", k, " out of range [0, ", G, "]");
  TORCH_CHECK_VALUE(k % segments == 0, "score_select: k=", k, " must be a multiple of segments=",
                    segments);
  TORCH_CHECK_VALUE(W.is_cuda(), "score_select: W must be a CUDA tensor for the CUDA kernel, got ",
                    py_device(W.device()));
  *G_out = G;
}

// The signature must match the CPU kernel's exactly (the dispatcher checks it at load time).
at::Tensor score_select_cuda(const at::Tensor& W, const at::Tensor& s, int64_t k,
                             const std::optional<at::Tensor>& groups, int64_t segments) {
  int64_t G = 0;
  check_args(W, s, k, groups, segments, &G);
  const c10::cuda::CUDAGuard guard(W.device());
  const int64_t m = W.size(1);
  const int64_t per = k / segments;
  auto fopts = W.options().dtype(at::kFloat);
  at::Tensor out = at::empty({k}, W.options().dtype(at::kLong));

  const bool has_groups = groups.has_value() && groups->defined();
  at::Tensor g = has_groups ? groups->contiguous() : at::Tensor();
  const int64_t r = has_groups ? g.size(1) : 1;
  at::Tensor sc = s.contiguous();

  // 1. Column |W| sums (fp32, deterministic).
  at::Tensor colsum = at::empty({m}, fopts);
  at::Tensor Wc = (W.stride(1) == 1 || m == 1) && (W.size(0) <= 1 || W.stride(0) >= m)
                      ? W
                      : W.contiguous();
  const int64_t ld = Wc.size(0) <= 1 ? m : Wc.stride(0);
  dispatch_float_types(Wc.scalar_type(), "score_select: W", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    column_reduce<T, ColOp::kAbs>(static_cast<const T*>(Wc.const_data_ptr()), Wc.size(0), m, ld,
                                  colsum.data_ptr<float>(), nullptr, fopts);
  });

  // 2. Scores, checks and per-segment selection, one block per segment.
  at::Tensor scores = at::empty({G}, fopts);
  at::Tensor flag = at::zeros({1}, fopts.dtype(at::kInt));
  const int64_t n = G / segments;  // G == 0: one block that only checks s
  const int64_t blocks = G == 0 ? 1 : segments;
  TORCH_CHECK(blocks <= 0x7fffffffLL, "score_select: too many segments");
  score_select_kernel<kSelectBlock><<<static_cast<unsigned>(blocks), kSelectBlock, 0,
                                      at::cuda::getCurrentCUDAStream()>>>(
      colsum.data_ptr<float>(), sc.data_ptr<float>(), m,
      has_groups ? g.data_ptr<int64_t>() : nullptr, r, n, G == 0 ? 0 : per,
      scores.data_ptr<float>(), out.data_ptr<int64_t>(), flag.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int err = flag.item<int>();  // HOST_SYNC: score_select.flag (raise like reference.py)
  TORCH_CHECK_VALUE(!(err & kErrGroups), "score_select: groups entries must lie in [0, ", m, ")");
  TORCH_CHECK_VALUE(!(err & kErrS), "score_select: s contains NaN or Inf");
  TORCH_CHECK_VALUE(!(err & kErrW), "score_select: W contains NaN or Inf");
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fasp_ext

TORCH_LIBRARY_IMPL(fasp_ext, CUDA, m) {
  m.impl("score_select", &fasp_ext::cuda::score_select_cuda);
}
