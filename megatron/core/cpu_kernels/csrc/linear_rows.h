// Dot products of weight rows with a few input rows, streaming each weight row once: the building block of
// small_batch_linear and greedy_argmax. The weight may be stored as T or as int8 codes (widened to T on load);
// the summation order of one (weight row, input row) pair is the same whichever block it is computed in, so a
// row recomputed alone gives bit for bit what small_batch_linear gives for it.
#pragma once

#include <cstdint>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace linear_rows {

// Products of at least this many multiply-adds are split across threads (each part a couple of microseconds;
// measured here, splitting pays off from about 50K multiply-adds); smaller ones stay on the calling thread.
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
  static type load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static type fma(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
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
  static double sum(type v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
};

// sums[s * M + i] = dot(weight row s, x row i) for S weight rows `stride` elements apart and M input rows: each
// weight vector is loaded once for the M inputs, and the S * M accumulators hide the FMA latency.
template <typename T, typename W, int S, int M>
inline void block_dot(const W* __restrict w, int64_t stride, const T* __restrict x, int64_t k, T* __restrict sums) {
  using V = Vec<T>;
  constexpr int L = V::width;
  typename V::type acc[S][M];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s) {
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) acc[s][i] = V::zero();
  }
  int64_t c = 0;
  for (; c + L <= k; c += L) {
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
      for (int64_t t = c; t < k; ++t) sum += T(w[s * stride + t]) * x[i * k + t];
      sums[s * M + i] = sum;
    }
  }
}
#else
// Portable version: 8 independent partial sums per dot product, which compilers vectorise without -ffast-math.
template <typename T, typename W, int S, int M>
inline void block_dot(const W* __restrict w, int64_t stride, const T* __restrict x, int64_t k, T* __restrict sums) {
  constexpr int L = 8;
  for (int s = 0; s < S; ++s) {
    for (int i = 0; i < M; ++i) {
      const W* ws = w + s * stride;
      const T* xi = x + i * k;
      T acc[L] = {};
      int64_t c = 0;
      for (; c + L <= k; c += L) {
        for (int l = 0; l < L; ++l) acc[l] += T(ws[c + l]) * xi[c + l];
      }
      T sum = 0;
      for (int l = 0; l < L; ++l) sum += acc[l];
      for (; c < k; ++c) sum += T(ws[c]) * xi[c];
      sums[s * M + i] = sum;
    }
  }
}
#endif

// Output columns r, r + stride, ..., r + (S - 1) * stride for all m inputs, M inputs at a time (the S weight rows
// stay in L1 between the passes). out is (m, n); bias may be null.
template <typename T, typename W, int S, int M>
inline void rows_block(const W* w, const T* x, const T* bias, T* out, int64_t m, int64_t k, int64_t n, int64_t r,
                       int64_t stride) {
  T sums[S * M];
  int64_t i = 0;
  for (; i + M <= m; i += M) {
    block_dot<T, W, S, M>(w + r * k, stride * k, x + i * k, k, sums);
    for (int s = 0; s < S; ++s) {
      const T b = bias == nullptr ? T(0) : bias[r + s * stride];
      for (int j = 0; j < M; ++j) out[(i + j) * n + r + s * stride] = sums[s * M + j] + b;
    }
  }
  if constexpr (M > 1) {
    if (i < m) rows_block<T, W, S, M - 1>(w, x + i * k, bias, out + i * n, m - i, k, n, r, stride);
  }
}

// out[:, row_begin:row_end]. The rows are split into S equal parts walked in lockstep: S sequential streams through
// memory keep more cache-line fills in flight than one (measured ~1.3x the single-stream bandwidth from DRAM here),
// whereas S adjacent rows interleave within a page and defeat the hardware prefetcher (slower than one stream).
template <typename T, typename W, int S, int M>
void rows_range(const W* w, const T* x, const T* bias, T* out, int64_t m, int64_t k, int64_t n, int64_t row_begin,
                int64_t row_end) {
  const int64_t part = (row_end - row_begin) / S;
  for (int64_t r = row_begin; r < row_begin + part; ++r) rows_block<T, W, S, M>(w, x, bias, out, m, k, n, r, part);
  for (int64_t r = row_begin + S * part; r < row_end; ++r) rows_block<T, W, 1, M>(w, x, bias, out, m, k, n, r, 0);
}

// rows_range with the block shape chosen for m: 4 weight rows x up to 3 inputs = 12 accumulators + 3 inputs + 1
// weight vector, the 16 AVX2 registers.
template <typename T, typename W>
void rows_range_for(const W* w, const T* x, const T* bias, T* out, int64_t m, int64_t k, int64_t n,
                    int64_t row_begin, int64_t row_end) {
  if (m == 1) {
    rows_range<T, W, 4, 1>(w, x, bias, out, m, k, n, row_begin, row_end);
  } else {
    rows_range<T, W, 4, 3>(w, x, bias, out, m, k, n, row_begin, row_end);
  }
}

}  // namespace linear_rows
