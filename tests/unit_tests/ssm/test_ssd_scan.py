"""The chunked SSD scan against the plain sequential recurrence (float64, so agreement is to rounding: 1e-10)."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.ssm.ops import mamba_chunk_scan_combined, selective_state_update

TOL = 1e-10  # float64 oracle; observed differences are ~1e-14


def sequential_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial=None, softplus=False, seq_idx=None):
    """The recurrence step by step: state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_tᵀ; y_t = state_t C_t + D x_t."""
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if dt_bias is not None:
        dt = dt + dt_bias
    if softplus:
        dt = F.softplus(dt)
    state = initial.clone() if initial is not None else torch.zeros(b, h, p, n, dtype=x.dtype)
    outputs = []
    for t in range(length):
        if seq_idx is not None:
            previous = seq_idx[:, t - 1] if t > 0 else torch.zeros_like(seq_idx[:, 0])
            state = state * (seq_idx[:, t] == previous).to(x.dtype).view(b, 1, 1, 1)
        Bt = B[:, t].repeat_interleave(h // g, dim=1)
        Ct = C[:, t].repeat_interleave(h // g, dim=1)
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        y = (state * Ct[:, :, None]).sum(-1)
        if D is not None:
            y = y + (D[:, None] if D.dim() == 1 else D) * x[:, t]
        if z is not None:
            y = y * F.silu(z[:, t])
        outputs.append(y)
    return torch.stack(outputs, dim=1), state


def random_inputs(b=2, length=37, h=6, p=4, g=2, n=5):
    f64 = torch.float64
    return dict(
        x=torch.randn(b, length, h, p, dtype=f64), dt=torch.randn(b, length, h, dtype=f64),
        A=-torch.rand(h, dtype=f64) * 4, B=torch.randn(b, length, g, n, dtype=f64),
        C=torch.randn(b, length, g, n, dtype=f64),
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("length", [1, 7, 16, 37])
@pytest.mark.parametrize("with_extras", [False, True])
def test_chunked_scan_matches_recurrence(chunk_size, length, with_extras):
    inputs = random_inputs(length=length)
    h, p, n = 6, 4, 5
    extras = {}
    if with_extras:
        extras = dict(D=torch.randn(h, dtype=torch.float64), z=torch.randn(2, length, h, p, dtype=torch.float64),
                      dt_bias=torch.randn(h, dtype=torch.float64),
                      initial_states=torch.randn(2, h, p, n, dtype=torch.float64))
        dt_softplus = True
    else:
        inputs["dt"] = inputs["dt"].abs()  # without softplus dt must be positive to be a valid step
        dt_softplus = False
    y, final = mamba_chunk_scan_combined(**inputs, chunk_size=chunk_size, dt_softplus=dt_softplus,
                                         return_final_states=True, **extras)
    expected, expected_final = sequential_ssd(
        **inputs, D=extras.get("D"), z=extras.get("z"), dt_bias=extras.get("dt_bias"),
        initial=extras.get("initial_states"), softplus=dt_softplus)
    assert y.shape == (2, length, h, p) and y.dtype == torch.float64
    torch.testing.assert_close(y, expected, atol=TOL, rtol=TOL)
    torch.testing.assert_close(final, expected_final, atol=TOL, rtol=TOL)


def test_per_channel_D_and_no_final_state():
    inputs = random_inputs()
    D = torch.randn(6, 4, dtype=torch.float64)
    y = mamba_chunk_scan_combined(**inputs, chunk_size=8, D=D, dt_softplus=True)
    expected, _ = sequential_ssd(**inputs, D=D, softplus=True)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_seq_idx_resets_state_between_packed_sequences(chunk_size):
    inputs = random_inputs()
    seq_idx = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [0] * 37])
    initial = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    y, final = mamba_chunk_scan_combined(**inputs, chunk_size=chunk_size, seq_idx=seq_idx, dt_softplus=True,
                                         initial_states=initial, return_final_states=True)
    expected, expected_final = sequential_ssd(**inputs, seq_idx=seq_idx, softplus=True, initial=initial)
    torch.testing.assert_close(y, expected, atol=TOL, rtol=TOL)
    torch.testing.assert_close(final, expected_final, atol=TOL, rtol=TOL)


def test_state_update_matches_recurrence_step():
    inputs = random_inputs(length=1)
    D, z, bias = torch.randn(6, dtype=torch.float64), torch.randn(2, 1, 6, 4, dtype=torch.float64), torch.randn(6,
                                                                                                             dtype=torch.float64)
    initial = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    expected, expected_state = sequential_ssd(**inputs, D=D, z=z, dt_bias=bias, initial=initial, softplus=True)
    state = initial.clone()
    y = selective_state_update(state, inputs["x"][:, 0], inputs["dt"][:, 0], inputs["A"], inputs["B"][:, 0],
                               inputs["C"][:, 0], D=D, z=z[:, 0], dt_bias=bias, dt_softplus=True)
    torch.testing.assert_close(y, expected[:, 0], atol=TOL, rtol=TOL)
    torch.testing.assert_close(state, expected_state, atol=TOL, rtol=TOL)


def test_gradients_are_finite_and_match_recurrence():
    inputs = {k: v.requires_grad_() for k, v in random_inputs(length=19).items() if k != "A"}
    A = -torch.rand(6, dtype=torch.float64) * 4
    y = mamba_chunk_scan_combined(A=A, chunk_size=8, dt_softplus=True, **inputs)
    grads = torch.autograd.grad(y.square().sum(), list(inputs.values()))
    expected, _ = sequential_ssd(A=A, softplus=True, **inputs)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(inputs.values()))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, expected_grad, atol=1e-9, rtol=1e-9)


def test_float32_inputs_return_float32_and_stay_finite_with_large_decay():
    inputs = {k: v.float() for k, v in random_inputs(length=300).items()}
    inputs["A"] = inputs["A"] * 20  # exp(dt*A) far below float32's range over a chunk
    y, final = mamba_chunk_scan_combined(**inputs, chunk_size=128, dt_softplus=True, return_final_states=True)
    assert y.dtype == torch.float32 and torch.isfinite(y).all() and torch.isfinite(final).all()


def test_heads_must_divide_into_groups():
    inputs = random_inputs(g=2, h=6)
    inputs["B"] = torch.randn(2, 37, 4, 5, dtype=torch.float64)
    inputs["C"] = inputs["B"]
    with pytest.raises(ValueError, match="6 heads are not divisible by 4 groups"):
        mamba_chunk_scan_combined(**inputs, chunk_size=8)
