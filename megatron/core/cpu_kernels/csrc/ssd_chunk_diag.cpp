// The intra-chunk ("diagonal block") part of the chunked Mamba2 SSD scan on CPU, forward and backward:
//
//   y[q, :] = sum_{s <= q} (C[q] . B[s]) * exp(a[q] - a[s]) * x[s, :]
//
// for every (batch, chunk, group) block and every head r of the group (a and x are per head, B and C per group).
// It computes the same function as the PyTorch expression in megatron/core/ssm/ops/ssd.py, which materialises the
// (b, c, g, r, q, s) decay and score tensors several times over in forward and backward; here one block at a time
// lives in per-thread buffers that stay in L2, and the backward recomputes C B^T and the decays instead of storing
// them. All products are small dense matrix products (q x q by q x p or q x n) done by one register-tiled routine.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// Built without AVX (a portable build), GCC notes that functions returning 32-byte vectors would pass them
// differently from AVX code; every such function here is internal to this file, so no two ABIs ever meet.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace {

// 32-byte vectors through the GCC/Clang vector extensions: with -mavx2 -mfma each operation is one ymm instruction
// (a * b + c contracts to an FMA), and on targets without AVX the compiler splits them into narrower ones, so
// there is no separate fallback path to keep in sync. U is the unaligned, may_alias variant (the kind of type
// GCC's own intrinsic headers use for unaligned loads): tensors and buffers are only element-aligned.
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef float U __attribute__((vector_size(32), aligned(4), may_alias));
  static constexpr int64_t kWidth = 8;
  static V splat(float s) { return V{s, s, s, s, s, s, s, s}; }
};
template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef double U __attribute__((vector_size(32), aligned(8), may_alias));
  static constexpr int64_t kWidth = 4;
  static V splat(double s) { return V{s, s, s, s}; }
};

template <typename V, typename T>
inline V load(const T* p) {
  return *reinterpret_cast<const typename Lanes<T>::U*>(p);
}

template <typename V, typename T>
inline void store(T* p, const V& v) {
  *reinterpret_cast<typename Lanes<T>::U*>(p) = v;
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Rows per register tile. Four rows by two vectors keeps eight independent FMA chains in flight (enough to cover
// the FMA latency on two pipes) with room for the two B-vectors and the broadcast in the 16 ymm registers.
constexpr int64_t kRows = 4;
static_assert(Lanes<float>::kWidth % kRows == 0 && Lanes<double>::kWidth % kRows == 0,
              "the triangular row extents below assume a tile's rows never cross a vector boundary");

using vec_math::exp_approx;

// Which part of a product is needed. The score matrices are lower triangular (s <= q), so:
//   kLowerA:   A(i, k) = 0 for k > i          -> the depth loop stops at the tile's last row;
//   kUpperA:   A(i, k) = 0 for k < i          -> it starts at the tile's first row (A is a transposed score);
//   kLowerOut: only out(i, j) with j <= i is used -> column tiles right of the diagonal are skipped.
enum class Band { kLowerA, kUpperA, kLowerOut };

// out[i, j] = sum_{k0 <= k < k1} A(i, k) * b[k, j] for `rows` rows and nv vectors of columns, with
// A(i, k) = a[i * a_row + k * a_col]: A is read one broadcast scalar at a time, so any layout (a transposed one
// included) costs the same, while b and out need unit stride along j.
template <typename T, int64_t rows, int64_t nv>
inline void tile(const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, int64_t k0, int64_t k1, T* out,
                 int64_t ldo) {
  using L = Lanes<T>;
  using V = typename L::V;
  V acc[rows][nv];
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t v = 0; v < nv; ++v) acc[i][v] = V{};
  }
  if (k0 >= k1) {  // a separate exit keeps the accumulators in registers through the loop below
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t v = 0; v < nv; ++v) store(out + i * ldo + v * L::kWidth, V{});
    }
    return;
  }
  for (int64_t k = k0; k < k1; ++k) {
    V bv[nv];
    for (int64_t v = 0; v < nv; ++v) bv[v] = load<V>(b + k * ldb + v * L::kWidth);
    const T* ak = a + k * a_col;
    for (int64_t i = 0; i < rows; ++i) {
      const V ai = L::splat(ak[i * a_row]);
      for (int64_t v = 0; v < nv; ++v) acc[i][v] += ai * bv[v];
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t v = 0; v < nv; ++v) store(out + i * ldo + v * L::kWidth, acc[i][v]);
  }
}

template <typename T, int64_t rows>
inline void row_tile(const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, int64_t k0, int64_t k1,
                     T* out, int64_t ldo, int64_t col_end) {
  constexpr int64_t W = Lanes<T>::kWidth;
  int64_t j = 0;
  for (; j + 2 * W <= col_end; j += 2 * W) tile<T, rows, 2>(a, a_row, a_col, b + j, ldb, k0, k1, out + j, ldo);
  for (; j < col_end; j += W) tile<T, rows, 1>(a, a_row, a_col, b + j, ldb, k0, k1, out + j, ldo);
}

// Software prefetch of the next block's inputs, a few cache lines per row tile of the current block's products.
// Each block's inputs are first read by the transpose and the first products, which otherwise wait on memory
// (out of cache the forward ran ~20% slower); spreading the requests over the block's arithmetic overlaps that
// wait with work without flooding the miss queues.
class Prefetcher {
 public:
  void clear() { count_ = current_ = row_ = line_ = 0; }
  // `rows` rows of `bytes` each, `stride` bytes apart.
  void add(const void* p, int64_t bytes, int64_t rows = 1, int64_t stride = 0) {
    if (count_ < kRanges && bytes > 0 && rows > 0) {
      ranges_[count_++] = {static_cast<const char*>(p), (bytes + kLine - 1) / kLine, rows, stride};
    }
  }
  // Spread what was added over about `steps` calls of step().
  void plan(int64_t steps) {
    int64_t total = 0;
    for (int i = 0; i < count_; ++i) total += ranges_[i].lines * ranges_[i].rows;
    per_step_ = (total + steps - 1) / std::max<int64_t>(steps, 1);
  }
  void step() {
    for (int64_t k = 0; k < per_step_ && current_ < count_; ++k) {
      const Range& r = ranges_[current_];
      __builtin_prefetch(r.start + row_ * r.stride + line_ * kLine, 0, 3);
      if (++line_ == r.lines) {
        line_ = 0;
        if (++row_ == r.rows) {
          row_ = 0;
          ++current_;
        }
      }
    }
  }

 private:
  struct Range {
    const char* start;
    int64_t lines, rows, stride;
  };
  static constexpr int kRanges = 4;
  static constexpr int64_t kLine = 64;
  Range ranges_[kRanges] = {};
  int count_ = 0, current_ = 0;
  int64_t row_ = 0, line_ = 0, per_step_ = 0;
};

// out (rows x cols) = A (rows x depth) * b (depth x cols); cols is a multiple of the vector width (callers pad).
template <typename T>
void gemm(int64_t rows, int64_t cols, int64_t depth, const T* a, int64_t a_row, int64_t a_col, const T* b,
          int64_t ldb, T* out, int64_t ldo, Band band, Prefetcher& prefetch) {
  constexpr int64_t W = Lanes<T>::kWidth;
  for (int64_t i0 = 0; i0 < rows; i0 += kRows) {
    const int64_t mr = std::min(kRows, rows - i0);
    const int64_t k0 = band == Band::kUpperA ? i0 : 0;
    const int64_t k1 = band == Band::kLowerA ? std::min(i0 + mr, depth) : depth;
    const int64_t col_end = band == Band::kLowerOut ? std::min(round_up(i0 + mr, W), cols) : cols;
    const T* ai = a + i0 * a_row;
    T* oi = out + i0 * ldo;
    prefetch.step();
    switch (mr) {
      case 4: row_tile<T, 4>(ai, a_row, a_col, b, ldb, k0, k1, oi, ldo, col_end); break;
      case 3: row_tile<T, 3>(ai, a_row, a_col, b, ldb, k0, k1, oi, ldo, col_end); break;
      case 2: row_tile<T, 2>(ai, a_row, a_col, b, ldb, k0, k1, oi, ldo, col_end); break;
      default: row_tile<T, 1>(ai, a_row, a_col, b, ldb, k0, k1, oi, ldo, col_end); break;
    }
  }
}

// Sizes of one problem; q_pad, n_pad, p_pad round q, n, p up to the vector width (the padded buffers' strides).
struct Dims {
  int64_t blocks, heads, q, n, p, q_pad, n_pad, p_pad;
};

// Per-thread scratch, allocated once per parallel range and reused by every block in it.
template <typename T>
struct Scratch {
  std::vector<T> bt, cb, scores, decay, dscores, dcb, xt, a, pad_x, pad_y, pad_b, pad_c, pad_out, cols;
  Prefetcher prefetch;
  Scratch(const Dims& d, bool backward)
      : bt(d.n * d.q_pad), cb(d.q * d.q_pad), scores(d.q * d.q_pad), a(d.q_pad), pad_x(d.q * d.p_pad),
        pad_out(d.q * std::max(d.p_pad, d.n_pad)) {
    if (backward) {
      decay.resize(d.q * d.q_pad);
      dscores.resize(d.q * d.q_pad);
      dcb.resize(d.q * d.q_pad);
      xt.resize(d.p * d.q_pad);
      pad_y.resize(d.q * d.p_pad);
      pad_b.resize(d.q * d.n_pad);
      pad_c.resize(d.q * d.n_pad);
      cols.resize(d.q_pad);
    }
  }
};

// src (rows x cols, row stride ld) as a matrix whose rows are a whole number of vectors: src itself when they
// already are, else a zero-padded copy in buf (row stride padded).
template <typename T>
const T* padded_rows(const T* src, int64_t rows, int64_t cols, int64_t ld, int64_t padded, T* buf, int64_t* ld_out) {
  if (cols == padded) {
    *ld_out = ld;
    return src;
  }
  for (int64_t i = 0; i < rows; ++i) {
    std::copy(src + i * ld, src + i * ld + cols, buf + i * padded);
    std::fill(buf + i * padded + cols, buf + (i + 1) * padded, T(0));
  }
  *ld_out = padded;
  return buf;
}

// Two-input lane shuffle with constant indices (index i < lanes picks a[i], else b[i - lanes]); GCC and Clang
// spell the builtin differently.
#if defined(__clang__)
#define LANE_SHUFFLE(Mask, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define LANE_SHUFFLE(Mask, a, b, ...) __builtin_shuffle(a, b, Mask{__VA_ARGS__})
#endif

// One W x W block of dst = src^T (row strides ld_src, ld_dst) in registers: three rounds of two-input shuffles
// (unpack, pairwise shuffle, 128-bit half swap), against W * W scalar strided moves.
inline void transpose_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  using V = Lanes<float>::V;
  typedef int32_t M __attribute__((vector_size(32)));
  V r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = load<V>(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = LANE_SHUFFLE(M, r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = LANE_SHUFFLE(M, r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int h = 0; h < 2; ++h) {
      u[i + 2 * h] = LANE_SHUFFLE(M, t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * h + 1] = LANE_SHUFFLE(M, t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int j = 0; j < 4; ++j) {
    store(dst + j * ld_dst, LANE_SHUFFLE(M, u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    store(dst + (j + 4) * ld_dst, LANE_SHUFFLE(M, u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}

inline void transpose_block(const double* src, int64_t ld_src, double* dst, int64_t ld_dst) {
  using V = Lanes<double>::V;
  typedef int64_t M __attribute__((vector_size(32)));
  V r[4], t[4];
  for (int i = 0; i < 4; ++i) r[i] = load<V>(src + i * ld_src);
  for (int i = 0; i < 4; i += 2) {
    t[i] = LANE_SHUFFLE(M, r[i], r[i + 1], 0, 4, 2, 6);
    t[i + 1] = LANE_SHUFFLE(M, r[i], r[i + 1], 1, 5, 3, 7);
  }
  for (int j = 0; j < 2; ++j) {
    store(dst + j * ld_dst, LANE_SHUFFLE(M, t[j], t[j + 2], 0, 1, 4, 5));
    store(dst + (j + 2) * ld_dst, LANE_SHUFFLE(M, t[j], t[j + 2], 2, 3, 6, 7));
  }
}

// dst (cols x rows_pad) = src (rows x cols, row stride ld) transposed, columns past rows zero.
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t ld, T* dst, int64_t rows_pad) {
  constexpr int64_t W = Lanes<T>::kWidth;
  const int64_t rows_w = rows / W * W, cols_w = cols / W * W;
  for (int64_t i = 0; i < rows_w; i += W) {
    for (int64_t j = 0; j < cols_w; j += W) transpose_block(src + i * ld + j, ld, dst + j * rows_pad + i, rows_pad);
  }
  for (int64_t j = 0; j < cols; ++j) {  // the edges the whole blocks leave, and the zero padding
    T* d = dst + j * rows_pad;
    for (int64_t i = j < cols_w ? rows_w : 0; i < rows; ++i) d[i] = src[i * ld + j];
    for (int64_t i = rows; i < rows_pad; ++i) d[i] = T(0);
  }
}

// A product into out (rows x cols, row stride ld) directly when its rows are whole vectors, else through a padded
// buffer: the padded columns of `padded` are computed and dropped.
template <typename T, typename F>
void into_rows(T* out, int64_t rows, int64_t cols, int64_t ld, int64_t padded, T* buf, F&& product) {
  if (cols == padded) {
    product(out, ld);
    return;
  }
  product(buf, padded);
  for (int64_t i = 0; i < rows; ++i) std::copy(buf + i * padded, buf + i * padded + cols, out + i * ld);
}

// C B^T of one block into cb (q x q_pad), lower-triangular tiles only (see head_scores for what is read).
template <typename T>
void group_scores(const Dims& d, const T* c, const T* b, Scratch<T>& ws) {
  transpose(b, d.q, d.n, d.n, ws.bt.data(), d.q_pad);
  gemm<T>(d.q, d.q_pad, d.n, c, d.n, 1, ws.bt.data(), d.q_pad, ws.cb.data(), d.q_pad, Band::kLowerOut, ws.prefetch);
}

// One head's scores cb * exp(a[q] - a[s]) for s <= q and exact zeros for q < s < round_up(q + 1, W): that extent
// covers every column a tile whose rows include q reads (kRows divides W), and cb's kLowerOut tiles reach it too.
// With `decay` given, the exp factors are kept there (same layout) for the backward.
template <typename T>
void head_scores(const Dims& d, const T* a_head, Scratch<T>& ws, T* decay) {
  constexpr int64_t W = Lanes<T>::kWidth;
  T* a = ws.a.data();
  std::copy(a_head, a_head + d.q, a);
  std::fill(a + d.q, a + d.q_pad, T(0));
  for (int64_t q = 0; q < d.q; ++q) {
    const T aq = a[q];
    const T* cb = ws.cb.data() + q * d.q_pad;
    T* sc = ws.scores.data() + q * d.q_pad;
    const int64_t extent = round_up(q + 1, W);
    if (decay != nullptr) {
      T* dec = decay + q * d.q_pad;
      for (int64_t s = 0; s < extent; ++s) {
        const T e = s <= q ? exp_approx(aq - a[s]) : T(0);
        dec[s] = e;
        sc[s] = cb[s] * e;
      }
    } else {
      for (int64_t s = 0; s < extent; ++s) sc[s] = s <= q ? cb[s] * exp_approx(aq - a[s]) : T(0);
    }
  }
}

// Where one block's operands lie. dy may be any view with unit stride along p (the gradient of y_diag arrives
// as a permutation of y's gradient; reading it in place saves a copy the size of x).
template <typename T>
struct Block {
  const T *c, *b, *a, *x, *dy;
  int64_t dy_head, dy_row;  // dy's strides along r and q
};

template <typename T>
void forward_block(const Dims& d, const Block<T>& blk, T* y, Scratch<T>& ws) {
  group_scores(d, blk.c, blk.b, ws);
  for (int64_t r = 0; r < d.heads; ++r) {
    head_scores<T>(d, blk.a + r * d.q, ws, nullptr);
    int64_t ldx;
    const T* xr = padded_rows(blk.x + r * d.q * d.p, d.q, d.p, d.p, d.p_pad, ws.pad_x.data(), &ldx);
    into_rows(y + r * d.q * d.p, d.q, d.p, d.p, d.p_pad, ws.pad_out.data(), [&](T* out, int64_t ldo) {
      gemm<T>(d.q, d.p_pad, d.q, ws.scores.data(), d.q_pad, 1, xr, ldx, out, ldo, Band::kLowerA, ws.prefetch);
    });
  }
}

// Gradients of one block. With S = cb * decay (lower triangular) and dS = dy x^T:
//   dx = S^T dy;  d cb = sum_r dS * decay_r;  da[q] = sum_s (dS * S)[q, s] - sum_s (dS * S)[s, q]
//   (a enters only through exp(a[q] - a[s])); dC = d cb B; dB = d cb^T C.
template <typename T>
void backward_block(const Dims& d, const Block<T>& blk, T* dc, T* db, T* da, T* dx, Scratch<T>& ws) {
  constexpr int64_t W = Lanes<T>::kWidth;
  using V = typename Lanes<T>::V;
  group_scores(d, blk.c, blk.b, ws);
  std::fill(ws.dcb.begin(), ws.dcb.end(), T(0));
  for (int64_t r = 0; r < d.heads; ++r) {
    head_scores<T>(d, blk.a + r * d.q, ws, ws.decay.data());
    const T* xr = blk.x + r * d.q * d.p;
    const T* dyr = blk.dy + r * blk.dy_head;
    transpose(xr, d.q, d.p, d.p, ws.xt.data(), d.q_pad);
    gemm<T>(d.q, d.q_pad, d.p, dyr, blk.dy_row, 1, ws.xt.data(), d.q_pad, ws.dscores.data(), d.q_pad,
            Band::kLowerOut, ws.prefetch);
    int64_t ldy;
    const T* dyp = padded_rows(dyr, d.q, d.p, blk.dy_row, d.p_pad, ws.pad_y.data(), &ldy);
    into_rows(dx + r * d.q * d.p, d.q, d.p, d.p, d.p_pad, ws.pad_out.data(), [&](T* out, int64_t ldo) {
      gemm<T>(d.q, d.p_pad, d.q, ws.scores.data(), 1, d.q_pad, dyp, ldy, out, ldo, Band::kUpperA, ws.prefetch);
    });

    T* col_sum = ws.cols.data();
    std::fill(col_sum, col_sum + d.q_pad, T(0));
    T* da_r = da + r * d.q;
    for (int64_t q = 0; q < d.q; ++q) {
      const T* ds = ws.dscores.data() + q * d.q_pad;
      const T* sc = ws.scores.data() + q * d.q_pad;
      const T* dec = ws.decay.data() + q * d.q_pad;
      T* dcb = ws.dcb.data() + q * d.q_pad;
      // Right of the diagonal (up to the row's extent) scores and decays are exact zeros and dscores is computed
      // (its kLowerOut tiles reach the same extent), so those terms vanish without a mask.
      V row = V{};
      for (int64_t s = 0; s < round_up(q + 1, W); s += W) {
        const V g = load<V>(ds + s);
        const V w = g * load<V>(sc + s);
        row += w;
        store(col_sum + s, load<V>(col_sum + s) + w);
        store(dcb + s, load<V>(dcb + s) + g * load<V>(dec + s));
      }
      T total = 0;
      for (int64_t l = 0; l < W; ++l) total += row[l];
      da_r[q] = total;
    }
    for (int64_t q = 0; q < d.q; ++q) da_r[q] -= col_sum[q];
  }
  int64_t ldb, ldc;
  const T* bp = padded_rows(blk.b, d.q, d.n, d.n, d.n_pad, ws.pad_b.data(), &ldb);
  const T* cp = padded_rows(blk.c, d.q, d.n, d.n, d.n_pad, ws.pad_c.data(), &ldc);
  into_rows(dc, d.q, d.n, d.n, d.n_pad, ws.pad_out.data(), [&](T* out, int64_t ldo) {
    gemm<T>(d.q, d.n_pad, d.q, ws.dcb.data(), d.q_pad, 1, bp, ldb, out, ldo, Band::kLowerA, ws.prefetch);
  });
  into_rows(db, d.q, d.n, d.n, d.n_pad, ws.pad_out.data(), [&](T* out, int64_t ldo) {
    gemm<T>(d.q, d.n_pad, d.q, ws.dcb.data(), 1, d.q_pad, cp, ldc, out, ldo, Band::kUpperA, ws.prefetch);
  });
}

template <typename T>
Dims dims_for(const at::Tensor& c, const at::Tensor& x) {
  constexpr int64_t W = Lanes<T>::kWidth;
  const int64_t q = x.size(4), n = c.size(4), p = x.size(5);
  return {c.size(0) * c.size(1) * c.size(2), x.size(3), q, n, p, round_up(q, W), round_up(n, W), round_up(p, W)};
}

void check_inputs(const char* name, const at::Tensor& c, const at::Tensor& b, const at::Tensor& a_cum,
                  const at::Tensor& x) {
  TORCH_CHECK(c.dim() == 5 && x.dim() == 6 && a_cum.dim() == 5, name,
              ": expected C, B (b, c, g, q, n), a_cum (b, c, g, r, q) and x (b, c, g, r, q, p)");
  TORCH_CHECK(b.sizes() == c.sizes(), name, ": B and C must have the same shape");
  TORCH_CHECK(x.sizes().slice(0, 3) == c.sizes().slice(0, 3) && x.size(4) == c.size(3), name,
              ": x must be (b, c, g, r, q, p) over C's (b, c, g, q)");
  TORCH_CHECK(a_cum.sizes() == x.sizes().slice(0, 5), name, ": a_cum must be (b, c, g, r, q)");
  for (const at::Tensor* t : {&c, &b, &a_cum, &x}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == c.scalar_type() && t->device().is_cpu(), name,
                ": all inputs must be contiguous CPU tensors of one dtype");
  }
}

// The operands of block i (batch, chunk, group flattened in that order); dy is optional.
template <typename T>
Block<T> block_at(const Dims& d, int64_t i, const at::Tensor& c, const at::Tensor& b, const at::Tensor& a_cum,
                  const at::Tensor& x, const at::Tensor* dy) {
  const int64_t group = i * d.q * d.n, head = i * d.heads * d.q;
  Block<T> blk{c.data_ptr<T>() + group, b.data_ptr<T>() + group, a_cum.data_ptr<T>() + head,
               x.data_ptr<T>() + head * d.p, nullptr, 0, 0};
  if (dy != nullptr) {
    const int64_t chunks = dy->size(1), groups = dy->size(2);
    blk.dy = dy->data_ptr<T>() + (i / (chunks * groups)) * dy->stride(0) + (i / groups % chunks) * dy->stride(1) +
             (i % groups) * dy->stride(2);
    blk.dy_head = dy->stride(3);
    blk.dy_row = dy->stride(4);
  }
  return blk;
}

// Queue the inputs of block i + 1, if it is still this thread's (below end), for prefetching over `steps` row
// tiles of block i.
template <typename T>
void prefetch_next(const Dims& d, int64_t i, int64_t end, int64_t steps, const at::Tensor& c, const at::Tensor& b,
                   const at::Tensor& a_cum, const at::Tensor& x, const at::Tensor* dy, Prefetcher& prefetch) {
  prefetch.clear();
  if (i + 1 >= end) return;
  const Block<T> next = block_at<T>(d, i + 1, c, b, a_cum, x, dy);
  const int64_t group = d.q * d.n * sizeof(T), head = d.heads * d.q * sizeof(T);
  prefetch.add(next.c, group);
  prefetch.add(next.b, group);
  prefetch.add(next.x, head * d.p);
  if (dy != nullptr && next.dy_head == d.p) {  // heads adjacent: one run of heads * p per row (y's own layout)
    prefetch.add(next.dy, head / d.q * d.p, d.q, next.dy_row * sizeof(T));
  } else if (dy != nullptr && next.dy_row == d.p && next.dy_head == d.q * d.p) {
    prefetch.add(next.dy, head * d.p);
  }
  prefetch.plan(steps);
}

// C, B (b, c, g, q, n), a_cum (b, c, g, r, q), x (b, c, g, r, q, p), all contiguous
// -> y (b, c, g, r, q, p) contiguous: y[..., q, :] = sum_{s <= q} (C_q . B_s) exp(a_q - a_s) x[..., s, :].
at::Tensor ssd_chunk_diag(const at::Tensor& c, const at::Tensor& b, const at::Tensor& a_cum, const at::Tensor& x) {
  check_inputs("ssd_chunk_diag", c, b, a_cum, x);
  auto y = at::empty_like(x);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_chunk_diag", [&] {
    const Dims d = dims_for<scalar_t>(c, x);
    const int64_t row_tiles = (d.q + kRows - 1) / kRows * (1 + d.heads);
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, d.blocks, 1, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> ws(d, false);
      for (int64_t i = begin; i < end; ++i) {
        prefetch_next<scalar_t>(d, i, end, row_tiles, c, b, a_cum, x, nullptr, ws.prefetch);
        forward_block<scalar_t>(d, block_at<scalar_t>(d, i, c, b, a_cum, x, nullptr),
                                yp + i * d.heads * d.q * d.p, ws);
      }
    });
  });
  return y;
}

// Gradients of ssd_chunk_diag with respect to C, B, a_cum and x, given dy shaped like x with unit stride along p
// (any other strides), each shaped and laid out like its input.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ssd_chunk_diag_backward(
    const at::Tensor& c, const at::Tensor& b, const at::Tensor& a_cum, const at::Tensor& x, const at::Tensor& dy) {
  check_inputs("ssd_chunk_diag_backward", c, b, a_cum, x);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.device().is_cpu() &&
                  (dy.stride(5) == 1 || dy.size(5) <= 1),
              "ssd_chunk_diag_backward: dy must be shaped like x, of its dtype, with unit stride along p");
  auto dc = at::empty_like(c), db = at::empty_like(b), da = at::empty_like(a_cum), dx = at::empty_like(x);
  if (x.numel() == 0 || c.numel() == 0) return {dc.zero_(), db.zero_(), da.zero_(), dx.zero_()};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_chunk_diag_backward", [&] {
    const Dims d = dims_for<scalar_t>(c, x);
    const int64_t row_tiles = (d.q + kRows - 1) / kRows * (3 + 2 * d.heads);
    scalar_t* dcp = dc.data_ptr<scalar_t>();
    scalar_t* dbp = db.data_ptr<scalar_t>();
    scalar_t* dap = da.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, d.blocks, 1, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> ws(d, true);
      for (int64_t i = begin; i < end; ++i) {
        prefetch_next<scalar_t>(d, i, end, row_tiles, c, b, a_cum, x, &dy, ws.prefetch);
        const int64_t group = i * d.q * d.n, head = i * d.heads * d.q;
        backward_block<scalar_t>(d, block_at<scalar_t>(d, i, c, b, a_cum, x, &dy), dcp + group, dbp + group,
                                 dap + head, dxp + head * d.p, ws);
      }
    });
  });
  return {dc, db, da, dx};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(megatron, m) {
  m.def("ssd_chunk_diag(Tensor C, Tensor B, Tensor a_cum, Tensor x) -> Tensor", &ssd_chunk_diag);
  m.def("ssd_chunk_diag_backward(Tensor C, Tensor B, Tensor a_cum, Tensor x, Tensor dy) -> "
        "(Tensor, Tensor, Tensor, Tensor)",
        &ssd_chunk_diag_backward);
}
