"""Decode-time state of a hybrid model: per-layer KV caches and Mamba conv/SSM states."""

from __future__ import annotations

from collections.abc import Callable

import torch


class InferenceParams:
    """Caches for incremental decoding, filled by the layers themselves.

    ``sequence_len_offset`` is the number of tokens already consumed; the caller advances it after each forward
    (``advance``), as in Megatron. ``key_value_memory_dict[layer_number]`` holds, for an attention layer,
    ``(key_cache, value_cache)`` of shape ``(max_batch, max_sequence_length, query_groups, head_dim)``; for a Mamba
    layer, ``(conv_state, ssm_state)`` of shapes ``(max_batch, conv_channels, d_conv)`` and
    ``(max_batch, nheads, headdim, d_state)`` (Mamba1: ``(max_batch, d_inner, d_state)``).
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int, last_logits_only: bool = False,
                 argmax_only: bool = False) -> None:
        if max_batch_size <= 0 or max_sequence_length <= 0:
            raise ValueError(
                f"InferenceParams needs positive sizes, got batch {max_batch_size}, length {max_sequence_length}"
            )
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.sequence_len_offset = 0
        # Callers that only sample the next token skip the (tokens x vocab) logits of every earlier position.
        self.last_logits_only = last_logits_only
        # Greedy callers only need each position's argmax: the model then returns token ids (b, s) instead of
        # logits, which lets it skip most of the output layer's weight (see megatron.core.inference.greedy_argmax).
        self.argmax_only = argmax_only
        # With argmax_only: only ids below this count (the real vocabulary of a padded output layer; None: all).
        self.argmax_vocab_size: int | None = None
        # Copies of weights in other forms that kernels read instead (int8 codes), valid for one generation.
        self.derived_weights: dict[int, tuple] = {}
        self.key_value_memory_dict: dict[int, tuple[torch.Tensor, ...]] = {}
        self.recurrent_layers: set[int] = set()
        # Speculative verification: recurrent layers that can, keep their states after each token of a forward
        # here ((tokens, b, ...) per state), so that a rejection rolls back without feeding tokens again.
        self.record_token_states = False
        self.token_states: dict[int, tuple[torch.Tensor, ...]] = {}

    def layer_state(
        self, layer_number: int, allocate: Callable[[], tuple[torch.Tensor, ...]], recurrent: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """The cache tensors of one layer, allocated by ``allocate()`` on first use. ``recurrent`` states (Mamba)
        summarise the whole past and are overwritten every step; KV caches are indexed by position."""
        if layer_number not in self.key_value_memory_dict:
            self.key_value_memory_dict[layer_number] = allocate()
            if recurrent:
                self.recurrent_layers.add(layer_number)
        return self.key_value_memory_dict[layer_number]

    def snapshot(self) -> tuple[int, dict[int, tuple[torch.Tensor, ...]]]:
        """A copy of the recurrent states and the offset, for :meth:`restore` (KV caches need no copy: entries past
        the restored offset are simply overwritten)."""
        states = {layer: tuple(t.clone() for t in self.key_value_memory_dict[layer]) for layer in self.recurrent_layers}
        return self.sequence_len_offset, states

    def restore(self, snapshot: tuple[int, dict[int, tuple[torch.Tensor, ...]]]) -> None:
        """Go back to the point :meth:`snapshot` recorded."""
        self.sequence_len_offset, states = snapshot
        for layer, saved in states.items():
            for current, value in zip(self.key_value_memory_dict[layer], saved, strict=True):
                current.copy_(value)

    def rewind_to_token(self, index: int, offset: int) -> bool:
        """After a forward that recorded ``token_states``: make every recurrent state its value after token
        ``index`` of that forward and set the offset to ``offset`` (the position after that token). Returns False,
        changing nothing, when some recurrent layer did not record its states (the caller then restores a
        :meth:`snapshot` and feeds the kept tokens again)."""
        if not self.recurrent_layers <= self.token_states.keys():
            return False
        for layer in self.recurrent_layers:
            for current, history in zip(self.key_value_memory_dict[layer], self.token_states[layer], strict=True):
                current[: history.shape[1]].copy_(history[index])
        self.sequence_len_offset = offset
        return True

    def check_room(self, batch_size: int, num_tokens: int) -> None:
        """Raise ``ValueError`` if a forward of ``num_tokens`` tokens for ``batch_size`` sequences would overflow."""
        if batch_size > self.max_batch_size:
            raise ValueError(f"batch size {batch_size} exceeds the inference max_batch_size {self.max_batch_size}")
        if self.sequence_len_offset + num_tokens > self.max_sequence_length:
            raise ValueError(
                f"{self.sequence_len_offset} + {num_tokens} tokens exceed the inference max_sequence_length "
                f"{self.max_sequence_length}"
            )

    def advance(self, num_tokens: int) -> None:
        """Record that ``num_tokens`` more tokens have been consumed."""
        self.sequence_len_offset += num_tokens

    def reset(self) -> None:
        """Start a new generation: offset 0 (states are overwritten, caches reused; weights may have changed)."""
        self.sequence_len_offset = 0
        self.derived_weights.clear()
