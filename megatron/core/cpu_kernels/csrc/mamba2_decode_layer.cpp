// A whole Mamba2 layer for a few decoding tokens on CPU: hidden + out_proj(step(in_proj(rmsnorm(hidden)))). It
// computes the same function as MambaLayer's module path (pre-norm fused into in_proj, no biases, one
// tensor-parallel rank), in one call instead of a dozen Python-level module and op calls, whose overhead is a
// sizeable share of a single-token step on CPU. Several tokens (speculative verification) step the recurrence one
// token at a time but read the projection weights once for all of them, so they cost little more than one token;
// each token's result is bit for bit what a single-token call gives. Given history tensors, the states after each
// token are copied there (speculative decoding rolls back to the last accepted token from them).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

#include <optional>
#include <vector>

// hidden (b, s, h) contiguous; in_proj_weight (row, h); out_proj_weight (h, d_inner); conv_history and
// ssm_history (s, b, ...) as the states, or None; the rest as mamba2_decode_step. Returns (b, s, h).
at::Tensor mamba2_decode_layer(const at::Tensor& hidden, const at::Tensor& norm_weight, double norm_eps,
                               const at::Tensor& in_proj_weight, at::Tensor conv_state, at::Tensor ssm_state,
                               at::Tensor conv_weight, at::Tensor conv_bias, at::Tensor A_log, at::Tensor D,
                               at::Tensor dt_bias, at::Tensor gate_norm_weight, int64_t ngroups, double gate_eps,
                               const at::Tensor& out_proj_weight, std::optional<at::Tensor> conv_history,
                               std::optional<at::Tensor> ssm_history) {
  TORCH_CHECK(hidden.dim() == 3 && hidden.is_contiguous(), "mamba2_decode_layer expects a contiguous (b, s, h) "
              "hidden, got ", hidden.sizes());
  const int64_t b = hidden.size(0), s = hidden.size(1), h = hidden.size(2);
  const auto flat = hidden.view({b * s, h});
  const auto zxbcdt = small_batch_linear(rms_norm(flat, norm_weight, norm_eps), in_proj_weight, std::nullopt)
                          .view({b, s, -1});
  const bool record = conv_history.has_value() && ssm_history.has_value();
  if (record) {
    TORCH_CHECK(conv_history->size(0) == s && ssm_history->size(0) == s, "mamba2_decode_layer: the histories "
                "need one entry per token (", s, "), got ", conv_history->size(0), " and ", ssm_history->size(0));
  }
  std::vector<at::Tensor> steps;
  for (int64_t t = 0; t < s; ++t) {  // the recurrence: token by token, states updated in place
    steps.push_back(mamba2_decode_step(zxbcdt.select(1, t).contiguous(), conv_state, ssm_state, conv_weight,
                                       conv_bias, A_log, D, dt_bias, gate_norm_weight, ngroups, gate_eps));
    if (record) {
      conv_history->select(0, t).copy_(conv_state);
      ssm_history->select(0, t).copy_(ssm_state);
    }
  }
  const auto y = s == 1 ? steps[0] : at::stack(steps, 1).view({b * s, -1});
  return small_batch_linear(y, out_proj_weight, std::nullopt).view({b, s, h}).add_(hidden);
}

TORCH_LIBRARY_FRAGMENT(megatron, m) {
  m.def("mamba2_decode_layer(Tensor hidden, Tensor norm_weight, float norm_eps, Tensor in_proj_weight, "
        "Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor conv_weight, Tensor conv_bias, Tensor A_log, Tensor D, "
        "Tensor dt_bias, Tensor gate_norm_weight, int ngroups, float gate_eps, Tensor out_proj_weight, "
        "Tensor(c!)? conv_history, Tensor(d!)? ssm_history) -> Tensor",
        &mamba2_decode_layer);
}
