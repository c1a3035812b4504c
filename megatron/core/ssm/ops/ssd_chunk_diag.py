"""Stage 1 of the chunked SSD scan (the intra-chunk, decay-masked "attention") as one fused CPU op.

The PyTorch expression in :func:`megatron.core.ssm.ops.ssd._ssd_chunked` materialises several (b, c, g, r, q, q)
score and decay tensors in forward and backward; the C++ op (``megatron/core/cpu_kernels/csrc/ssd_chunk_diag.cpp``)
works one (batch, chunk, group) block at a time in cache and recomputes them in its backward instead of storing them.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from megatron.core.cpu_kernels import cpu_op


class _ChunkDiagKernel(torch.autograd.Function):
    """The fused op and its backward (first order only; the reference path supports higher orders)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, C: torch.Tensor, B: torch.Tensor, a_cum: torch.Tensor,
                x_dt: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(C, B, a_cum, x_dt)
        return torch.ops.megatron.ssd_chunk_diag(C, B, a_cum, x_dt)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The op reads the gradient in place whatever its strides (it arrives as a permutation of the scan
        # output's gradient) as long as the head channels are contiguous.
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return tuple(torch.ops.megatron.ssd_chunk_diag_backward(*ctx.saved_tensors, grad))


def ssd_chunk_diag(C: torch.Tensor, B: torch.Tensor, a_cum: torch.Tensor, x_dt: torch.Tensor) -> torch.Tensor | None:
    """``y[..., q, :] = sum_{s <= q} (C_q · B_s) exp(a_cum_q - a_cum_s) x_dt[..., s, :]`` within each chunk, or None
    when the fused op is unavailable (not CPU, not float32/float64, no compiler, ``MEGATRON_CPU_KERNELS=0``).

    Shapes: C and B ``(b, c, g, q, n)`` contiguous, a_cum ``(b, c, g, r, q)``, x_dt ``(b, c, g, r, q, p)``
    contiguous (b batch, c chunks, g groups, r heads per group, q chunk length, n state, p head channels).
    Returns ``(b, c, g, r, q, p)``, contiguous.
    """
    if cpu_op("ssd_chunk_diag", C, B, a_cum, x_dt, dtypes=(torch.float32, torch.float64)) is None:
        return None
    return _ChunkDiagKernel.apply(C.contiguous(), B.contiguous(), a_cum.contiguous(), x_dt.contiguous())
