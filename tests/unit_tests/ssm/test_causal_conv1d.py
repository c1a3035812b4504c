"""Causal depthwise conv against ``nn.Conv1d`` evaluated on a left-padded input (the textbook definition)."""

import torch
import torch.nn.functional as F

from megatron.core.ssm.ops import causal_conv1d_fn, causal_conv1d_update


def oracle(x, weight, bias, history):
    conv = torch.nn.Conv1d(x.shape[1], x.shape[1], weight.shape[1], groups=x.shape[1], dtype=x.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.unsqueeze(1))
        conv.bias.copy_(bias)
        return F.silu(conv(torch.cat([history, x], dim=-1)))


def test_full_and_stepwise_match_padded_conv():
    x = torch.randn(2, 6, 11, dtype=torch.float64)
    weight, bias = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    history = torch.randn(2, 6, 3, dtype=torch.float64)
    expected_fresh = oracle(x, weight, bias, torch.zeros_like(history))
    torch.testing.assert_close(causal_conv1d_fn(x, weight, bias, activation="silu"), expected_fresh)
    expected = oracle(x, weight, bias, history)
    torch.testing.assert_close(causal_conv1d_fn(x, weight, bias, initial_states=history, activation="silu"), expected)
    state = torch.cat([torch.zeros(2, 6, 1, dtype=torch.float64), history], dim=-1)
    steps = [causal_conv1d_update(x[:, :, t], state, weight, bias, "silu") for t in range(11)]
    torch.testing.assert_close(torch.stack(steps, dim=-1), expected)
    torch.testing.assert_close(state, x[:, :, -4:])
