"""The decoder of a hybrid model: its layers in pattern order, then the final norm."""

from __future__ import annotations

import torch
from torch import nn

from megatron.core.inference_params import InferenceParams
from megatron.core.models.hybrid.hybrid_layers import LAYER_TYPES, Rotary
from megatron.core.transformer.norm import Norm
from megatron.core.transformer.transformer_config import TransformerConfig


class HybridStack(nn.Module):
    """``layers`` built from ``pattern`` (no ``|``), plus ``final_norm`` when this is the last pipeline stage.

    ``layer_offset`` is the global index of the first layer (for pipeline stages); layer numbers are 1-based and
    global, as in Megatron, and key the inference caches.
    """

    def __init__(self, config: TransformerConfig, pattern: str, layer_offset: int = 0,
                 post_process: bool = True) -> None:
        super().__init__()
        self.pattern = pattern
        self.layers = nn.ModuleList(
            LAYER_TYPES[symbol](config, layer_offset + i + 1) for i, symbol in enumerate(pattern)
        )
        self.final_norm = Norm(config, config.hidden_size) if post_process else None

    def forward(self, hidden: torch.Tensor, rotary: Rotary = None,
                inference_params: InferenceParams | None = None) -> torch.Tensor:
        """``(b, s, hidden) -> (b, s, hidden)``."""
        for layer in self.layers:
            hidden = layer(hidden, rotary, inference_params)
        return self.final_norm(hidden) if self.final_norm is not None else hidden
