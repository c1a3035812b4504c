// The CPU kernels that other kernels call directly (all built into one library; see megatron/core/cpu_kernels/__init__.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>

// x (m, k) @ weight (n, k).T + bias (n) for a few rows m (decoding).
at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// x / sqrt(mean(x^2) + eps) * weight over the last dimension of a contiguous x.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// One Mamba2 token from its in_proj output to the gated norm's output; conv_state and ssm_state updated in place.
at::Tensor mamba2_decode_step(at::Tensor zxbcdt, at::Tensor conv_state, at::Tensor ssm_state, at::Tensor conv_weight,
                              at::Tensor conv_bias, at::Tensor A_log, at::Tensor D, at::Tensor dt_bias,
                              at::Tensor norm_weight, int64_t ngroups, double eps);
