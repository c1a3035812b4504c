"""Gradient-norm clipping over a model split across tensor- and pipeline-parallel ranks."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import parallel_state


def counted_in_norm(param: nn.Parameter) -> bool:
    """Whether this rank counts ``param`` in the global norm: split parameters on every rank, replicated ones on
    tensor-parallel rank 0 only, and the last stage's copy of a tied embedding never."""
    if getattr(param, "shared_embedding_copy", False):
        return False
    return getattr(param, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_rank() == 0


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients of ``params`` (this rank's) so that the norm of the whole model's gradient is at most
    ``max_norm`` (``inf``: never). Returns that global norm, the same on every rank of the model."""
    grads = [p.grad for p in params if p.grad is not None and counted_in_norm(p)]
    squares = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    if grads:  # torch's norm runs one fused (foreach) kernel per device and dtype
        squares = torch.nn.utils.get_total_norm(grads, norm_type=2.0).float().square()
    group = parallel_state.get_model_parallel_group()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(squares, group=group)
    total = squares.sqrt()
    if math.isfinite(max_norm):  # scales by max_norm / (total + 1e-6) when that is below 1, as clip_grad_norm_ does
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total.item()
