// Greedy decoding's next token, argmax over the vocabulary of x @ weight.T, without reading the whole float32
// weight. An int8 copy of the weight (one scale per row) gives every logit to within a proven bound; only rows
// whose upper bound reaches the best lower bound are recomputed from the float32 weight, with the very dot product
// small_batch_linear uses. The answer is therefore the argmax of the logits small_batch_linear would return (first
// index on ties; NaN counts as the maximum, as in torch.argmax), while a decoding step reads a quarter of the output
// layer's bytes: at batch 1 that layer is over a third of all the weight memory a step streams.
//
// The bound, per row r with float32 scale s, codes q (|q| <= 127), e = max_j |w_j - s q_j| (exact, in double) and
// W = max_j |w_j|, for an input x with X = sum_j |x_j|: the float dot product L of w and x is within
// gamma_k W X of the real one (gamma_k = k u / (1 - k u), u = 2^-24), the real one within e X of s * (q . x), and
// the float A = s * fl(q . x) within gamma_k 127 s X + u |A| of that. So |L - A| <= X (e + gamma_k (W + 127 s))
// + u |A|. The stored coefficient doubles the rounding terms, which also covers the float arithmetic of X and of
// the bound itself.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "linear_rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr float kUnitRoundoff = 5.9604644775390625e-08f;  // 2^-24

// The first index of the largest exact logit among the candidate rows of input x (k features).
int64_t exact_argmax(const std::vector<int64_t>& candidates, const float* weight, const float* x, int64_t k) {
  int64_t best = -1;
  float best_value = 0.0f;
  for (const int64_t r : candidates) {
    float value;
    linear_rows::block_dot<float, float, 1, 1>(weight + r * k, 0, x, k, &value);
    const bool take = best < 0 || (std::isnan(value) && !std::isnan(best_value)) ||
                      (!std::isnan(best_value) && value > best_value);
    if (take) {
      best = r;
      best_value = value;
    }
  }
  return best;
}

}  // namespace

// weight (n, k) float32 -> int8 codes (n, k), scales (n) and bound coefficients (n), all float32 (see the top).
// A row that is all zeros gets scale 1; a row with a non-finite value gets an infinite bound (always recomputed).
std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_row_codes(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu() &&
                  weight.is_contiguous(),
              "int8_row_codes expects a contiguous float32 CPU matrix, got ", weight.sizes(), " ",
              weight.scalar_type());
  const int64_t n = weight.size(0), k = weight.size(1);
  auto codes = at::empty({n, k}, weight.options().dtype(at::kChar));
  auto scales = at::empty({n}, weight.options());
  auto bounds = at::empty({n}, weight.options());
  const float* w = weight.data_ptr<float>();
  int8_t* q = codes.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  float* bp = bounds.data_ptr<float>();
  const double gamma = k * double(kUnitRoundoff) / (1.0 - k * double(kUnitRoundoff));
  at::parallel_for(0, n, std::max<int64_t>(1, linear_rows::kGrainMacs / std::max<int64_t>(1, k)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = w + r * k;
      int8_t* codes_row = q + r * k;
      float largest = 0.0f;
      bool finite = true;
      for (int64_t j = 0; j < k; ++j) {
        finite = finite && std::isfinite(row[j]);
        largest = std::max(largest, std::fabs(row[j]));
      }
      if (!finite) {
        std::fill(codes_row, codes_row + k, int8_t(0));
        sp[r] = 0.0f;
        bp[r] = std::numeric_limits<float>::infinity();
        continue;
      }
      const float scale = largest > 0.0f ? largest / 127.0f : 1.0f;
      double error = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        const float code = std::min(127.0f, std::max(-127.0f, std::nearbyint(row[j] / scale)));
        codes_row[j] = static_cast<int8_t>(code);
        error = std::max(error, std::fabs(double(row[j]) - double(scale) * double(code)));
      }
      const double bound = error + 2.0 * gamma * (double(largest) + 127.0 * double(scale));
      // Round up to float: the stored bound must not be smaller than the double one.
      float stored = static_cast<float>(bound);
      if (double(stored) < bound) stored = std::nextafter(stored, std::numeric_limits<float>::infinity());
      sp[r] = scale;
      bp[r] = stored;
    }
  });
  return {codes, scales, bounds};
}

// argmax_j (x @ weight.T)[i, j] for every row i of x (m, k), weight (n, k) float32 with its int8_row_codes.
at::Tensor greedy_argmax(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
                         const at::Tensor& scales, const at::Tensor& bounds) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "greedy_argmax expects x (m, k) and weight (n, k), got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(codes.sizes() == weight.sizes() && codes.scalar_type() == at::kChar && scales.dim() == 1 &&
                  scales.size(0) == weight.size(0) && bounds.sizes() == scales.sizes(),
              "greedy_argmax: codes, scales and bounds must come from int8_row_codes(weight)");
  for (const at::Tensor* t : {&x, &weight, &codes, &scales, &bounds}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "greedy_argmax needs contiguous CPU tensors");
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  scales.scalar_type() == at::kFloat && bounds.scalar_type() == at::kFloat,
              "greedy_argmax runs in float32");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(n > 0, "greedy_argmax needs at least one weight row");
  auto tokens = at::empty({m}, x.options().dtype(at::kLong));
  auto approx = at::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const int8_t* q = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* bp = bounds.data_ptr<float>();
  float* a = approx.data_ptr<float>();
  int64_t* out = tokens.data_ptr<int64_t>();

  // 1. q . x for every row and input: the int8 codes are the only weight bytes read for most rows.
  const int64_t grain = std::max<int64_t>(1, linear_rows::kGrainMacs / std::max<int64_t>(1, m * k));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    linear_rows::rows_range_for<float, int8_t>(q, xp, nullptr, a, m, k, n, begin, end);
  });

  // 2. Per input: the best lower bound, then the exact logits of the rows that can reach it. The comparisons are
  // written so that a NaN bound keeps its row (NaN inputs or weights fall back to exact logits).
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> candidates;
    for (int64_t i = begin; i < end; ++i) {
      const float* xi = xp + i * k;
      float size = 0.0f;
      for (int64_t j = 0; j < k; ++j) size += std::fabs(xi[j]);
      float* ai = a + i * n;
      float lower = -std::numeric_limits<float>::infinity();
      for (int64_t r = 0; r < n; ++r) {
        ai[r] *= sp[r];
        const float low = ai[r] - (bp[r] * size + 2.0f * kUnitRoundoff * std::fabs(ai[r]));
        if (low > lower) lower = low;
      }
      candidates.clear();
      for (int64_t r = 0; r < n; ++r) {
        const float high = ai[r] + (bp[r] * size + 2.0f * kUnitRoundoff * std::fabs(ai[r]));
        if (!(high < lower)) candidates.push_back(r);
      }
      out[i] = exact_argmax(candidates, w, xi, k);
    }
  });
  return tokens;
}

TORCH_LIBRARY_FRAGMENT(megatron, m) {
  m.def("int8_row_codes(Tensor weight) -> (Tensor, Tensor, Tensor)", &int8_row_codes);
  m.def("greedy_argmax(Tensor x, Tensor weight, Tensor codes, Tensor scales, Tensor bounds) -> Tensor",
        &greedy_argmax);
}
