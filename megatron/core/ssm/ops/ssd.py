"""The Mamba2 state-space duality (SSD) scan in plain PyTorch.

Per head ``h`` (heads share ``B``/``C`` within a group) the recurrence is

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t ⊗ B_t        state: (headdim, d_state)
    y_t     = state_t · C_t + D_h * x_t

The chunked form computes it exactly, without a sequential loop over time: inside a chunk of Q steps the output is a
masked, decay-weighted "attention" ``(C Bᵀ ∘ L) (dt x)``; across chunks only the (headdim x d_state) state is carried.
B and C are contracted per *group*, not per head, which is what makes this faster than per-head formulations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.ssm.ops.ssd_chunk_diag import ssd_chunk_diag


def _prepare_dt(
    dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float]
) -> torch.Tensor:
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _skip_and_gate(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """``y + D x`` then ``* silu(z)``; D is per head ``(h,)`` or per head and channel ``(h, p)``."""
    if D is not None:
        y = y + x * (D[:, None] if D.dim() == 1 else D).to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous, so the matmul backward behind it runs on a
    dense layout instead of copying each small matrix of a permuted gradient."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SSD scan with the signature and semantics of ``mamba_ssm``'s kernel of the same name.

    Shapes: x ``(b, l, h, p)``, dt ``(b, l, h)``, A ``(h,)``, B and C ``(b, l, g, n)`` with ``h % g == 0``,
    D ``(h,)`` or ``(h, p)``, z ``(b, l, h, p)``, dt_bias ``(h,)``, initial_states ``(b, h, p, n)``,
    seq_idx ``(b, l)`` int (the state resets where it changes: packed sequences).
    ``dt = softplus(dt + dt_bias)`` when ``dt_softplus``; ``y = (scan + D x) * silu(z)``.
    Any sequence length works (the tail chunk is padded internally). Computes in float32 at least (float64 stays
    float64). Returns y ``(b, l, h, p)`` in x's dtype, and with ``return_final_states`` also the state after the last
    step, ``(b, h, p, n)`` in the compute dtype.
    """
    nheads, ngroups = x.shape[2], B.shape[2]
    if nheads % ngroups:
        raise ValueError(f"mamba_chunk_scan_combined: {nheads} heads are not divisible by {ngroups} groups")
    compute = torch.promote_types(x.dtype, torch.float32)
    dt = _prepare_dt(dt.to(compute), dt_bias, dt_softplus, dt_limit)
    y, final = _ssd_chunked(
        x.to(compute), dt, A.to(compute), B.to(compute), C.to(compute), chunk_size, initial_states, seq_idx
    )
    y = _skip_and_gate(y, x.to(compute), D, z).to(x.dtype)
    return (y, final) if return_final_states else y


def _ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk: int,
    initial_states: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan proper (no D, no gate). Axis names below: b batch, c chunk, q/s positions in a chunk, g group,
    r head within its group, p head channel, n state; ``(rp)`` is r and p merged, so that the heads of a group
    share one matmul against that group's B or C."""
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    chunk = min(chunk, max(length, 1))  # a sequence shorter than a chunk is one chunk: padding it would only add work
    pad = (-length) % chunk
    if pad:
        # dt = 0 on padded steps: decay exp(0) = 1 and no input, so the state passes through unchanged.
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    c = (length + pad) // chunk

    dt = dt.view(b, c, chunk, g, r).permute(0, 1, 3, 4, 2)  # b c g r q
    # Matmul operands are made contiguous once: CPU batched matmul on permuted views is several times slower.
    x_dt = (x.view(b, c, chunk, g, r, p).permute(0, 1, 3, 4, 2, 5) * dt.unsqueeze(-1)).contiguous()  # b c g r q p
    B = B.view(b, c, chunk, g, n).transpose(2, 3).contiguous()  # b c g q n
    C = C.view(b, c, chunk, g, n).transpose(2, 3).contiguous()  # b c g q n
    a_cum = torch.cumsum(dt * A.view(g, r, 1), dim=-1)  # b c g r q: log decay from the chunk start, <= 0

    same_seq = None
    if seq_idx is not None:
        idx = seq_idx.view(b, c, chunk)
        same_seq = idx.unsqueeze(-1) == idx.unsqueeze(-2)  # b c q s

    # 1. Within each chunk: y_q = sum_{s<=q} (C_q·B_s) exp(a_q - a_s) dt_s x_s. On CPU one fused op, block by block
    # in cache; the expressions below (which materialise the b c g r q s scores) are the reference elsewhere.
    y_diag = ssd_chunk_diag(C, B, a_cum, x_dt) if same_seq is None else None  # b c g r q p
    if y_diag is None:
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
        mask = causal if same_seq is None else causal & same_seq[:, :, None, None]
        log_decay = (a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2)).masked_fill(~mask, float("-inf"))
        scores = torch.matmul(C, B.transpose(-1, -2)).unsqueeze(3) * torch.exp(log_decay)  # b c g r q s
        y_diag = _ContiguousGrad.apply(torch.matmul(scores, x_dt))  # b c g r q p

    # 2. Each chunk's own contribution to the state at its end: sum_s exp(a_end - a_s) dt_s x_s B_sᵀ
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # b c g r q
    if same_seq is not None:
        decay_to_end = decay_to_end * same_seq[:, :, -1][:, :, None, None]  # only the chunk end's sequence
    weighted = (x_dt * decay_to_end.unsqueeze(-1)).permute(0, 1, 2, 3, 5, 4).reshape(b, c, g, r * p, chunk)
    chunk_states = torch.matmul(weighted, B)  # b c g (rp) n

    # 3. Carry the state across chunks: a short loop (length / chunk steps) over whole-chunk tensors.
    state = (
        initial_states.to(x.dtype).reshape(b, g, r * p, n)
        if initial_states is not None
        else x.new_zeros(b, g, r * p, n)
    )
    chunk_decay = torch.exp(a_cum[..., -1]).repeat_interleave(p, dim=-1).unsqueeze(-1)  # b c g (rp) 1
    if seq_idx is not None:
        ends = seq_idx[:, chunk - 1 :: chunk]  # b c: sequence id at each chunk end
        starts_id = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)  # id carried into each chunk
        chunk_decay = chunk_decay * (ends == starts_id).to(x.dtype)[:, :, None, None, None]
    start_states = []
    for decay, contribution in zip(chunk_decay.unbind(1), chunk_states.unbind(1), strict=True):
        start_states.append(state)
        state = state * decay + contribution

    # 4. The carried-in state read out at every position: y_q += exp(a_q) C_q · state_start
    carried = torch.stack(start_states, dim=1)  # b c g (rp) n
    y_carry = _ContiguousGrad.apply(torch.matmul(C, carried.transpose(-1, -2))).view(b, c, g, chunk, r, p)
    carry_decay = torch.exp(a_cum).permute(0, 1, 2, 4, 3)  # b c g q r
    if seq_idx is not None:
        carry_decay = carry_decay * (idx == starts_id.unsqueeze(-1)).to(x.dtype)[:, :, None, :, None]
    y_carry = y_carry * carry_decay.unsqueeze(-1)
    y = y_diag.permute(0, 1, 4, 2, 3, 5) + y_carry.permute(0, 1, 3, 2, 4, 5)  # b c q g r p
    y = y.reshape(b, c * chunk, h, p)
    return (y[:, :length] if pad else y), state.reshape(b, h, p, n)


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One SSD recurrence step, updating ``state`` in place (decoding).

    Shapes: state ``(b, h, p, n)``, x ``(b, h, p)``, dt ``(b, h)``, A ``(h,)``, B and C ``(b, g, n)``, D ``(h,)``,
    z ``(b, h, p)``, dt_bias ``(h,)``. Returns y ``(b, h, p)`` in x's dtype.
    """
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    compute = state.dtype
    dt = _prepare_dt(dt.to(compute), dt_bias, dt_softplus, (0.0, float("inf")))
    xc = x.to(compute)
    grouped = state.view(b, g, h // g, p, n)
    grouped.mul_(torch.exp(dt * A.to(compute)).view(b, g, h // g, 1, 1))
    grouped.addcmul_((xc * dt.unsqueeze(-1)).view(b, g, h // g, p, 1), B.to(compute).view(b, g, 1, 1, n))
    y = torch.matmul(grouped, C.to(compute).view(b, g, 1, n, 1)).view(b, h, p)
    return _skip_and_gate(y, xc, D, z).to(x.dtype)
