"""The decoder of a hybrid model: its layers in pattern order, then the final norm."""

from __future__ import annotations

import torch
from torch import nn

from megatron.core.inference_params import InferenceParams
from megatron.core.models.hybrid.hybrid_layers import LAYER_TYPES, Rotary
from megatron.core.tensor_parallel.random import build_sharded
from megatron.core.transformer.norm import Norm
from megatron.core.transformer.transformer_config import TransformerConfig


class HybridStack(nn.Module):
    """``layers`` built from ``pattern`` (no ``|``), plus ``final_norm`` when this is the last pipeline stage.

    ``layer_offset`` is the global index of the first layer (for pipeline stages); layer numbers are 1-based and
    global, as in Megatron, and key the inference caches. Layer n's parameters are drawn from seed
    ``init_seed + n`` (at full size, then sharded), so they do not depend on the parallel layout.
    """

    def __init__(self, config: TransformerConfig, pattern: str, layer_offset: int = 0,
                 post_process: bool = True, init_seed: int = 0) -> None:
        super().__init__()
        self.pattern = pattern
        self.layers = nn.ModuleList()
        for i, symbol in enumerate(pattern):
            number = layer_offset + i + 1
            self.layers.append(build_sharded(lambda cfg, s=symbol, n=number: LAYER_TYPES[s](cfg, n), config,
                                             init_seed + number, prefix=f"decoder.layers.{i}."))
        self.final_norm = Norm(config, config.hidden_size) if post_process else None

    def forward(self, hidden: torch.Tensor, rotary: Rotary = None,
                inference_params: InferenceParams | None = None) -> torch.Tensor:
        """``(b, s, hidden) -> (b, s, hidden)``."""
        for layer in self.layers:
            hidden = layer(hidden, rotary, inference_params)
        return self.final_norm(hidden) if self.final_norm is not None else hidden
