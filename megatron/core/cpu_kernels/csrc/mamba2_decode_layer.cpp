// A whole Mamba2 layer for one decoding token on CPU: hidden + out_proj(step(in_proj(rmsnorm(hidden)))). It computes
// the same function as MambaLayer's module path (pre-norm fused into in_proj, no biases, one tensor-parallel rank),
// in one call instead of a dozen Python-level module and op calls, whose overhead is a sizeable share of a
// single-token step on CPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

// hidden (b, h) contiguous; in_proj_weight (row, h); out_proj_weight (h, d_inner); the rest as mamba2_decode_step.
at::Tensor mamba2_decode_layer(const at::Tensor& hidden, const at::Tensor& norm_weight, double norm_eps,
                               const at::Tensor& in_proj_weight, at::Tensor conv_state, at::Tensor ssm_state,
                               at::Tensor conv_weight, at::Tensor conv_bias, at::Tensor A_log, at::Tensor D,
                               at::Tensor dt_bias, at::Tensor gate_norm_weight, int64_t ngroups, double gate_eps,
                               const at::Tensor& out_proj_weight) {
  const auto zxbcdt = small_batch_linear(rms_norm(hidden, norm_weight, norm_eps), in_proj_weight, std::nullopt);
  const auto y = mamba2_decode_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias,
                                    gate_norm_weight, ngroups, gate_eps);
  return small_batch_linear(y, out_proj_weight, std::nullopt).add_(hidden);
}

TORCH_LIBRARY_FRAGMENT(megatron, m) {
  m.def("mamba2_decode_layer(Tensor hidden, Tensor norm_weight, float norm_eps, Tensor in_proj_weight, "
        "Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor conv_weight, Tensor conv_bias, Tensor A_log, Tensor D, "
        "Tensor dt_bias, Tensor gate_norm_weight, int ngroups, float gate_eps, Tensor out_proj_weight) -> Tensor",
        &mamba2_decode_layer);
}
