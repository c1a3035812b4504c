"""Greedy incremental generation: prefill once, then one token per step from the cached states."""

from __future__ import annotations

import torch
from torch import nn

from megatron.core.inference_params import InferenceParams


@torch.inference_mode()
def greedy_generate(model: nn.Module, prompt: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Append ``num_tokens`` argmax tokens to each prompt of ``prompt`` ``(b, p)``; returns ``(b, num_tokens)``.

    The prompt is consumed in one forward; each further token costs one single-token forward that reads and updates
    the Mamba conv/SSM states and attention KV caches held in an :class:`InferenceParams`.
    """
    batch, length = prompt.shape
    inference_params = InferenceParams(batch, length + num_tokens)
    logits = model(prompt, inference_params=inference_params)
    inference_params.advance(length)
    generated = []
    for _ in range(num_tokens):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(token)
        logits = model(token, inference_params=inference_params)
        inference_params.advance(1)
    return torch.cat(generated, dim=1) if generated else prompt.new_zeros(batch, 0)
