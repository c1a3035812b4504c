"""The fused cross-entropy against ``F.cross_entropy`` (float64: values and gradients to 1e-12)."""

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def test_matches_torch_cross_entropy_values_and_gradients():
    logits = (torch.randn(3, 5, 40, dtype=torch.float64) * 4).requires_grad_()
    target = torch.randint(0, 40, (3, 5))
    upstream = torch.randn(3, 5, dtype=torch.float64)
    ours = vocab_parallel_cross_entropy(logits, target)
    (grad,) = torch.autograd.grad((ours * upstream).sum(), logits)
    expected = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(3, 5)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), logits)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-12)


def test_float32_and_large_logits_stay_finite():
    logits = torch.full((2, 7), 1e4, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.tensor([0, 6]))
    loss.sum().backward()
    torch.testing.assert_close(loss, torch.full((2,), torch.log(torch.tensor(7.0)).item()))
    assert torch.isfinite(logits.grad).all()
