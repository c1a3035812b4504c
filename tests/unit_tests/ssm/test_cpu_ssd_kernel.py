"""The fused CPU kernel for stage 1 of the chunked SSD scan (``csrc/ssd_chunk_diag.cpp``) against an independent
oracle: the plain PyTorch expression (scores C Bᵀ ∘ exp(segment sums), masked causal, times x) in float64, with
autograd for the gradients.

Tolerances: float64 agrees to ~1e-16 relative (only the summation order differs; the kernel's float64 exp is
std::exp), checked at 1e-10. float32 is compared with the float64 oracle on the same (float32) inputs: sums of up to
q * n rounded products and the kernel's vectorised exp (relative error < 1e-7) leave ~1e-7 of the largest term, so
errors are measured against the largest magnitude of each output, at 1e-5.
"""

import pytest
import torch

import megatron.core.ssm.ops.ssd as ssd
import megatron.core.ssm.ops.ssd_chunk_diag as chunk_diag
from megatron.core.cpu_kernels import cpu_op
from megatron.core.ssm.ops import mamba_chunk_scan_combined


@pytest.fixture(autouse=True)
def _needs_kernel():
    if cpu_op("ssd_chunk_diag", torch.zeros(1)) is None:
        pytest.skip("the fused CPU kernels are unavailable (disabled, or no compiler)")


def oracle(C, B, a_cum, x):
    """C, B (b, c, g, q, n), a_cum (b, c, g, r, q), x (b, c, g, r, q, p) -> (b, c, g, r, q, p)."""
    q = C.shape[3]
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    log_decay = (a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    scores = (C @ B.transpose(-1, -2)).unsqueeze(3) * torch.exp(log_decay)
    return scores @ x


def inputs(b, c, g, r, q, n, p, dtype, decay=1.0):
    C, B = torch.randn(b, c, g, q, n, dtype=dtype), torch.randn(b, c, g, q, n, dtype=dtype)
    a_cum = torch.cumsum(-decay * torch.rand(b, c, g, r, q, dtype=dtype), dim=-1)  # <= 0, non-increasing, as in a scan
    return C, B, a_cum, torch.randn(b, c, g, r, q, p, dtype=dtype)


def assert_scaled_close(actual, expected, tol):
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().clamp_min(1e-300)
    error = (actual.double() - expected).abs().max() / scale
    assert error <= tol, f"max error {error:.2e} relative to the largest magnitude (tolerance {tol:.0e})"


def kernel_and_oracle(tensors, grad):
    """Forward and the four gradients, through the kernel and through the float64 oracle."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    y = chunk_diag.ssd_chunk_diag(*leaves)
    y.backward(grad)
    reference = [t.detach().double().requires_grad_() for t in tensors]
    expected = oracle(*reference)
    expected.backward(grad.double())
    return [y] + [t.grad for t in leaves], [expected] + [t.grad for t in reference]


SHAPES = [  # b, c, g, r, q, n, p
    (2, 3, 2, 3, 64, 32, 16),  # whole vectors everywhere
    (1, 2, 3, 1, 13, 7, 5),  # q not a multiple of 8, r = 1, n and p odd
    (2, 2, 1, 2, 1, 3, 3),  # chunk length 1
    (1, 1, 2, 3, 24, 17, 33),  # p past a whole number of vectors
    (3, 1, 2, 2, 6, 9, 4),  # q below one vector
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_oracle(shape, dtype, tol):
    torch.manual_seed(0)
    tensors = inputs(*shape, dtype)
    actual, expected = kernel_and_oracle(tensors, torch.randn(tensors[3].shape, dtype=dtype))
    assert actual[0].is_contiguous()
    for a, e in zip(actual, expected, strict=True):
        assert_scaled_close(a, e, tol)


def test_permuted_output_gradient_is_read_in_place():
    """In the scan the gradient arrives as a permutation (b, c, q, g, r, p) -> (b, c, g, r, q, p) of a contiguous
    tensor; a gradient whose last axis is not contiguous is copied first."""
    torch.manual_seed(1)
    b, c, g, r, q, n, p = 2, 3, 2, 3, 10, 6, 5
    tensors = inputs(b, c, g, r, q, n, p, torch.float64)
    for grad in (torch.randn(b, c, q, g, r, p, dtype=torch.float64).permute(0, 1, 3, 4, 2, 5),
                 torch.randn(b, c, g, r, p, q, dtype=torch.float64).transpose(-1, -2)):
        actual, expected = kernel_and_oracle(tensors, grad)
        for a, e in zip(actual, expected, strict=True):
            assert_scaled_close(a, e, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_decay_stays_finite(dtype):
    """Log decays in the thousands: exp underflows (float32 clamps to ~1e-38); only the diagonal terms survive."""
    torch.manual_seed(2)
    tensors = inputs(1, 2, 2, 2, 12, 8, 4, dtype, decay=3000.0)
    actual, expected = kernel_and_oracle(tensors, torch.randn(tensors[3].shape, dtype=dtype))
    for a, e in zip(actual, expected, strict=True):
        assert_scaled_close(a, e, 1e-10 if dtype == torch.float64 else 1e-5)


def test_gradcheck():
    torch.manual_seed(3)
    tensors = [t.requires_grad_() for t in inputs(1, 2, 1, 2, 3, 2, 3, torch.float64)]
    assert torch.autograd.gradcheck(chunk_diag.ssd_chunk_diag, tensors)


def test_unavailable_kernel_returns_none(monkeypatch):
    C, B, a_cum, x = inputs(1, 1, 1, 1, 4, 2, 2, torch.float64)
    assert chunk_diag.ssd_chunk_diag(C.half(), B.half(), a_cum.half(), x.half()) is None  # not float32/64
    monkeypatch.setattr(chunk_diag, "cpu_op", lambda *args, **kwargs: None)
    assert chunk_diag.ssd_chunk_diag(C, B, a_cum, x) is None


def scan_inputs(dtype, length=45, b=2, h=6, p=5, g=2, n=7):
    f = dict(dtype=dtype)
    return dict(x=torch.randn(b, length, h, p, **f), dt=torch.randn(b, length, h, **f), A=-torch.rand(h, **f) * 3,
                B=torch.randn(b, length, g, n, **f), C=torch.randn(b, length, g, n, **f), D=torch.randn(h, **f),
                z=torch.randn(b, length, h, p, **f), dt_bias=torch.randn(h, **f),
                initial_states=torch.randn(b, h, p, n, **f))


def scan_with_grads(tensors, chunk_size):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
    y, final = mamba_chunk_scan_combined(**leaves, chunk_size=chunk_size, dt_softplus=True, return_final_states=True)
    generator = torch.Generator().manual_seed(5)  # the same output weights whatever the dtype
    weights = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype) for t in (y, final)]
    (y * weights[0]).sum().add((final * weights[1]).sum()).backward()
    return [y, final] + [leaves[k].grad for k in sorted(leaves)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_size", [1, 8, 16])
def test_scan_with_and_without_kernel_agree(monkeypatch, dtype, tol, chunk_size):
    torch.manual_seed(4)
    tensors = scan_inputs(dtype)
    calls = []
    fused = ssd.ssd_chunk_diag
    monkeypatch.setattr(ssd, "ssd_chunk_diag", lambda *args: calls.append(1) or fused(*args))
    with_kernel = scan_with_grads(tensors, chunk_size)
    assert calls, "the scan should take the fused stage 1 on CPU"
    monkeypatch.setattr(chunk_diag, "cpu_op", lambda *args, **kwargs: None)
    without = scan_with_grads({k: v.double() for k, v in tensors.items()}, chunk_size)
    for a, e in zip(with_kernel, without, strict=True):
        assert_scaled_close(a, e, tol)


def test_packed_sequences_keep_the_reference(monkeypatch):
    """With seq_idx the intra-chunk mask also separates sequences, which the kernel does not do."""
    monkeypatch.setattr(ssd, "ssd_chunk_diag", lambda *args: pytest.fail("the kernel ignores seq_idx"))
    tensors = scan_inputs(torch.float64, length=12)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    mamba_chunk_scan_combined(**tensors, chunk_size=8, seq_idx=seq_idx)
