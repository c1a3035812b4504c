"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p (Megatron's semantics).

``top_k == 1`` is greedy. Otherwise the logits are divided by the temperature, cut to the ``top_k`` largest
(``top_k > 0``) or to the smallest set whose probability reaches ``top_p`` (``top_p > 0``), and a token is drawn from
the softmax of what is left with the request's generator, so a seed reproduces the draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. ``top_k`` and ``top_p`` cannot both be active (Megatron refuses it too)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.temperature <= 100.0:
            raise ValueError(f"temperature must be in (0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k > 0 and self.top_p > 0.0:
            raise ValueError("top_k and top_p cannot both be used")

    @property
    def greedy(self) -> bool:
        """Whether the choice is the argmax (``top_k == 1``)."""
        return self.top_k == 1


GREEDY = SamplingParams(top_k=1)


def sampling_log_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The log-probabilities ``(..., vocab)`` that sampling draws from: tempered, top-k / top-p filtered (removed
    tokens at -inf), in float32 at least."""
    logits = logits.float() / params.temperature
    if params.top_k > 1:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif 0.0 < params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the most likely token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``logits`` ``(b, vocab)`` -> ``(b,)`` int64."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = sampling_log_probs(logits, params).exp()
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
