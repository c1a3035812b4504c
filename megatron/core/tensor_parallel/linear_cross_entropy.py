"""Per-token cross-entropy of ``hidden @ weight.T`` without ever holding the ``(tokens, vocab)`` logits.

The output layer's logits are the largest tensor of a training step (4096 tokens x 32000 vocabulary = 512 MB in
float32); writing them, normalising them and turning them into a gradient are memory-bound passes that cost more than
the matmul itself on a CPU. Here the tokens are processed in chunks whose logits stay in cache: the forward keeps only
each token's log-normaliser, and the backward recomputes a chunk's logits (one extra matmul) to form
``softmax - onehot`` and both gradients. Under tensor parallelism each rank holds a slice of the vocabulary (the
rows of ``weight``); normalisers and target logits are combined across ranks as in
:func:`~megatron.core.tensor_parallel.cross_entropy.vocab_parallel_cross_entropy`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.cross_entropy import (
    global_logsumexp,
    local_targets,
    softmax_minus_onehot_,
    sum_over_tensor_parallel_ranks,
)

CHUNK_ELEMENTS = 1 << 21  # logits per chunk: 8 MB in float32, which stays in a CPU's L3 cache


def _chunks(tokens: int, vocab: int) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // vocab)
    return [slice(start, min(start + rows, tokens)) for start in range(0, tokens, rows)]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(hidden.dtype, torch.float32)
        local, outside = local_targets(target, weight.shape[0])
        normaliser = hidden.new_empty(hidden.shape[0], dtype=compute)
        target_logit = hidden.new_empty(hidden.shape[0], dtype=compute)
        for rows in _chunks(hidden.shape[0], weight.shape[0]):
            logits = F.linear(hidden[rows], weight, bias).to(compute)
            normaliser[rows] = torch.logsumexp(logits, dim=-1)
            target_logit[rows] = logits.gather(-1, local[rows].unsqueeze(-1)).squeeze(-1)
        normaliser = global_logsumexp(normaliser)
        sum_over_tensor_parallel_ranks(target_logit.masked_fill_(outside, 0.0))
        ctx.save_for_backward(hidden, weight, bias, normaliser, local, outside)
        return normaliser - target_logit

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        hidden, weight, bias, normaliser, local, outside = ctx.saved_tensors
        compute = normaliser.dtype
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device)
        grad_bias = torch.zeros(weight.shape[0], dtype=compute, device=weight.device) if bias is not None else None
        for rows in _chunks(hidden.shape[0], weight.shape[0]):
            logits = F.linear(hidden[rows], weight, bias).to(compute)
            probs = torch.exp_(logits.sub_(normaliser[rows].unsqueeze(-1)))
            grad_logits = softmax_minus_onehot_(probs, local[rows], outside[rows]).mul_(grad[rows].unsqueeze(-1))
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[rows] = grad_logits @ weight
            grad_weight.addmm_(grad_logits.t().to(compute), hidden[rows].to(compute))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias, None


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T + bias`` against ``target`` without materialising them.

    Shapes: hidden ``(..., h)``, weight ``(vocab / tp, h)`` (this rank's vocabulary slice), bias ``(vocab / tp,)``,
    target ``(...)`` integer. Returns ``(...)`` losses in float32 at least, identical on every tensor-parallel rank;
    the gradient reaching ``hidden`` is this rank's partial sum (its caller's tensor-parallel region sums it).
    """
    batch_shape = target.shape
    loss = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, target.reshape(-1))
    return loss.view(batch_shape)
