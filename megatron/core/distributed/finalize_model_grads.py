"""Gradient reductions between the backward pass and the optimizer step.

* Data parallel: averaged over replicas, either by torch DDP during the backward (``--overlap-grad-reduce``) or in
  one flattened all-reduce after it.
* Sequence parallel: replicated parameters that saw only this rank's sequence slice (norms, row-parallel biases,
  tagged ``sequence_parallel``) sum their gradients over the tensor-parallel group.
* Tied embeddings under pipelining: the first stage's embedding and the last stage's copy add their gradients, so
  both copies stay equal after the step.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from megatron.core import parallel_state


def wrap_data_parallel(module: nn.Module, overlap_grad_reduce: bool) -> nn.Module:
    """``module`` wrapped in torch DDP over the data-parallel group when gradients are to be reduced during the
    backward pass; otherwise ``module`` itself (reduced afterwards by :func:`finalize_model_grads`)."""
    if parallel_state.get_data_parallel_world_size() == 1 or not overlap_grad_reduce:
        return module
    return DistributedDataParallel(module, process_group=parallel_state.get_data_parallel_group(),
                                   broadcast_buffers=False)


def _all_reduce_grads(params: list[nn.Parameter], group: dist.ProcessGroup, scale: float = 1.0) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(reduced)


def finalize_model_grads(chunks: list[nn.Module], ddp_reduced: bool) -> None:
    """Apply the reductions above to the gradients of ``chunks`` (this rank's model chunks, unwrapped).
    ``ddp_reduced`` says DDP has already averaged them over data-parallel ranks."""
    params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
    dp = parallel_state.get_data_parallel_world_size()
    if dp > 1 and not ddp_reduced:
        _all_reduce_grads(params, parallel_state.get_data_parallel_group(), scale=1.0 / dp)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        _all_reduce_grads([p for p in params if getattr(p, "sequence_parallel", False)],
                          parallel_state.get_tensor_model_parallel_group())
    embedding_group = parallel_state.get_embedding_group()
    if embedding_group is not None:
        tied = [chunk.embedding.word_embeddings.weight for chunk in chunks
                if chunk.share_embeddings_and_output_weights and chunk.embedding is not None]
        _all_reduce_grads(tied, embedding_group)
