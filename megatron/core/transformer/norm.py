"""RMSNorm / LayerNorm, standalone and fused in front of a linear layer (Megatron's ``layer_norm_weight`` keys)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.inference_params import InferenceParams
from megatron.core.transformer.transformer_config import TransformerConfig


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  inference_params: InferenceParams | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; for a CPU single-token decoding step it multiplies by the transposed weight that
    ``inference_params`` keeps, which runs up to 3x faster there (a matrix-vector product streaming the weight)."""
    if inference_params is not None and x.shape[-2] == 1 and x.device.type == "cpu" and not torch.is_grad_enabled():
        out = x @ inference_params.transposed(weight)
        return out + bias if bias is not None else out
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` that takes the decoding state, to use :func:`decode_linear`'s fast single-token path."""

    def forward(self, x: torch.Tensor, inference_params: InferenceParams | None = None) -> torch.Tensor:
        """``(..., in) -> (..., out)``."""
        return decode_linear(x, self.weight, self.bias, inference_params)


def normalize(
    x: torch.Tensor, normalization: str, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """RMSNorm or LayerNorm of ``x`` over its last dimension, scaled by ``weight`` (and shifted by ``bias``)."""
    if normalization == "RMSNorm":
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., size) -> (..., size)``."""
        return normalize(x, self.normalization, self.weight, self.bias, self.eps)


class LayerNormLinear(nn.Module):
    """``linear(norm(x))``: a layer's pre-norm fused into its first projection, as Transformer Engine stores it.

    Parameters: ``weight (out, in)``, optional ``bias (out,)``, ``layer_norm_weight (in,)`` and, for LayerNorm,
    ``layer_norm_bias (in,)``.
    """

    def __init__(self, config: TransformerConfig, in_features: int, out_features: int, bias: bool,
                 init_std: float) -> None:
        super().__init__()
        dtype = config.params_dtype
        self.normalization = config.normalization
        self.eps = config.layernorm_epsilon
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self.layer_norm_weight = nn.Parameter(torch.ones(in_features, dtype=dtype))
        self.layer_norm_bias = (
            nn.Parameter(torch.zeros(in_features, dtype=dtype)) if config.normalization == "LayerNorm" else None
        )
        nn.init.normal_(self.weight, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor, inference_params: InferenceParams | None = None) -> torch.Tensor:
        """``(..., in) -> (..., out)``."""
        normed = normalize(x, self.normalization, self.layer_norm_weight, self.layer_norm_bias, self.eps)
        return decode_linear(normed, self.weight, self.bias, inference_params)


def linear(config: TransformerConfig, in_features: int, out_features: int, bias: bool, init_std: float) -> Linear:
    """A :class:`Linear` initialised Megatron's way: weight N(0, init_std), bias zero."""
    layer = Linear(in_features, out_features, bias=bias, dtype=config.params_dtype)
    nn.init.normal_(layer.weight, mean=0.0, std=init_std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def scaled_init_std(config: TransformerConfig, residuals_per_layer: int = 2) -> float:
    """Megatron's init std for projections that write into the residual stream: std / sqrt(2 * num_layers)."""
    return config.init_method_std / (residuals_per_layer * max(config.num_layers, 1)) ** 0.5
