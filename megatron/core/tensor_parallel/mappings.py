"""Autograd-aware collectives at the borders of tensor-parallel regions (Megatron's ``mappings``).

Activations are batch-first ``(b, s, h)``; with sequence parallelism they are split along the sequence (dim 1)
between tensor-parallel regions. Every function is the identity when the tensor-parallel size is 1.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

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


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class _Mapping(torch.autograd.Function):
    """A collective ``forward`` whose gradient is the collective ``backward`` (each a tensor -> tensor function)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, forward: Callable, backward: Callable) -> torch.Tensor:
        ctx.backward_fn = backward
        return forward(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.backward_fn(grad), None, None


def _parallel() -> bool:
    return parallel_state.get_tensor_model_parallel_world_size() > 1


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; gradients summed over tensor-parallel ranks (a replicated input feeding rank-specific
    computation)."""
    return _Mapping.apply(x, _identity, _all_reduce) if _parallel() else x


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Sum of partial results over tensor-parallel ranks; gradient passed through."""
    return _Mapping.apply(x, _all_reduce, _identity) if _parallel() else x


def gather_from_tensor_model_parallel_region(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate the ranks' slices along ``dim`` (the last by default: vocab-parallel logits); the gradient keeps
    this rank's slice."""
    if not _parallel():
        return x
    dim %= x.ndim
    return _Mapping.apply(x, partial(_all_gather, dim=dim), partial(_split, dim=dim))


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """``(b, s, h) -> (b, s / tp, h)``: this rank's slice of the sequence; gradients all-gathered."""
    if not _parallel():
        return x
    return _Mapping.apply(x, partial(_split, dim=SEQUENCE_DIM), partial(_all_gather, dim=SEQUENCE_DIM))


def gather_from_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """``(b, s / tp, h) -> (b, s, h)``; gradients (partial sums: the gathered tensor feeds rank-specific computation)
    reduce-scattered back."""
    if not _parallel():
        return x
    return _Mapping.apply(x, partial(_all_gather, dim=SEQUENCE_DIM), partial(_reduce_scatter, dim=SEQUENCE_DIM))


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Partial sums ``(b, s, h)`` -> summed slice ``(b, s / tp, h)``; gradients all-gathered."""
    if not _parallel():
        return x
    return _Mapping.apply(x, partial(_reduce_scatter, dim=SEQUENCE_DIM), partial(_all_gather, dim=SEQUENCE_DIM))
