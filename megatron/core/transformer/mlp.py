"""The feed-forward block: ``linear_fc2(act(linear_fc1(norm(x))))``, optionally gated (SwiGLU)."""

from __future__ import annotations

import torch
from torch import nn

from megatron.core.inference_params import InferenceParams
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.norm import scaled_init_std
from megatron.core.transformer.transformer_config import TransformerConfig


class MLP(nn.Module):
    """Pre-normed MLP. With ``gated_linear_unit`` the ``linear_fc1`` rows are ``[gate; up]`` and the hidden activation
    is ``act(gate) * up`` (SwiGLU when ``act`` is SiLU). ``linear_fc1`` is column-parallel (each rank holds its
    slice of the gate and of the up rows), ``linear_fc2`` row-parallel."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.gated = config.gated_linear_unit
        self.activation = config.activation_func
        ffn = config.ffn_hidden_size
        self.linear_fc1 = ColumnParallelLinear(config, config.hidden_size, 2 * ffn if self.gated else ffn,
                                               bias=config.add_bias_linear, init_std=config.init_method_std,
                                               normalize_input=True)
        self.linear_fc2 = RowParallelLinear(config, ffn, config.hidden_size, bias=config.add_bias_linear,
                                            init_std=scaled_init_std(config))

    def forward(self, hidden: torch.Tensor, inference_params: InferenceParams | None = None) -> torch.Tensor:
        """``(b, s, hidden) -> (b, s, hidden)``."""
        intermediate = self.linear_fc1(hidden, inference_params)
        if self.gated:
            gate, up = intermediate.chunk(2, dim=-1)
            intermediate = self.activation(gate) * up
        else:
            intermediate = self.activation(intermediate)
        return self.linear_fc2(intermediate, inference_params)
