"""The three residual layer types of a hybrid stack: ``h = h + dropout(sublayer(norm(h)))``.

The pre-norm lives inside each sublayer's first projection (``*.layer_norm_weight``), so the layers themselves only
add the residual. Megatron's module names (``mixer``, ``self_attention``, ``mlp``) give the state-dict keys.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron.core.inference_params import InferenceParams
from megatron.core.models.hybrid import hybrid_layer_allocation as symbols
from megatron.core.ssm.mamba1_mixer import Mamba1Mixer
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.tensor_parallel.random import get_rng_tracker
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_config import TransformerConfig

Rotary = tuple[torch.Tensor, torch.Tensor] | None


class ResidualLayer(nn.Module):
    """Holds the residual dropout: ``hidden + dropout(out)``. With sequence parallelism each rank drops out its own
    sequence slice, so the mask comes from the rank's own stream."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.sequence_parallel = config.sequence_parallel

    def residual(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``hidden + dropout(out)``, both ``(b, s, hidden)``."""
        if not (self.training and self.dropout.p > 0):
            return hidden + out  # no dropout: skip the RNG fork and module call (per-layer cost in decoding)
        with get_rng_tracker().fork(enabled=self.sequence_parallel):
            return hidden + self.dropout(out)


class MambaLayer(ResidualLayer):
    """Residual Mamba layer (``mixer``: Mamba2, or Mamba1 when ``config.mamba_version == 1``)."""

    def __init__(self, config: TransformerConfig, layer_number: int) -> None:
        super().__init__(config)
        mixer_class = Mamba1Mixer if config.mamba_version == 1 else MambaMixer
        self.mixer = mixer_class(config, layer_number)

    def forward(self, hidden: torch.Tensor, rotary: Rotary = None,
                inference_params: InferenceParams | None = None) -> torch.Tensor:
        """``(b, s, hidden) -> (b, s, hidden)``."""
        if isinstance(self.mixer, MambaMixer) and not self.training:
            fused = self.mixer.decode_with_residual(hidden, inference_params)  # one C++ call per decoding token
            if fused is not None:
                return fused
        return self.residual(hidden, self.mixer(hidden, inference_params))


class TransformerLayer(ResidualLayer):
    """Residual self-attention layer (``self_attention``)."""

    def __init__(self, config: TransformerConfig, layer_number: int) -> None:
        super().__init__(config)
        self.self_attention = SelfAttention(config, layer_number)

    def forward(self, hidden: torch.Tensor, rotary: Rotary = None,
                inference_params: InferenceParams | None = None) -> torch.Tensor:
        """``(b, s, hidden) -> (b, s, hidden)``."""
        return self.residual(hidden, self.self_attention(hidden, rotary, inference_params))


class MLPLayer(ResidualLayer):
    """Residual MLP layer (``mlp``)."""

    def __init__(self, config: TransformerConfig, layer_number: int) -> None:
        super().__init__(config)
        self.mlp = MLP(config)

    def forward(self, hidden: torch.Tensor, rotary: Rotary = None,
                inference_params: InferenceParams | None = None) -> torch.Tensor:
        """``(b, s, hidden) -> (b, s, hidden)``."""
        return self.residual(hidden, self.mlp(hidden, inference_params))


LAYER_TYPES: dict[str, type[nn.Module]] = {
    symbols.MAMBA: MambaLayer, symbols.ATTENTION: TransformerLayer, symbols.MLP: MLPLayer,
}
