"""RMSNorm / LayerNorm, the single-token linear product used in decoding, and Megatron's init scaling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.cpu_kernels import SMALL_BATCH_ROWS, cpu_op
from megatron.core.inference_params import InferenceParams
from megatron.core.transformer.transformer_config import TransformerConfig


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  inference_params: InferenceParams | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``(..., in) -> (..., out)`` with ``weight`` ``(out, in)`` and ``bias`` ``(out,)``.

    A CPU decoding forward of at most ``SMALL_BATCH_ROWS`` rows (batch x tokens; ``inference_params`` given, no
    autograd: single-token steps, speculative verification) multiplies a few rows by large weights, where
    PyTorch's GEMM is several times slower than streaming the weight. There it runs the ``small_batch_linear`` C++
    kernel, which reads the weight once in its own row-major layout (one dot product per weight row and input row),
    with no transposed copy; ``F.linear`` when the kernel is unavailable.
    """
    rows = x.numel() // max(x.shape[-1], 1)
    if (inference_params is not None and rows <= SMALL_BATCH_ROWS and x.device.type == "cpu"
            and not torch.is_grad_enabled()):
        tensors = (x, weight) if bias is None else (x, weight, bias)
        op = cpu_op("small_batch_linear", *tensors, dtypes=(torch.float32, torch.float64))
        if op is not None and weight.is_contiguous() and (bias is None or bias.is_contiguous()):
            out = op(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
            return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def normalize(
    x: torch.Tensor, normalization: str, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """RMSNorm or LayerNorm of ``x`` over its last dimension, scaled by ``weight`` (and shifted by ``bias``).

    Without autograd on CPU, RMSNorm runs the one-pass ``rms_norm`` C++ kernel: ``F.rms_norm`` dispatches half a dozen
    ops, which costs ~30-70 us per call on a single decoding token (13 calls per token for a 12-layer model)."""
    if normalization == "RMSNorm":
        if not torch.is_grad_enabled() and x.is_contiguous():
            op = cpu_op("rms_norm", x, weight, dtypes=(torch.float32, torch.float64))
            if op is not None and weight.is_contiguous():
                return op(x, weight, eps)
        return F.rms_norm(x, weight.shape, weight, eps)
    return F.layer_norm(x, weight.shape, weight, bias, eps)


class Norm(nn.Module):
    """The norm chosen by ``config.normalization`` (``weight``; LayerNorm also has ``bias``)."""

    def __init__(self, config: TransformerConfig, size: int) -> None:
        super().__init__()
        self.normalization = config.normalization
        self.eps = config.layernorm_epsilon
        self.weight = nn.Parameter(torch.ones(size, dtype=config.params_dtype))
        self.bias = (
            nn.Parameter(torch.zeros(size, dtype=config.params_dtype)) if config.normalization == "LayerNorm" else None
        )
        if config.sequence_parallel:  # it normalises this rank's sequence slice: gradients are partial sums
            for param in (self.weight, self.bias):
                if param is not None:
                    param.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., size) -> (..., size)``."""
        return normalize(x, self.normalization, self.weight, self.bias, self.eps)


def scaled_init_std(config: TransformerConfig, residuals_per_layer: int = 2) -> float:
    """Megatron's init std for projections that write into the residual stream: std / sqrt(2 * num_layers)."""
    return config.init_method_std / (residuals_per_layer * max(config.num_layers, 1)) ** 0.5
