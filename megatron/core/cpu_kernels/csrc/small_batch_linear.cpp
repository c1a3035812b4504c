// x @ weight.T + bias for a few rows of x (single-token decoding), reading the weight in its natural nn.Linear
// layout (out_features, in_features): each output is the dot product of one contiguous weight row with one input
// row, computed for all inputs while the row is in L1, so the weight is read from memory exactly once, as a few
// sequential streams per thread. PyTorch's CPU GEMM is several times slower for this shape (m = 1..16), and
// multiplying by a transposed copy of the weight costs the copy and doubles the weight memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <optional>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGrainMacs = 49152;

#ifdef __AVX2__
// One 256-bit register of T and the few operations the dot products need.
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  using type = __m256;
  static constexpr int width = 8;
  static type zero() { return _mm256_setzero_ps(); }
  static type load(const float* p) { return _mm256_loadu_ps(p); }
  static type fma(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
  static type add(type a, type b) { return _mm256_add_ps(a, b); }
  static float sum(type v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
};

template <>
struct Vec<double> {
  using type = __m256d;
  static constexpr int width = 4;
  static type zero() { return _mm256_setzero_pd(); }
  static type load(const double* p) { return _mm256_loadu_pd(p); }
  static type fma(type a, type b, type c) { return _mm256_fmadd_pd(a, b, c); }
  static type add(type a, type b) { return _mm256_add_pd(a, b); }
  static double sum(type v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
};

// sums[s * M + i] = dot(weight row s, x row i) for S weight rows `stride` elements apart and M input rows: each
// weight vector is loaded once for the M inputs, and the S * M accumulators hide the FMA latency.
template <typename T, int S, int M>
inline void block_dot(const T* __restrict w, int64_t stride, const T* __restrict x, int64_t k, T* __restrict sums) {
  using V = Vec<T>;
  constexpr int W = V::width;
  typename V::type acc[S][M];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s) {
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) acc[s][i] = V::zero();
  }
  int64_t c = 0;
  for (; c + W <= k; c += W) {
    typename V::type xv[M];
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) xv[i] = V::load(x + i * k + c);
#pragma GCC unroll 16
    for (int s = 0; s < S; ++s) {
      const typename V::type wv = V::load(w + s * stride + c);
#pragma GCC unroll 16
      for (int i = 0; i < M; ++i) acc[s][i] = V::fma(wv, xv[i], acc[s][i]);
    }
  }
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s) {
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
      T sum = V::sum(acc[s][i]);
      for (int64_t t = c; t < k; ++t) sum += w[s * stride + t] * x[i * k + t];
      sums[s * M + i] = sum;
    }
  }
}
#else
// Portable version: 8 independent partial sums per dot product, which compilers vectorise without -ffast-math.
template <typename T, int S, int M>
inline void block_dot(const T* __restrict w, int64_t stride, const T* __restrict x, int64_t k, T* __restrict sums) {
  constexpr int L = 8;
  for (int s = 0; s < S; ++s) {
    for (int i = 0; i < M; ++i) {
      const T* ws = w + s * stride;
      const T* xi = x + i * k;
      T acc[L] = {};
      int64_t c = 0;
      for (; c + L <= k; c += L) {
        for (int l = 0; l < L; ++l) acc[l] += ws[c + l] * xi[c + l];
      }
      T sum = 0;
      for (int l = 0; l < L; ++l) sum += acc[l];
      for (; c < k; ++c) sum += ws[c] * xi[c];
      sums[s * M + i] = sum;
    }
  }
}
#endif

// Output columns r, r + stride, ..., r + (S - 1) * stride for all m inputs, M inputs at a time (the S weight rows
// stay in L1 between the passes).
template <typename T, int S, int M>
inline void rows_block(const T* w, const T* x, const T* bias, T* out, int64_t m, int64_t k, int64_t n, int64_t r,
                       int64_t stride) {
  T sums[S * M];
  int64_t i = 0;
  for (; i + M <= m; i += M) {
    block_dot<T, S, M>(w + r * k, stride * k, x + i * k, k, sums);
    for (int s = 0; s < S; ++s) {
      const T b = bias == nullptr ? T(0) : bias[r + s * stride];
      for (int j = 0; j < M; ++j) out[(i + j) * n + r + s * stride] = sums[s * M + j] + b;
    }
  }
  if constexpr (M > 1) {
    if (i < m) rows_block<T, S, M - 1>(w, x + i * k, bias, out + i * n, m - i, k, n, r, stride);
  }
}

// out[:, row_begin:row_end]. The rows are split into S equal parts walked in lockstep: S sequential streams through
// memory keep more cache-line fills in flight than one (measured ~1.3x the single-stream bandwidth from DRAM here),
// whereas S adjacent rows interleave within a page and defeat the hardware prefetcher (slower than one stream).
template <typename T, int S, int M>
void rows_range(const T* w, const T* x, const T* bias, T* out, int64_t m, int64_t k, int64_t n, int64_t row_begin,
                int64_t row_end) {
  const int64_t part = (row_end - row_begin) / S;
  for (int64_t r = row_begin; r < row_begin + part; ++r) rows_block<T, S, M>(w, x, bias, out, m, k, n, r, part);
  for (int64_t r = row_begin + S * part; r < row_end; ++r) rows_block<T, 1, M>(w, x, bias, out, m, k, n, r, 0);
}

}  // namespace

// x: (m, k), weight: (n, k), bias: (n) or None, all contiguous and of one floating dtype. Returns (m, n).
at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "small_batch_linear expects x (m, k) and weight (n, k), got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "small_batch_linear: x has ", x.size(1), " features but weight has ",
              weight.size(1));
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "small_batch_linear runs on CPU tensors only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "small_batch_linear needs contiguous x and weight");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "small_batch_linear: x is ", x.scalar_type(),
              " but weight is ", weight.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "small_batch_linear: bias must be (",
                weight.size(0), "), got ", bias->sizes());
    TORCH_CHECK(bias->device().is_cpu() && bias->is_contiguous(), "small_batch_linear needs a contiguous CPU bias");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "small_batch_linear: bias is ", bias->scalar_type(),
                " but x is ", x.scalar_type());
  }
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  auto out = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return out;
  // A row costs m * k multiply-adds. at::parallel_for splits the rows into min(threads, n / grain) equal contiguous
  // ranges, so products of more than kGrainMacs are split (each part a couple of microseconds; measured here,
  // splitting pays off from about 50K multiply-adds) and smaller ones stay on the calling thread.
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, m * k));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "small_batch_linear", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* b = has_bias ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      // 4 weight rows x up to 3 inputs: 12 accumulators + 3 inputs + 1 weight vector fill the 16 AVX2 registers.
      if (m == 1) {
        rows_range<scalar_t, 4, 1>(w, xp, b, o, m, k, n, begin, end);
      } else {
        rows_range<scalar_t, 4, 3>(w, xp, b, o, m, k, n, begin, end);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(megatron, m) {
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &small_batch_linear);
}
