"""RoPE against its complex-number definition: channel pair (i, i + d/2) rotates by angle t * base^(-2i/d)."""

import torch

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding, apply_rotary_pos_emb


def complex_rope(x: torch.Tensor, positions: torch.Tensor, rot_dim: int, base: float) -> torch.Tensor:
    half = rot_dim // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float64) * 2 / rot_dim)
    angles = positions[:, :, None, None].double() * freqs
    pairs = torch.complex(x[..., :half].double(), x[..., half:rot_dim].double()) * torch.polar(
        torch.ones_like(angles), angles)
    return torch.cat([pairs.real, pairs.imag, x[..., rot_dim:].double()], dim=-1)


def test_rotary_matches_complex_rotation_with_partial_rotary_percent():
    x = torch.randn(2, 7, 3, 16, dtype=torch.float64)
    positions = torch.arange(5, 12).expand(2, 7)
    for percent in (1.0, 0.5):
        rope = RotaryEmbedding(16, rotary_percent=percent, rotary_base=777.0)
        out = apply_rotary_pos_emb(x, *rope(positions, torch.float64))
        # The cos/sin tables are computed in float32, as in Megatron: angles carry ~1e-7 relative error.
        torch.testing.assert_close(out, complex_rope(x, positions, int(16 * percent), 777.0), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out[..., int(16 * percent):], x[..., int(16 * percent):])
