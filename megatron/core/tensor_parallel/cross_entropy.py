"""Per-token cross-entropy that keeps a single vocabulary-sized buffer (Megatron's ``vocab_parallel_cross_entropy``).

The forward turns a float32 copy of the logits into the softmax in place and saves it; the backward turns that same
buffer into the gradient (``softmax - onehot``, scaled). Compared with ``F.cross_entropy`` this skips the separate
log-softmax output and the zero-filled gradient, which dominate the loss cost at a 32k-256k vocabulary.
"""

from __future__ import annotations

import torch


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits_max = logits.max(dim=-1, keepdim=True).values
        target_logit = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - logits_max.squeeze(-1)
        compute = torch.promote_types(logits.dtype, torch.float32)
        softmax = torch.sub(logits, logits_max, out=torch.empty_like(logits, dtype=compute)).exp_()
        sum_exp = softmax.sum(dim=-1)
        softmax.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, target)
        ctx.logits_dtype = logits.dtype
        return torch.log(sum_exp) - target_logit.to(compute)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        softmax, target = ctx.saved_tensors
        grad_input = softmax  # reused in place: the saved buffer is not needed after this
        grad_input.scatter_add_(-1, target.unsqueeze(-1), torch.full_like(grad.unsqueeze(-1), -1.0,
                                                                          dtype=grad_input.dtype))
        grad_input.mul_(grad.unsqueeze(-1))
        return grad_input.to(ctx.logits_dtype), None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits ``(..., vocab)`` against integer targets ``(...)``: returns ``(...)`` losses,
    ``logsumexp(logits) - logits[target]``, computed in float32 at least."""
    return _CrossEntropy.apply(logits, target)
