"""Token (and optional learned absolute position) embedding at the bottom of the model."""

from __future__ import annotations

import torch
from torch import nn

from megatron.core.transformer.transformer_config import TransformerConfig


class LanguageModelEmbedding(nn.Module):
    """``word_embeddings`` (+ ``position_embeddings`` for ``learned_absolute``), then dropout.

    Both tables are initialised N(0, init_method_std), as in Megatron.
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                 position_embedding_type: str) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, config.hidden_size, dtype=config.params_dtype)
        nn.init.normal_(self.word_embeddings.weight, std=config.init_method_std)
        self.position_embeddings = None
        if position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(max_sequence_length, config.hidden_size,
                                                    dtype=config.params_dtype)
            nn.init.normal_(self.position_embeddings.weight, std=config.init_method_std)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """input_ids, position_ids ``(b, s)`` -> ``(b, s, hidden)`` (positions are used by learned_absolute only)."""
        embeddings = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings(position_ids)
        return self.embedding_dropout(embeddings)
