"""Tiny model builders shared by the model tests."""

from __future__ import annotations

import torch

from megatron.core.models.hybrid import HybridModel
from megatron.core.transformer import TransformerConfig


def tiny_config(**overrides: object) -> TransformerConfig:
    """A small config exercising GQA, several Mamba2 groups and non-multiple-of-chunk lengths."""
    settings: dict[str, object] = dict(
        hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48, mamba_head_dim=8,
        mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=8, mamba1_dt_rank=4, hidden_dropout=0.0,
        attention_dropout=0.0, normalization="RMSNorm", add_bias_linear=False,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def tiny_model(pattern: str, vocab_size: int = 61, max_sequence_length: int = 64, **kwargs: object) -> HybridModel:
    config_keys = set(TransformerConfig.__dataclass_fields__)
    config = tiny_config(**{k: v for k, v in kwargs.items() if k in config_keys})
    model_kwargs = {k: v for k, v in kwargs.items() if k not in config_keys}
    return HybridModel(config, vocab_size, max_sequence_length, hybrid_layer_pattern=pattern, **model_kwargs)


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter (norm weights, D, biases too) a random value so that no mapping error hides behind an
    initial value of one or zero."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.uniform_(-1.0, 1.5)
            else:
                param.add_(torch.randn_like(param) * 0.1)
    return model
