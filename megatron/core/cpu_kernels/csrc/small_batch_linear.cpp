// x @ weight.T + bias for a few rows of x (single-token decoding), reading the weight in its natural nn.Linear
// layout (out_features, in_features): each output is the dot product of one contiguous weight row with one input
// row, computed for all inputs while the row is in L1, so the weight is read from memory exactly once, as a few
// sequential streams per thread. PyTorch's CPU GEMM is several times slower for this shape (m = 1..16), and
// multiplying by a transposed copy of the weight costs the copy and doubles the weight memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"
#include "linear_rows.h"

#include <algorithm>
#include <cstdint>
#include <optional>

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
  // A row costs m * k multiply-adds; at::parallel_for splits the rows into min(threads, n / grain) equal ranges.
  const int64_t grain = std::max<int64_t>(1, linear_rows::kGrainMacs / std::max<int64_t>(1, m * k));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "small_batch_linear", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* b = has_bias ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      linear_rows::rows_range_for<scalar_t, scalar_t>(w, xp, b, o, m, k, n, begin, end);
    });
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(megatron, m) {
  m.def("small_batch_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &small_batch_linear);
}
