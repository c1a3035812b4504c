"""The Mamba1 selective scan in plain PyTorch.

Mamba1's decay ``exp(delta * A)`` differs per channel *and* per state entry, so the SSD chunk trick of Mamba2 does not
apply; this reference walks the sequence step by step (vectorised over batch, channels and states). GPU runs use
``mamba_ssm``'s fused kernel when it is installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = C_t · h_t + D u_t``, then ``y * silu(z)``.

    Shapes as in ``mamba_ssm``: u, delta, z ``(b, d, l)``; A ``(d, n)``; B, C ``(b, n, l)``; D, delta_bias ``(d,)``;
    initial_state (an extension, for chunked prefill) ``(b, d, n)``. Returns y ``(b, d, l)`` in u's dtype and, with
    ``return_last_state``, the final state ``(b, d, n)``.
    """
    compute = torch.promote_types(u.dtype, torch.float32)
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    uc = u.to(compute)
    decay = torch.exp(torch.einsum("bdl,dn->bldn", delta, A.to(compute)))
    inputs = torch.einsum("bdl,bnl,bdl->bldn", delta, B.to(compute), uc)
    Ct = C.to(compute).transpose(1, 2)  # b l n
    state = initial_state.to(compute) if initial_state is not None else uc.new_zeros(decay.shape[0], *decay.shape[2:])
    outputs = []
    for t in range(u.shape[-1]):
        state = decay[:, t] * state + inputs[:, t]
        outputs.append(torch.matmul(state, Ct[:, t].unsqueeze(-1)).squeeze(-1))
    y = torch.stack(outputs, dim=-1) if outputs else uc.new_zeros(uc.shape)
    if D is not None:
        y = y + uc * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(u.dtype)
    return (y, state) if return_last_state else y


def selective_scan_step(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """One Mamba1 decoding step, updating ``state`` ``(b, d, n)`` in place. u, delta, z ``(b, d)``; A ``(d, n)``;
    B, C ``(b, n)``. Returns y ``(b, d)``."""
    compute = state.dtype
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)
    if delta_softplus:
        delta = F.softplus(delta)
    uc = u.to(compute)
    state.mul_(torch.exp(delta.unsqueeze(-1) * A.to(compute))).add_((delta * uc).unsqueeze(-1) * B.to(compute)[:, None])
    y = torch.matmul(state, C.to(compute).unsqueeze(-1)).squeeze(-1)
    if D is not None:
        y = y + uc * D.to(compute)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(u.dtype)
