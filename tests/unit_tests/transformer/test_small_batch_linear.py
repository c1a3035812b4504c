"""The C++ ``small_batch_linear`` kernel (few input rows times a row-major weight) against ``F.linear``.

Its dot products sum in a different order from PyTorch's GEMM, so float32 agrees to ~1e-5 (relative to outputs of
order 1: the weights are scaled by 1/sqrt(k)) and float64 to 1e-12.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from megatron.core.cpu_kernels import cpu_op
from megatron.core.inference_params import InferenceParams
from megatron.core.transformer import norm
from megatron.core.transformer.norm import decode_linear

pytestmark = pytest.mark.skipif(os.environ.get("MEGATRON_CPU_KERNELS") == "0", reason="CPU kernels disabled")

FLOATS = (torch.float32, torch.float64)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def kernel(*tensors: torch.Tensor):
    op = cpu_op("small_batch_linear", *tensors, dtypes=FLOATS)
    assert op is not None, "the kernel should build on this machine"
    return op


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m", [1, 3, 8, 17])
@pytest.mark.parametrize("k", [13, 256])
@pytest.mark.parametrize("n", [1, 7, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(dtype, m, k, n, with_bias):
    generator = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    x = torch.randn(m, k, dtype=dtype, generator=generator)
    weight = torch.randn(n, k, dtype=dtype, generator=generator) / k**0.5
    bias = torch.randn(n, dtype=dtype, generator=generator) if with_bias else None
    out = kernel(x, weight)(x, weight, bias)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=tol, atol=tol)


def test_large_matrix_split_over_threads():
    # Big enough for at::parallel_for to split the rows between threads, with a row count that leaves remainders.
    x, weight, bias = torch.randn(5, 96), torch.randn(4099, 96) / 96**0.5, torch.randn(4099)
    torch.testing.assert_close(kernel(x, weight)(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_rejects_inconsistent_inputs():
    op = kernel(torch.zeros(1))
    x, weight = torch.randn(2, 8), torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="features"):
        op(x, torch.randn(5, 9), None)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x, torch.randn(8, 5).t(), None)
    with pytest.raises(RuntimeError, match="Double"):
        op(x, weight.double(), None)
    with pytest.raises(RuntimeError, match="bias"):
        op(x, weight, torch.zeros(4))


def test_not_used_for_half_precision_or_other_devices():
    for dtype in (torch.float16, torch.bfloat16):
        assert cpu_op("small_batch_linear", torch.zeros(1, 4, dtype=dtype), torch.zeros(3, 4, dtype=dtype),
                      dtypes=FLOATS) is None
    assert cpu_op("small_batch_linear", torch.zeros(1, 4, device="meta"), torch.zeros(3, 4, device="meta"),
                  dtypes=FLOATS) is None
    assert cpu_op("small_batch_linear", torch.zeros(1, 4), torch.zeros(3, 4), torch.zeros(3, dtype=torch.float64),
                  dtypes=FLOATS) is None


@pytest.mark.parametrize("with_bias", [False, True])
def test_decode_linear_runs_the_kernel_for_single_token_steps(monkeypatch, with_bias):
    calls = []

    def recording_cpu_op(name, *tensors, **kwargs):
        calls.append(name)
        return cpu_op(name, *tensors, **kwargs)

    monkeypatch.setattr(norm, "cpu_op", recording_cpu_op)
    layer = torch.nn.Linear(24, 37, bias=with_bias)
    x = torch.randn(3, 1, 24)
    with torch.no_grad():
        out = decode_linear(x, layer.weight, layer.bias, InferenceParams(3, 8))
        expected = F.linear(x, layer.weight, layer.bias)
    assert calls == ["small_batch_linear"]
    assert out.shape == (3, 1, 37)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_linear_falls_back_to_f_linear(monkeypatch):
    monkeypatch.setattr(norm, "cpu_op", lambda *args, **kwargs: None)
    x, weight, bias = torch.randn(2, 1, 6), torch.randn(5, 6), torch.randn(5)
    with torch.no_grad():
        torch.testing.assert_close(decode_linear(x, weight, bias, InferenceParams(2, 4)), F.linear(x, weight, bias))
    x16, weight16 = x.bfloat16(), weight.bfloat16()
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(decode_linear(x16, weight16, None, InferenceParams(2, 4)), F.linear(x16, weight16))
