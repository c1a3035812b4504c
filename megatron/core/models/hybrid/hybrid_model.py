"""The hybrid Mamba / attention / MLP language model (Megatron's ``MambaModel``)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from megatron.core.inference_params import InferenceParams
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.hybrid.hybrid_block import HybridStack
from megatron.core.models.hybrid.hybrid_layer_allocation import (
    ATTENTION,
    MAMBA,
    pipeline_segments,
    resolve_hybrid_pattern,
    strip_stage_boundaries,
)
from megatron.core.models.hybrid.state_dict_compat import upgrade_state_dict
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.tensor_parallel.random import build_sharded
from megatron.core.transformer.transformer_config import TransformerConfig

POSITION_EMBEDDING_TYPES = ("none", "rope", "learned_absolute")


class HybridModel(nn.Module):
    """Embedding -> hybrid stack of ``M`` / ``*`` / ``-`` layers -> final norm -> output layer.

    The layer pattern comes from ``hybrid_layer_pattern``, ``hybrid_override_pattern`` or the two ratios (see
    ``hybrid_layer_allocation``); ``config.num_layers`` must match it (0 means "take it from the pattern").

    Pipeline parallelism: the module is stage ``pipeline_stage`` of ``num_pipeline_stages`` (virtual stages when
    interleaved): it holds that segment of the pattern (``|`` segments, or an even split). ``pre_process`` /
    ``post_process`` say whether it holds the embedding / the final norm and output layer.

    Initialisation is independent of the parallel layout: the embedding, layer n and the output layer draw their
    full-size parameters from seeds ``torch.initial_seed()``, ``+ n`` and ``+ num_layers + 1``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        vocab_size: int,
        max_sequence_length: int,
        hybrid_layer_pattern: str | None = None,
        hybrid_attention_ratio: float = 0.0,
        hybrid_mlp_ratio: float = 0.0,
        hybrid_override_pattern: str | None = None,
        position_embedding_type: str = "none",
        rotary_base: float = 10000,
        rotary_percent: float = 1.0,
        share_embeddings_and_output_weights: bool = False,
        pre_process: bool = True,
        post_process: bool = True,
        pipeline_stage: int = 0,
        num_pipeline_stages: int = 1,
        rope_scaling: dict | None = None,
    ) -> None:
        super().__init__()
        if position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"position_embedding_type must be one of {POSITION_EMBEDDING_TYPES}, got {position_embedding_type!r}"
            )
        if vocab_size <= 0 or max_sequence_length <= 0:
            raise ValueError(f"vocab_size and max_sequence_length must be positive, got {vocab_size}, "
                             f"{max_sequence_length}")
        pattern = resolve_hybrid_pattern(
            num_layers=config.num_layers or None, attention_ratio=hybrid_attention_ratio, mlp_ratio=hybrid_mlp_ratio,
            override_pattern=hybrid_override_pattern, layer_pattern=hybrid_layer_pattern,
        )
        full_pattern = strip_stage_boundaries(pattern)
        if not config.num_layers:  # taken from the pattern; the caller's config is left untouched
            config = dataclasses.replace(config, num_layers=len(full_pattern))
        segments = pipeline_segments(pattern, num_pipeline_stages) if num_pipeline_stages > 1 else [full_pattern]
        if len(segments) != num_pipeline_stages:
            raise ValueError(f"the layer pattern {pattern!r} has {len(segments)} pipeline segments but the model is "
                             f"split into {num_pipeline_stages} stages")
        if not 0 <= pipeline_stage < num_pipeline_stages:
            raise ValueError(f"pipeline stage {pipeline_stage} does not exist: the model has {num_pipeline_stages} "
                             "stages")
        self.hybrid_pattern = segments[pipeline_stage]
        layer_offset = sum(len(segment) for segment in segments[:pipeline_stage])
        if ATTENTION in self.hybrid_pattern and config.num_attention_heads <= 0:
            raise ValueError("the layer pattern has attention layers ('*') but num_attention_heads is 0")
        if MAMBA in self.hybrid_pattern:
            config.validate_mamba()

        self.config = config
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.position_embedding_type = position_embedding_type
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.pre_process = pre_process
        self.post_process = post_process

        seed = torch.initial_seed()
        self.embedding = None
        if pre_process or (post_process and share_embeddings_and_output_weights):
            # The last stage of a tied model keeps a copy of the word embeddings (the same seed makes it identical;
            # their gradients are summed every step). It needs no position embeddings.
            embedding_type = position_embedding_type if pre_process else "none"
            self.embedding = build_sharded(
                lambda cfg: LanguageModelEmbedding(cfg, vocab_size, max_sequence_length, embedding_type),
                config, seed, prefix="embedding.")
            if not pre_process:
                self.embedding.word_embeddings.weight.shared_embedding_copy = True
        self.rotary_pos_emb = None
        if position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(config.kv_channels, rotary_percent, rotary_base, rope_scaling)
        self.decoder = HybridStack(config, self.hybrid_pattern, layer_offset, post_process, init_seed=seed)
        self.output_layer = None
        if post_process:
            self.output_layer = build_sharded(
                lambda cfg: ColumnParallelLinear(cfg, cfg.hidden_size, vocab_size, bias=False,
                                                 init_std=cfg.init_method_std,
                                                 skip_weight_param_allocation=share_embeddings_and_output_weights),
                config, seed + config.num_layers + 1, prefix="output_layer.")
        self.input_tensor: torch.Tensor | None = None
        self.register_load_state_dict_pre_hook(_upgrade_keys_hook)

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        """Hidden states ``(b, s, hidden)`` received from the previous pipeline stage (when not ``pre_process``)."""
        self.input_tensor = input_tensor

    def output_weight(self) -> torch.Tensor:
        """The ``(vocab / tp, hidden)`` matrix that maps hidden states to logits (the embedding when tied)."""
        if self.share_embeddings_and_output_weights:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inference_params: InferenceParams | None = None,
        decoder_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids ``(b, s)`` -> logits ``(b, s, vocab)``, or with ``labels`` ``(b, s)`` the per-token
        cross-entropy ``(b, s)`` (float32). Stages without ``post_process`` return hidden states ``(b, s, hidden)``
        (``(b, s / tp, hidden)`` with sequence parallelism); stages without ``pre_process`` take them as
        ``decoder_input`` (or from :meth:`set_input_tensor`) and need no ``input_ids``. With
        ``inference_params.argmax_only`` (greedy decoding) it returns each position's argmax token ``(b, s)``.

        ``position_ids`` default to ``offset + arange(s)``, where the offset is the number of tokens already in
        ``inference_params`` (incremental decoding). The caller advances ``inference_params`` after the call.
        """
        if decoder_input is None and not self.pre_process:
            decoder_input = self.input_tensor
        if decoder_input is not None:
            b, s = decoder_input.shape[:2]
            s *= self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
            device = decoder_input.device
        else:
            (b, s), device = input_ids.shape, input_ids.device
        offset = 0
        if inference_params is not None:
            inference_params.check_room(b, s)
            offset = inference_params.sequence_len_offset
        if position_ids is None and self.position_embedding_type != "none":
            position_ids = torch.arange(offset, offset + s, device=device).unsqueeze(0).expand(b, s)
        if offset + s > self.max_sequence_length and self.position_embedding_type == "learned_absolute":
            raise ValueError(f"sequence of {offset + s} tokens exceeds max_sequence_length {self.max_sequence_length}")

        hidden = decoder_input if decoder_input is not None else self.embedding(input_ids, position_ids)
        rotary = None
        if self.rotary_pos_emb is not None:
            rotary = self.rotary_pos_emb(position_ids, hidden.dtype)
        hidden = self.decoder(hidden, rotary, inference_params)
        if not self.post_process:
            return hidden

        if inference_params is not None and inference_params.last_logits_only and labels is None:
            hidden = hidden[:, -1:]  # (b, 1, hidden): the only position whose logits the caller uses
        if inference_params is not None and inference_params.argmax_only and labels is None:
            return self.output_layer.forward_argmax(hidden, inference_params, weight=self.output_weight())  # (b, s)
        logits = self.output_layer(hidden, inference_params, weight=self.output_weight())  # (b, s, vocab / tp)
        if labels is None:
            return gather_from_tensor_model_parallel_region(logits)
        return vocab_parallel_cross_entropy(logits, labels)


def _upgrade_keys_hook(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    upgrade_state_dict(state_dict, prefix)


MambaModel = HybridModel
