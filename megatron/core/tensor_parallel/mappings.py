"""Autograd-aware collectives at the borders of tensor-parallel regions (Megatron's ``mappings``).

Activations are batch-first ``(b, s, h)``; with sequence parallelism they are split along the sequence (dim 1)
between tensor-parallel regions. Every function is the identity when the tensor-parallel size is 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import parallel_state

SEQUENCE_DIM = 1


def _group() -> dist.ProcessGroup | None:
    return parallel_state.get_tensor_model_parallel_group()


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=_group())
    return x


def _all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format)
             for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, x.contiguous(), group=_group())
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, dim: int) -> torch.Tensor:
    size = parallel_state.get_tensor_model_parallel_world_size()
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {size} tensor-parallel ranks")
    return x.chunk(size, dim=dim)[parallel_state.get_tensor_model_parallel_rank()].contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int) -> torch.Tensor:
    size = parallel_state.get_tensor_model_parallel_world_size()
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {size} tensor-parallel ranks")
    parts = [part.contiguous() for part in x.chunk(size, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=_group())
    return out


class _CopyToRegion(torch.autograd.Function):
    """Forward identity, backward all-reduce: a replicated input feeding rank-specific computation."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return _all_reduce(grad)


class _ReduceFromRegion(torch.autograd.Function):
    """Forward all-reduce, backward identity: partial sums becoming a replicated output."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _GatherFromRegion(torch.autograd.Function):
    """Forward all-gather along ``dim``, backward keep this rank's slice."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.dim = dim
        return _all_gather(x, dim)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split(grad, ctx.dim), None


class _ScatterToSequence(torch.autograd.Function):
    """Forward keep this rank's sequence slice, backward all-gather."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return _split(x, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return _all_gather(grad, SEQUENCE_DIM)


class _GatherFromSequence(torch.autograd.Function):
    """Forward all-gather of sequence slices, backward reduce-scatter (the gathered tensor feeds rank-specific
    computation, so each rank's gradient is a partial sum)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return _all_gather(x, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return _reduce_scatter(grad, SEQUENCE_DIM)


class _ReduceScatterToSequence(torch.autograd.Function):
    """Forward reduce-scatter of partial sums into sequence slices, backward all-gather."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return _reduce_scatter(x, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return _all_gather(grad, SEQUENCE_DIM)


def _parallel() -> bool:
    return parallel_state.get_tensor_model_parallel_world_size() > 1


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; gradients summed over tensor-parallel ranks."""
    return _CopyToRegion.apply(x) if _parallel() else x


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Sum over tensor-parallel ranks; gradient passed through."""
    return _ReduceFromRegion.apply(x) if _parallel() else x


def gather_from_tensor_model_parallel_region(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate the ranks' slices along ``dim`` (the last by default: vocab-parallel logits)."""
    return _GatherFromRegion.apply(x, dim % x.ndim) if _parallel() else x


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """``(b, s, h) -> (b, s / tp, h)``: this rank's slice of the sequence."""
    return _ScatterToSequence.apply(x) if _parallel() else x


def gather_from_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """``(b, s / tp, h) -> (b, s, h)``; gradients reduce-scattered back."""
    return _GatherFromSequence.apply(x) if _parallel() else x


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Partial sums ``(b, s, h)`` -> summed slice ``(b, s / tp, h)``."""
    return _ReduceScatterToSequence.apply(x) if _parallel() else x
