"""Rotary position embedding (RoPE), in the rotate-half form used by Megatron and Hugging Face Llama, with the
optional Llama 3.1 frequency scaling (``rope_type: llama3``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# The keys of a Llama 3.1 ``rope_scaling`` dict (Hugging Face's names); ``rope_type`` may be given as "llama3".
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                           original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1's RoPE scaling of the inverse frequencies, exactly as ``transformers``'
    ``_compute_llama3_parameters``: wavelengths shorter than ``original / high_freq_factor`` are kept, those longer
    than ``original / low_freq_factor`` are divided by ``factor``, and the band between is interpolated."""
    old_context_len = original_max_position_embeddings
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def validate_rope_scaling(rope_scaling: dict[str, Any]) -> dict[str, Any]:
    """The four Llama 3.1 scaling parameters of ``rope_scaling`` (checked; ``ValueError`` with one line)."""
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict, got {type(rope_scaling).__name__}")
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "llama3"))
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (only 'llama3')")
    missing = [key for key in LLAMA3_SCALING_KEYS if rope_scaling.get(key) is None]
    if missing:
        raise ValueError(f"rope_scaling lacks {', '.join(missing)}")
    params = {key: rope_scaling[key] for key in LLAMA3_SCALING_KEYS}
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"rope_scaling {key} must be a positive number, got {value!r}")
    if not params["high_freq_factor"] > params["low_freq_factor"]:
        raise ValueError(f"rope_scaling high_freq_factor {params['high_freq_factor']} must be greater than "
                         f"low_freq_factor {params['low_freq_factor']}")
    return params


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for RoPE over the first ``rotary_percent`` of each head's channels.

    ``inv_freq[i] = base^(-2i / rot_dim)``; the angle of position t on channel pair i is ``t * inv_freq[i]``.
    ``rope_scaling`` (Hugging Face's Llama 3.1 dict: ``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``) rescales ``inv_freq`` with :func:`llama3_scaled_inv_freq`.
    """

    def __init__(self, kv_channels: int, rotary_percent: float = 1.0, rotary_base: float = 10000.0,
                 rope_scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not 0.0 < rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1], got {rotary_percent}")
        rot_dim = int(kv_channels * rotary_percent)
        if rot_dim % 2 or rot_dim == 0:
            raise ValueError(f"the rotary dimension {rot_dim} (kv_channels * rotary_percent) must be even and > 0")
        self.rot_dim = rot_dim
        inv_freq = 1.0 / (rotary_base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
        if rope_scaling is not None:
            inv_freq = llama3_scaled_inv_freq(inv_freq, **validate_rope_scaling(rope_scaling))
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
