"""Rotary position embedding (RoPE), in the rotate-half form used by Megatron and Hugging Face Llama."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for RoPE over the first ``rotary_percent`` of each head's channels.

    ``inv_freq[i] = base^(-2i / rot_dim)``; the angle of position t on channel pair i is ``t * inv_freq[i]``.
    """

    def __init__(self, kv_channels: int, rotary_percent: float = 1.0, rotary_base: float = 10000.0) -> None:
        super().__init__()
        if not 0.0 < rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1], got {rotary_percent}")
        rot_dim = int(kv_channels * rotary_percent)
        if rot_dim % 2 or rot_dim == 0:
            raise ValueError(f"the rotary dimension {rot_dim} (kv_channels * rotary_percent) must be even and > 0")
        self.rot_dim = rot_dim
        inv_freq = 1.0 / (rotary_base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids ``(b, s)`` -> cos, sin ``(b, s, 1, rot_dim)`` (broadcast over heads)."""
        angles = position_ids.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq.to(position_ids.device)
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rot_dim`` channels of x ``(b, s, heads, head_dim)``; the rest pass through."""
    rot_dim = cos.shape[-1]
    rotated, passthrough = x[..., :rot_dim], x[..., rot_dim:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, passthrough], dim=-1) if passthrough.numel() else rotated
