"""Grouped, gated RMSNorm applied to the Mamba2 scan output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedRMSNorm(nn.Module):
    """``weight * rmsnorm_per_group(y * silu(z))`` (norm after the gate), groups of ``group_size`` channels.

    With tensor parallelism each group lies wholly on one rank, so the norm needs no communication.
    """

    def __init__(self, size: int, group_size: int, eps: float = 1e-5, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if size % group_size:
            raise ValueError(f"GatedRMSNorm: size {size} is not divisible by group size {group_size}")
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z ``(..., size)`` -> ``(..., size)`` in y's dtype (computed in at least float32)."""
        compute = torch.promote_types(y.dtype, torch.float32)
        gated = y.to(compute) * F.silu(z.to(compute))
        grouped = gated.unflatten(-1, (-1, self.group_size))
        normed = F.rms_norm(grouped, (self.group_size,), eps=self.eps).flatten(-2)
        return (normed * self.weight.to(compute)).to(y.dtype)
