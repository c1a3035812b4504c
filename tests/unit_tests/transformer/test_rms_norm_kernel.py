"""The one-pass CPU RMSNorm kernel used without autograd, against ``F.rms_norm`` (float64 to 1e-12; float32 to
1e-6: only the summation order of the mean square differs)."""

import os

import pytest
import torch
import torch.nn.functional as F

from megatron.core.cpu_kernels import cpu_op
from megatron.core.transformer.norm import normalize

pytestmark = pytest.mark.skipif(os.environ.get("MEGATRON_CPU_KERNELS") == "0", reason="CPU kernels disabled")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("shape", [(1, 1, 256), (3, 5, 13), (2, 300, 64), (7,)])
def test_matches_torch_rms_norm(dtype, tol, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype) * 3
    weight = torch.randn(shape[-1], dtype=dtype)
    with torch.no_grad():
        ours = normalize(x, "RMSNorm", weight, None, 1e-5)
    torch.testing.assert_close(ours, F.rms_norm(x, (shape[-1],), weight, 1e-5), atol=tol, rtol=tol)


def test_used_without_autograd_only(monkeypatch):
    calls = []
    kernel = cpu_op("rms_norm", torch.zeros(1))
    assert kernel is not None, "the kernel should build on this machine"
    monkeypatch.setattr("megatron.core.transformer.norm.cpu_op",
                        lambda *args, **kwargs: lambda *a: calls.append(1) or kernel(*a))
    x, weight = torch.randn(2, 8), torch.randn(8, requires_grad=True)
    normalize(x, "RMSNorm", weight, None, 1e-5).sum().backward()  # autograd: F.rms_norm
    assert not calls and weight.grad is not None
    with torch.no_grad():
        normalize(x, "RMSNorm", weight, None, 1e-5)
    assert calls == [1]


def test_bad_input_is_refused_with_a_message():
    kernel = cpu_op("rms_norm", torch.zeros(1))
    with pytest.raises(RuntimeError, match="contiguous x"):
        kernel(torch.randn(4, 6), torch.randn(5), 1e-5)
