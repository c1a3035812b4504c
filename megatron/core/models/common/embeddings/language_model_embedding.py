"""Token (and optional learned absolute position) embedding at the bottom of the model."""

from __future__ import annotations

import torch
from torch import nn

from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron.core.tensor_parallel.random import get_rng_tracker
from megatron.core.transformer.transformer_config import TransformerConfig


class LanguageModelEmbedding(nn.Module):
    """``word_embeddings`` (vocab-parallel) + ``position_embeddings`` for ``learned_absolute``, then dropout.

    Both tables are initialised N(0, init_method_std), as in Megatron. With sequence parallelism the output is this
    rank's slice of the sequence, and its dropout mask is drawn from the rank's own stream.
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                 position_embedding_type: str) -> None:
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.word_embeddings = VocabParallelEmbedding(config, vocab_size, config.init_method_std)
        self.position_embeddings = None
        if position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(max_sequence_length, config.hidden_size,
                                                    dtype=config.params_dtype)
            nn.init.normal_(self.position_embeddings.weight, std=config.init_method_std)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """input_ids, position_ids ``(b, s)`` -> ``(b, s, hidden)`` (``(b, s / tp, hidden)`` with sequence
        parallelism). Positions are used by learned_absolute only."""
        embeddings = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.sequence_parallel:
            embeddings = scatter_to_sequence_parallel_region(embeddings)
        drops = self.training and self.embedding_dropout.p > 0
        with get_rng_tracker().fork(enabled=self.sequence_parallel and drops):
            return self.embedding_dropout(embeddings)
