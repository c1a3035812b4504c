"""The fused cross-entropies against ``F.cross_entropy`` (float64: values and gradients to 1e-12)."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel import (
    linear_cross_entropy,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)


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


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_elements", [40, 7 * 40, 1 << 21])  # one row per chunk, an uneven split, one chunk
def test_linear_cross_entropy_matches_logits_then_cross_entropy(monkeypatch, with_bias, chunk_elements):
    """Oracle: ``F.linear`` then ``F.cross_entropy`` (float64: values and all gradients to 1e-12)."""
    monkeypatch.setattr(linear_cross_entropy, "CHUNK_ELEMENTS", chunk_elements)
    hidden = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True) if with_bias else None
    target = torch.randint(0, 40, (3, 5))
    upstream = torch.randn(3, 5, dtype=torch.float64)
    leaves = [hidden, weight] + ([bias] if with_bias else [])
    ours = vocab_parallel_linear_cross_entropy(hidden, weight, target, bias)
    grads = torch.autograd.grad((ours * upstream).sum(), leaves)
    logits = F.linear(hidden, weight, bias)
    expected = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(3, 5)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), leaves)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-12)


def test_linear_cross_entropy_bfloat16_computes_the_loss_in_float32():
    hidden = torch.randn(4, 16).bfloat16().requires_grad_()
    weight = torch.randn(50, 16).bfloat16().requires_grad_()
    target = torch.randint(0, 50, (4,))
    loss = vocab_parallel_linear_cross_entropy(hidden, weight, target)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(F.linear(hidden, weight).float(), target, reduction="none")
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
