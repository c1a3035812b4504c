"""Causal self-attention with grouped-query attention and Megatron's fused ``linear_qkv`` layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.inference_params import InferenceParams
from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, divide
from megatron.core.tensor_parallel.random import get_rng_tracker
from megatron.core.transformer.norm import scaled_init_std
from megatron.core.transformer.transformer_config import TransformerConfig


class SelfAttention(nn.Module):
    """Pre-normed causal self-attention.

    ``linear_qkv`` rows are grouped per query group: for each of the ``num_query_groups`` groups, that group's query
    heads, then its key head, then its value head. Query head j uses key/value group ``j // (heads / groups)``.
    Softmax scale is 1/sqrt(head_dim); ``linear_proj`` maps the heads back to the hidden size. Under tensor
    parallelism each rank holds whole query groups (``linear_qkv`` column-parallel, ``linear_proj`` row-parallel).
    """

    def __init__(self, config: TransformerConfig, layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number
        tp = config.tensor_model_parallel_size
        self.num_heads = divide(config.num_attention_heads, tp, "num_attention_heads")
        self.num_groups = divide(config.num_query_groups, tp, "num_query_groups")
        self.head_dim = config.kv_channels
        self.dropout = config.attention_dropout
        heads_per_group = self.num_heads // self.num_groups
        self.linear_qkv = ColumnParallelLinear(
            config, config.hidden_size, config.num_query_groups * (heads_per_group + 2) * self.head_dim,
            bias=config.add_bias_linear or config.add_qkv_bias, init_std=config.init_method_std,
            normalize_input=True,
        )
        self.linear_proj = RowParallelLinear(config, config.num_attention_heads * self.head_dim, config.hidden_size,
                                             bias=config.add_bias_linear, init_std=scaled_init_std(config))

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        inference_params: InferenceParams | None = None,
    ) -> torch.Tensor:
        """hidden ``(b, s, hidden)`` -> ``(b, s, hidden)``. ``rotary`` is (cos, sin) for these positions."""
        qkv = self.linear_qkv(hidden, inference_params)  # (b, s, ·): sequence-parallel input is gathered here
        b, s = qkv.shape[:2]
        qkv = qkv.view(b, s, self.num_groups, -1, self.head_dim)
        query = qkv[:, :, :, :-2].reshape(b, s, self.num_heads, self.head_dim)
        key, value = qkv[:, :, :, -2], qkv[:, :, :, -1]
        if rotary is not None:
            query, key = apply_rotary_pos_emb(query, *rotary), apply_rotary_pos_emb(key, *rotary)

        offset = 0
        if inference_params is not None:
            offset = inference_params.sequence_len_offset
            key, value = self._update_kv_cache(inference_params, key, value, offset)
        dropout = self.dropout if self.training else 0.0
        with get_rng_tracker().fork(enabled=dropout > 0):  # each rank drops out its own heads' probabilities
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                attn_mask=_causal_mask(s, offset, hidden.device) if offset and s > 1 else None,
                dropout_p=dropout,
                is_causal=offset == 0 and s > 1,
                enable_gqa=self.num_groups != self.num_heads,
            )
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim), inference_params)

    def _update_kv_cache(
        self, inference_params: InferenceParams, key: torch.Tensor, value: torch.Tensor, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = key.shape[:2]

        def allocate() -> tuple[torch.Tensor, torch.Tensor]:
            shape = (inference_params.max_batch_size, inference_params.max_sequence_length, self.num_groups,
                     self.head_dim)
            return key.new_zeros(shape), value.new_zeros(shape)

        key_cache, value_cache = inference_params.layer_state(self.layer_number, allocate)
        key_cache[:b, offset : offset + s] = key
        value_cache[:b, offset : offset + s] = value
        return key_cache[:b, : offset + s], value_cache[:b, : offset + s]


def _causal_mask(num_queries: int, offset: int, device: torch.device) -> torch.Tensor:
    """Boolean mask ``(q, offset + q)``: query i (at position offset + i) sees keys 0..offset + i."""
    keys = torch.arange(offset + num_queries, device=device)
    queries = torch.arange(offset, offset + num_queries, device=device)
    return keys.unsqueeze(0) <= queries.unsqueeze(1)
