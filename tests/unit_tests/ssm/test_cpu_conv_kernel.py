"""The fused CPU causal-conv + SiLU kernel against an independent oracle: ``F.conv1d`` over a left-padded input
followed by ``F.silu``, in float64 (agreement to 1e-12: only the summation order differs) and float32 (1e-5; the
kernel's vectorised exp is accurate to ~1e-7 relative)."""

import os

import pytest
import torch
import torch.nn.functional as F

from megatron.core.cpu_kernels import cpu_op
from megatron.core.ssm.ops.causal_conv1d import causal_conv1d_silu_split, projection_conv1d_silu_split

pytestmark = pytest.mark.skipif(os.environ.get("MEGATRON_CPU_KERNELS") == "0", reason="CPU kernels disabled")


def oracle(x, weight, bias, initial=None):
    """x (b, l, d) channel-last -> (b, l, d)."""
    width = weight.shape[1]
    history = F.pad(x.transpose(1, 2), (width - 1, 0)) if initial is None else torch.cat(
        [initial, x.transpose(1, 2)], -1)
    return F.silu(F.conv1d(history, weight.unsqueeze(1), bias, groups=x.shape[2])).transpose(1, 2)


def inputs(dtype, b=2, length=37, widths=(70, 50, 30), width=4, offset=5):
    d = sum(widths)
    rows = torch.randn(b, length, d + 2 * offset, dtype=dtype)
    x = rows[:, :, offset:offset + d]  # a column slice, as the conv input sits inside the in_proj output
    return x, torch.randn(d, width, dtype=dtype), torch.randn(d, dtype=dtype), list(widths)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_backward_match_conv1d(dtype, tol, with_bias):
    assert cpu_op("causal_conv1d_silu", torch.zeros(1)) is not None, "the kernel should build on this machine"
    torch.manual_seed(0)
    x, weight, bias, widths = inputs(dtype)
    bias = bias if with_bias else None
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight) + ((bias,) if with_bias else ())]
    pieces = causal_conv1d_silu_split(leaves[0], leaves[1], leaves[2] if with_bias else None, widths)
    assert [p.shape[-1] for p in pieces] == widths and all(p.is_contiguous() for p in pieces)
    grad = torch.randn(x.shape, dtype=dtype)
    torch.cat(pieces, -1).mul(grad).sum().backward()

    reference_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    expected = oracle(reference_leaves[0], reference_leaves[1], reference_leaves[2] if with_bias else None)
    expected.mul(grad).sum().backward()
    torch.testing.assert_close(torch.cat(pieces, -1), expected, atol=tol, rtol=tol)
    for leaf, reference in zip(leaves, reference_leaves, strict=True):
        torch.testing.assert_close(leaf.grad, reference.grad, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("unused", [None, "head", "tail", "conv"])
def test_projection_split_builds_one_gradient(dtype, tol, unused):
    """[head | conv input | tail] as one node (Mamba2's [z | x B C | dt]): the outputs and every gradient equal
    slicing the projection and convolving with F.conv1d, including pieces that get no gradient."""
    torch.manual_seed(2)
    head, widths, tail = 9, [70, 50, 30], 5
    projection = torch.randn(2, 37, head + sum(widths) + tail, dtype=dtype, requires_grad=True)
    weight = torch.randn(sum(widths), 4, dtype=dtype, requires_grad=True)
    bias = torch.randn(sum(widths), dtype=dtype, requires_grad=True)
    out = projection_conv1d_silu_split(projection, weight, bias, head, widths)
    assert out is not None and [t.shape[-1] for t in out] == [head, *widths, tail]
    reference_leaves = [t.detach().clone().requires_grad_() for t in (projection, weight, bias)]
    reference_projection = reference_leaves[0]
    expected = (reference_projection[..., :head],
                *oracle(reference_projection[..., head:-tail], *reference_leaves[1:]).split(widths, -1),
                reference_projection[..., -tail:])
    used = {"head": [1, 2, 3, 4], "tail": [0, 1, 2, 3], "conv": [0, 4], None: [0, 1, 2, 3, 4]}[unused]
    weights = [torch.randn(t.shape, dtype=dtype) for t in expected]
    sum((out[i] * weights[i]).sum() for i in used).backward()
    sum((expected[i] * weights[i]).sum() for i in used).backward()
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    for leaf, reference in zip((projection, weight, bias), reference_leaves, strict=True):
        expected_grad = torch.zeros_like(reference) if reference.grad is None else reference.grad  # unused conv
        torch.testing.assert_close(leaf.grad, expected_grad, atol=tol * 10, rtol=tol)


def test_unused_piece_gets_zero_gradient():
    torch.manual_seed(1)
    x, weight, bias, widths = inputs(torch.float64, length=9, widths=(5, 3))
    x.requires_grad_()
    first, _ = causal_conv1d_silu_split(x, weight, bias, widths)
    first.sum().backward()
    reference = x.detach().clone().requires_grad_()
    oracle(reference, weight, bias)[..., :5].sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("length", [1, 2, 6])
def test_initial_states_continue_the_sequence(length):
    torch.manual_seed(2)
    x, weight, bias, widths = inputs(torch.float64, length=length)
    initial = torch.randn(x.shape[0], x.shape[2], weight.shape[1] - 1, dtype=torch.float64)
    with torch.no_grad():
        pieces = causal_conv1d_silu_split(x, weight, bias, widths, initial)
    torch.testing.assert_close(torch.cat(pieces, -1), oracle(x, weight, bias, initial), atol=1e-12, rtol=1e-12)


def test_extreme_inputs_stay_finite():
    """SiLU of large negative and positive pre-activations: the kernel's exp clamps instead of overflowing."""
    x = torch.tensor([[[-1e4], [-90.0], [0.0], [90.0], [1e4]]])
    weight = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    (out,) = causal_conv1d_silu_split(x, weight, None, [1])
    torch.testing.assert_close(out, F.silu(x), atol=1e-6, rtol=1e-6)


def test_not_used_for_half_precision_or_meta():
    assert cpu_op("causal_conv1d_silu", torch.zeros(1, dtype=torch.bfloat16)) is None
    assert cpu_op("causal_conv1d_silu", torch.zeros(1, device="meta")) is None
