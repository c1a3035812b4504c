// One Mamba2 decoding step on CPU, fused: causal-conv shift + SiLU, dt softplus, SSD state update and read-out,
// D skip, SiLU gate and grouped RMSNorm. It computes the same function as the composed PyTorch ops in
// megatron/core/ssm/mamba_mixer.py (MambaMixer._step); one call replaces about thirty small tensor ops, whose
// dispatch cost dominates single-token decoding on CPU. float32, contiguous tensors; states are updated in place.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <cmath>
#include <vector>

namespace {

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }
inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }

}  // namespace

// zxbcdt: (b, d_inner + conv_channels + nheads), the in_proj output rows [z | x B C | dt];
// conv_state: (b, conv_channels, K); ssm_state: (b, nheads, headdim, d_state); conv_weight: (conv_channels, K);
// conv_bias: (conv_channels); A_log, D, dt_bias: (nheads); norm_weight: (d_inner). Returns y: (b, d_inner).
at::Tensor mamba2_decode_step(at::Tensor zxbcdt, at::Tensor conv_state, at::Tensor ssm_state,
                                 at::Tensor conv_weight, at::Tensor conv_bias, at::Tensor A_log,
                                 at::Tensor D, at::Tensor dt_bias, at::Tensor norm_weight, int64_t ngroups,
                                 double eps) {
  TORCH_CHECK(zxbcdt.is_contiguous() && conv_state.is_contiguous() && ssm_state.is_contiguous(),
              "mamba2_decode_step needs contiguous inputs and states");
  const int64_t batch = zxbcdt.size(0), channels = conv_state.size(1), width = conv_state.size(2);
  const int64_t nheads = ssm_state.size(1), headdim = ssm_state.size(2), dstate = ssm_state.size(3);
  const int64_t d_inner = nheads * headdim, heads_per_group = nheads / ngroups;
  const int64_t group_size = d_inner / ngroups, row = zxbcdt.size(1);
  auto activated = at::empty({batch, channels}, zxbcdt.options());
  auto y = at::empty({batch, d_inner}, zxbcdt.options());

  const float* rows = zxbcdt.data_ptr<float>();
  float* cs = conv_state.data_ptr<float>();
  float* ss = ssm_state.data_ptr<float>();
  const float* cw = conv_weight.data_ptr<float>();
  const float* cb = conv_bias.data_ptr<float>();
  const float* Alog = A_log.data_ptr<float>();
  const float* Dp = D.data_ptr<float>();
  const float* dbp = dt_bias.data_ptr<float>();
  const float* nw = norm_weight.data_ptr<float>();
  float* act = activated.data_ptr<float>();
  float* yp = y.data_ptr<float>();

  // 1. Shift each channel's window by one, append the new input, convolve, SiLU.
  at::parallel_for(0, batch * channels, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* window = cs + i * width;
      const float* w = cw + (i % channels) * width;
      float acc = cb[i % channels];
      for (int64_t k = 0; k + 1 < width; ++k) {
        window[k] = window[k + 1];
        acc += w[k] * window[k];
      }
      const float input = rows[(i / channels) * row + d_inner + i % channels];
      window[width - 1] = input;
      acc += w[width - 1] * input;
      act[i] = silu(acc);
    }
  });

  // 2. Per head: state = exp(dt A) state + dt x Bᵀ; y = state C + D x; then gate with SiLU(z).
  at::parallel_for(0, batch * nheads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / nheads, h = bh % nheads, g = h / heads_per_group;
      const float step = softplus(rows[b * row + d_inner + channels + h] + dbp[h]);
      const float decay = std::exp(-step * std::exp(Alog[h]));
      const float* x = act + b * channels + h * headdim;
      const float* Bg = act + b * channels + d_inner + g * dstate;
      const float* Cg = act + b * channels + d_inner + ngroups * dstate + g * dstate;
      for (int64_t p = 0; p < headdim; ++p) {
        float* state = ss + ((b * nheads + h) * headdim + p) * dstate;
        const float x_dt = x[p] * step;
        float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 lanes so the loop vectorises without -ffast-math
        int64_t n = 0;
        for (; n + 8 <= dstate; n += 8) {
          for (int j = 0; j < 8; ++j) {
            const float s = state[n + j] * decay + x_dt * Bg[n + j];
            state[n + j] = s;
            partial[j] += s * Cg[n + j];
          }
        }
        float out = 0.0f;
        for (; n < dstate; ++n) {
          const float s = state[n] * decay + x_dt * Bg[n];
          state[n] = s;
          out += s * Cg[n];
        }
        for (int j = 0; j < 8; ++j) out += partial[j];
        const int64_t j = h * headdim + p;
        yp[b * d_inner + j] = (out + Dp[h] * x[p]) * silu(rows[b * row + j]);
      }
    }
  });

  // 3. RMSNorm over each group of channels, then the norm weight.
  at::parallel_for(0, batch * ngroups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      float* values = yp + bg * group_size;
      const float* weight = nw + (bg % ngroups) * group_size;
      double sum_sq = 0.0;
      for (int64_t i = 0; i < group_size; ++i) sum_sq += static_cast<double>(values[i]) * values[i];
      const float scale = 1.0f / std::sqrt(static_cast<float>(sum_sq / group_size) + static_cast<float>(eps));
      for (int64_t i = 0; i < group_size; ++i) values[i] = values[i] * scale * weight[i];
    }
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(megatron, m) {
  m.def("mamba2_decode_step(Tensor zxbcdt, Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor conv_weight, "
        "Tensor conv_bias, Tensor A_log, Tensor D, Tensor dt_bias, Tensor norm_weight, int ngroups, float eps) -> Tensor",
        &mamba2_decode_step);
}
