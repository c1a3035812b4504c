// Depthwise causal 1-D convolution + SiLU over channel-last inputs (CPU), forward and backward, as used in front of
// every Mamba2 scan. It computes the same function as megatron/core/ssm/ops/causal_conv1d.py (causal_conv1d_fn with
// activation="silu"), but reads x as (batch, length, channels) straight out of the in_proj output (no transpose copy),
// writes each requested channel range (x, B, C) as its own contiguous tensor (so autograd needs no split/cat), fuses
// the SiLU, and recomputes the pre-activation in the backward instead of storing it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;  // channels per work item: a 256-byte slice of each row for float32

using vec_math::exp_approx;

template <typename T>
inline T sigmoid(T v) { return T(1) / (T(1) + exp_approx(-v)); }

// One output tensor's share of the channels, cut into blocks that never straddle two outputs.
struct Block {
  int64_t channel, width, piece;
};

std::vector<Block> channel_blocks(at::IntArrayRef widths) {
  std::vector<Block> blocks;
  int64_t start = 0;
  for (int64_t piece = 0; piece < static_cast<int64_t>(widths.size()); ++piece) {
    for (int64_t c = 0; c < widths[piece]; c += kBlock) {
      blocks.push_back({start + c, std::min(kBlock, widths[piece] - c), piece});
    }
    start += widths[piece];
  }
  return blocks;
}

// Shapes shared by forward and backward. x: (b, l, d) with unit channel stride; weight (d, K) contiguous.
struct Geometry {
  int64_t batch, length, channels, width, batch_stride, row_stride;
};

Geometry geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef widths) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "causal_conv1d_silu: x must be (batch, length, channels) with "
              "contiguous channels");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(0) == x.size(2),
              "causal_conv1d_silu: weight must be a contiguous (channels, width) tensor");
  int64_t total = 0;
  for (const int64_t w : widths) total += w;
  TORCH_CHECK(total == x.size(2), "causal_conv1d_silu: output widths sum to ", total, ", x has ", x.size(2),
              " channels");
  return {x.size(0), x.size(1), x.size(2), weight.size(1), x.stride(0), x.stride(1)};
}

// The pre-activation of one block at (b, t): bias + sum_k w[c, k] x[b, t - K + 1 + k, c], with inputs before t = 0
// taken from `initial` (b, d, K - 1) when given, else zero. wt is the block's weights as (K, kBlock).
template <typename T>
inline void preactivation(const T* x, const T* initial, const T* wt, const T* bias, const Geometry& g,
                          const Block& blk, int64_t b, int64_t t, T* acc) {
  for (int64_t c = 0; c < blk.width; ++c) acc[c] = bias ? bias[blk.channel + c] : T(0);
  for (int64_t k = 0; k < g.width; ++k) {
    const int64_t source = t - g.width + 1 + k;
    const T* w = wt + k * kBlock;
    if (source >= 0) {
      const T* row = x + b * g.batch_stride + source * g.row_stride + blk.channel;
      for (int64_t c = 0; c < blk.width; ++c) acc[c] += w[c] * row[c];
    } else if (initial != nullptr) {
      const int64_t slot = g.width - 1 + source;
      for (int64_t c = 0; c < blk.width; ++c) {
        acc[c] += w[c] * initial[(b * g.channels + blk.channel + c) * (g.width - 1) + slot];
      }
    }
  }
}

template <typename T>
void block_weights(const T* weight, const Geometry& g, const Block& blk, T* wt) {
  for (int64_t k = 0; k < g.width; ++k) {
    for (int64_t c = 0; c < blk.width; ++c) wt[k * kBlock + c] = weight[(blk.channel + c) * g.width + k];
  }
}

template <typename T>
void forward_kernel(const at::Tensor& x, const at::Tensor& weight, const T* bias, const T* initial,
                    const Geometry& g, const std::vector<Block>& blocks, std::vector<at::Tensor>& outputs,
                    at::IntArrayRef widths, const std::vector<int64_t>& offsets) {
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> wt(g.width * kBlock), acc(kBlock);
    for (int64_t i = begin; i < end; ++i) {
      const Block& blk = blocks[i];
      block_weights(wp, g, blk, wt.data());
      const int64_t piece_width = widths[blk.piece];
      T* out = outputs[blk.piece].data_ptr<T>() + (blk.channel - offsets[blk.piece]);
      for (int64_t b = 0; b < g.batch; ++b) {
        for (int64_t t = 0; t < g.length; ++t) {
          preactivation(xp, initial, wt.data(), bias, g, blk, b, t, acc.data());
          T* o = out + (b * g.length + t) * piece_width;
          for (int64_t c = 0; c < blk.width; ++c) o[c] = acc[c] * sigmoid(acc[c]);
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const std::vector<at::Tensor>& grads, const at::Tensor& x, const at::Tensor& weight,
                     const T* bias, const Geometry& g, const std::vector<Block>& blocks, at::IntArrayRef widths,
                     const std::vector<int64_t>& offsets, at::Tensor& grad_x, at::Tensor& grad_w,
                     at::Tensor& grad_b) {
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* gx = grad_x.data_ptr<T>();
  const int64_t gx_batch_stride = grad_x.stride(0), gx_row_stride = grad_x.stride(1);
  T* gw = grad_w.data_ptr<T>();
  T* gb = grad_b.data_ptr<T>();
  const int64_t K = g.width;
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> wt(K * kBlock), acc(kBlock), ring(K * kBlock), w_sum(K * kBlock), b_sum(kBlock);
    for (int64_t i = begin; i < end; ++i) {
      const Block& blk = blocks[i];
      block_weights(wp, g, blk, wt.data());
      std::fill(w_sum.begin(), w_sum.end(), T(0));
      std::fill(b_sum.begin(), b_sum.end(), T(0));
      const int64_t piece_width = widths[blk.piece];
      const T* grad_out = grads[blk.piece].data_ptr<T>() + (blk.channel - offsets[blk.piece]);
      for (int64_t b = 0; b < g.batch; ++b) {
        std::fill(ring.begin(), ring.end(), T(0));  // gradients of the pre-activation at t + 1 .. t + K - 1
        for (int64_t t = g.length - 1; t >= 0; --t) {
          preactivation(xp, static_cast<const T*>(nullptr), wt.data(), bias, g, blk, b, t, acc.data());
          const T* go = grad_out + (b * g.length + t) * piece_width;
          T* slot = ring.data() + (t % K) * kBlock;  // reuses the slot of t + K, no longer needed
          for (int64_t c = 0; c < blk.width; ++c) {
            const T s = sigmoid(acc[c]);
            slot[c] = go[c] * s * (T(1) + acc[c] * (T(1) - s));
            b_sum[c] += slot[c];
          }
          // x[t] feeds the outputs t .. t + K - 1 through weight K - 1 - j; it also pairs with the gradient at
          // t for weight k through input t - K + 1 + k.
          T* gxr = gx + b * gx_batch_stride + t * gx_row_stride + blk.channel;
          for (int64_t c = 0; c < blk.width; ++c) gxr[c] = T(0);
          for (int64_t j = 0; j < K && t + j < g.length; ++j) {
            const T* ga = ring.data() + ((t + j) % K) * kBlock;
            const T* w = wt.data() + (K - 1 - j) * kBlock;
            for (int64_t c = 0; c < blk.width; ++c) gxr[c] += w[c] * ga[c];
          }
          for (int64_t k = 0; k < K; ++k) {
            const int64_t source = t - K + 1 + k;
            if (source < 0) continue;
            const T* row = xp + b * g.batch_stride + source * g.row_stride + blk.channel;
            T* ws = w_sum.data() + k * kBlock;
            for (int64_t c = 0; c < blk.width; ++c) ws[c] += slot[c] * row[c];
          }
        }
      }
      for (int64_t c = 0; c < blk.width; ++c) {
        gb[blk.channel + c] = b_sum[c];
        for (int64_t k = 0; k < K; ++k) gw[(blk.channel + c) * K + k] = w_sum[k * kBlock + c];
      }
    }
  });
}

std::vector<int64_t> piece_offsets(at::IntArrayRef widths) {
  std::vector<int64_t> offsets;
  int64_t start = 0;
  for (const int64_t w : widths) {
    offsets.push_back(start);
    start += w;
  }
  return offsets;
}

void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == x.size(2) &&
                                    bias->scalar_type() == x.scalar_type()),
              "causal_conv1d_silu: bias must be a contiguous (channels,) tensor of x's dtype");
}

// x (b, l, d), weight (d, K), bias (d) or None, initial (b, d, K - 1) or None -> one contiguous (b, l, width_i)
// tensor per entry of widths (which sum to d): SiLU of the causal depthwise convolution.
std::vector<at::Tensor> causal_conv1d_silu(const at::Tensor& x, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias,
                                           const c10::optional<at::Tensor>& initial, at::IntArrayRef widths) {
  const Geometry g = geometry(x, weight, widths);
  check_bias(bias, x);
  TORCH_CHECK(!initial.has_value() || (initial->is_contiguous() && initial->size(0) == g.batch &&
                                       initial->size(1) == g.channels && initial->size(2) == g.width - 1),
              "causal_conv1d_silu: initial states must be a contiguous (batch, channels, width - 1) tensor");
  std::vector<at::Tensor> outputs;
  for (const int64_t w : widths) outputs.push_back(at::empty({g.batch, g.length, w}, x.options()));
  const auto blocks = channel_blocks(widths);
  const auto offsets = piece_offsets(widths);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_silu", [&] {
    forward_kernel<scalar_t>(x, weight, bias ? bias->data_ptr<scalar_t>() : nullptr,
                             initial ? initial->data_ptr<scalar_t>() : nullptr, g, blocks, outputs, widths,
                             offsets);
  });
  return outputs;
}

// Gradients of causal_conv1d_silu (started from zeros) with respect to x, written into grad_x ((b, l, d) with
// unit channel stride: it may be a column slice of a larger gradient, which then needs no concatenation), and
// returned for weight and bias, given the gradients of its outputs (contiguous, one per entry of widths).
std::tuple<at::Tensor, at::Tensor> causal_conv1d_silu_backward(
    at::TensorList grads, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef widths, at::Tensor grad_x) {
  const Geometry g = geometry(x, weight, widths);
  check_bias(bias, x);
  TORCH_CHECK(grads.size() == widths.size(), "causal_conv1d_silu_backward: one gradient per output is needed");
  std::vector<at::Tensor> grad_list;
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK(grads[i].is_contiguous() && grads[i].size(2) == widths[i] && grads[i].size(1) == g.length,
                "causal_conv1d_silu_backward: gradient ", i, " must be a contiguous (b, l, ", widths[i], ") tensor");
    grad_list.push_back(grads[i]);
  }
  TORCH_CHECK(grad_x.dim() == 3 && grad_x.size(0) == g.batch && grad_x.size(1) == g.length &&
                  grad_x.size(2) == g.channels && grad_x.stride(2) == 1 && grad_x.scalar_type() == x.scalar_type(),
              "causal_conv1d_silu_backward: grad_x must be (", g.batch, ", ", g.length, ", ", g.channels,
              ") with unit channel stride, got ", grad_x.sizes());
  auto grad_w = at::empty_like(weight);
  auto grad_b = at::empty({g.channels}, x.options());
  const auto blocks = channel_blocks(widths);
  const auto offsets = piece_offsets(widths);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_silu_backward", [&] {
    backward_kernel<scalar_t>(grad_list, x, weight, bias ? bias->data_ptr<scalar_t>() : nullptr, g, blocks, widths,
                              offsets, grad_x, grad_w, grad_b);
  });
  return {grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(megatron, m) {
  m.def("causal_conv1d_silu(Tensor x, Tensor weight, Tensor? bias, Tensor? initial, int[] widths) -> Tensor[]",
        &causal_conv1d_silu);
  m.def("causal_conv1d_silu_backward(Tensor[] grads, Tensor x, Tensor weight, Tensor? bias, int[] widths, "
        "Tensor(a!) grad_x) -> (Tensor, Tensor)",
        &causal_conv1d_silu_backward);
}
