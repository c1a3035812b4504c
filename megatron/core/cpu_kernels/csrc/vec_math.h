// Elementwise math that loops can vectorise, shared by the CPU kernels.
#pragma once

#include <cmath>
#include <cstdint>

namespace vec_math {

// exp for float32 written so that loops calling it vectorise (std::exp stays scalar): range reduction to r in
// [-ln2/2, ln2/2], a degree-7 Taylor polynomial (relative error < 1e-7 there), and 2^n built from its bits. The
// clamp keeps the result finite and normal for any input; below -87 it returns ~1e-38 instead of 0, far under
// float32 resolution of anything it is added to.
inline float exp_approx(float v) {
  v = v > 88.0f ? 88.0f : v;  // selects, which vectorise under -fno-trapping-math (std::min/max and fmaxf do not)
  v = v < -87.0f ? -87.0f : v;
  const float shifted = v * 1.44269504f + 12582912.0f;  // round(v / ln2) lands in the low mantissa bits
  const float n = shifted - 12582912.0f;
  const float r = (v - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 split in two for an exact product
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t n_bits = __builtin_bit_cast(int32_t, shifted) - 0x4B400000;  // n as an integer
  return p * __builtin_bit_cast(float, (n_bits + 127) << 23);
}

// float64 is the checking dtype, not the training one: exactness matters there, speed does not.
inline double exp_approx(double v) { return std::exp(v); }

}  // namespace vec_math
