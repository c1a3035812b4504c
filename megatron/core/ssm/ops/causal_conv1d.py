"""Depthwise causal 1-D convolution, the short convolution in front of every Mamba scan."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.cpu_kernels import cpu_op


def _activate(out: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation in ("silu", "swish"):
        return F.silu(out)
    if activation is None:
        return out
    raise ValueError(f"causal_conv1d: unsupported activation {activation!r} (use 'silu' or None)")


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Causal depthwise convolution: ``out[:, d, t] = bias[d] + sum_k weight[d, k] * x[:, d, t - K + 1 + k]``.

    Shapes: x ``(b, d, l)``, weight ``(d, K)``, bias ``(d,)``, initial_states ``(b, d, K - 1)`` (the inputs before
    ``t = 0``; zeros when None). Returns ``(b, d, l)``, after ``activation`` (``"silu"`` or None).
    """
    # Left-pad and convolve without padding: the output is exactly l long and contiguous (slicing a symmetric
    # padding's output would leave a strided tensor that makes the activation and its backward much slower).
    history = F.pad(x, (weight.shape[-1] - 1, 0)) if initial_states is None else torch.cat(
        [initial_states.to(x.dtype), x], dim=-1)
    return _activate(F.conv1d(history, weight.unsqueeze(1), bias, groups=x.shape[1]), activation)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decoding step: shift ``x`` into ``conv_state`` (in place) and return the convolution at that step.

    Shapes: x ``(b, d)``, conv_state ``(b, d, K)`` (the last K inputs, newest last), weight ``(d, K)``.
    Returns ``(b, d)``.
    """
    window = torch.cat([conv_state[:, :, 1:], x.to(conv_state.dtype).unsqueeze(-1)], dim=-1)
    conv_state.copy_(window)
    out = (window * weight.to(window.dtype)).sum(-1)
    if bias is not None:
        out += bias.to(out.dtype)
    return _activate(out, activation).to(x.dtype)


def conv_state_from_inputs(x: torch.Tensor, width: int, previous: torch.Tensor | None = None) -> torch.Tensor:
    """The decode conv state after a prefill: the last ``width`` inputs of ``x`` ``(b, d, l)``, preceded by the
    ``previous`` state ``(b, d, width)`` (or zeros) when the prefill is shorter than the window."""
    if previous is None:
        previous = x.new_zeros(x.shape[0], x.shape[1], width)
    return torch.cat([previous.to(x.dtype), x], dim=-1)[..., -width:]


class _ConvSiLUColumnsKernel(torch.autograd.Function):
    """The fused CPU kernel (``megatron/core/cpu_kernels/csrc/causal_conv1d_silu.cpp``), started from zeros, on the
    columns ``start:end`` of a channel-last tensor ``[head | conv input | tail]`` -> (head, conv pieces..., tail);
    head and tail are views and may be empty. Its backward assembles the whole tensor's gradient in one buffer, the
    kernel writing its columns in place, instead of autograd concatenating three gradients (for Mamba2's
    ``[z | x B C | dt]`` a 59 MB copy per layer at the benchmark size, and one more fresh buffer)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, projection: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, start: int, widths: list[int]) -> tuple[torch.Tensor, ...]:
        end = start + sum(widths)
        ctx.save_for_backward(projection, weight, bias)
        ctx.start, ctx.end, ctx.widths = start, end, widths
        pieces = torch.ops.megatron.causal_conv1d_silu(projection[..., start:end], weight, bias, None, widths)
        return projection[..., :start], *pieces, projection[..., end:]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, *grads: torch.Tensor | None) -> tuple:
        projection, weight, bias = ctx.saved_tensors
        grad = projection.new_empty(projection.shape)
        for columns, piece in ((slice(None, ctx.start), grads[0]), (slice(ctx.end, None), grads[-1])):
            if piece is None:
                grad[..., columns].zero_()
            else:
                grad[..., columns].copy_(piece)
        b, length = projection.shape[:2]
        conv_grads = [projection.new_zeros(b, length, w) if g is None else g.contiguous()  # unused piece: zeros
                      for g, w in zip(grads[1:-1], ctx.widths, strict=True)]
        grad_weight, grad_bias = torch.ops.megatron.causal_conv1d_silu_backward(
            conv_grads, projection[..., ctx.start : ctx.end], weight, bias, ctx.widths, grad[..., ctx.start : ctx.end])
        return grad, grad_weight, grad_bias if bias is not None else None, None, None


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the fused CPU conv kernel takes these operands (CPU float32/float64, unit channel stride)."""
    operands = [x, weight] + ([bias] if bias is not None else [])
    kernel = cpu_op("causal_conv1d_silu", *operands, dtypes=(torch.float32, torch.float64))
    return kernel is not None and x.stride(-1) == 1 and weight.is_contiguous()


def projection_conv1d_silu_split(
    projection: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, widths: list[int]
) -> tuple[torch.Tensor, ...] | None:
    """``(projection[..., :start], *causal_conv1d_silu_split(conv input, ...), projection[..., end:])`` for a
    channel-last ``projection`` ``(b, l, ·)`` whose columns ``start:start + sum(widths)`` feed the conv (Mamba2's
    ``[z | x B C | dt]``), as one autograd node so that the projection's gradient is built in place; None where the
    fused CPU kernel does not apply (the caller then splits and convolves separately). weight ``(d, K)``."""
    if not _kernel_applies(projection, weight, bias):
        return None
    return _ConvSiLUColumnsKernel.apply(projection, weight, bias, start, list(widths))


def causal_conv1d_silu_split(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    widths: list[int],
    initial_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """``SiLU(causal_conv1d_fn(x))`` for channel-last ``x`` ``(b, l, d)``, split along channels into contiguous
    ``(b, l, width)`` pieces (``widths`` sum to d: the x, B and C of a Mamba2 layer).

    On CPU (float32/float64) a fused C++ kernel reads ``x`` where it lies (a column slice of the in_proj output),
    applies the SiLU on the fly and writes each piece once; its backward recomputes the pre-activation instead of
    storing it. Elsewhere, or without the kernel, it is the reference :func:`causal_conv1d_fn`. weight ``(d, K)``,
    bias ``(d,)``, initial_states ``(b, d, K - 1)`` as there.
    """
    if _kernel_applies(x, weight, bias):
        if initial_states is None:
            return _ConvSiLUColumnsKernel.apply(x, weight, bias, 0, list(widths))[1:-1]  # no head, no tail
        if not torch.is_grad_enabled():  # decoding continues from a state: forward only
            initial = initial_states.to(x.dtype).contiguous()
            return tuple(torch.ops.megatron.causal_conv1d_silu(x, weight, bias, initial, list(widths)))
    out = causal_conv1d_fn(x.transpose(1, 2), weight, bias, initial_states, "silu").transpose(1, 2)
    return out.split(widths, dim=-1)
