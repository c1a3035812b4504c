"""Mamba1 scan: split runs (initial/last state, single steps) equal one run. The model-level oracle is HF's
MambaForCausalLM in tests/unit_tests/models/test_hf_parity.py."""

import torch

from megatron.core.ssm.ops import selective_scan_fn, selective_scan_step


def test_split_scan_and_steps_equal_one_scan():
    b, d, n, length = 2, 5, 3, 12
    f64 = torch.float64
    u, delta, z = (torch.randn(b, d, length, dtype=f64) for _ in range(3))
    A = -torch.rand(d, n, dtype=f64) * 3
    B, C = torch.randn(b, n, length, dtype=f64), torch.randn(b, n, length, dtype=f64)
    D, bias = torch.randn(d, dtype=f64), torch.randn(d, dtype=f64)
    kwargs = dict(D=D, delta_bias=bias, delta_softplus=True)
    full, last = selective_scan_fn(u, delta, A, B, C, z=z, return_last_state=True, **kwargs)
    head, state = selective_scan_fn(u[..., :7], delta[..., :7], A, B[..., :7], C[..., :7], z=z[..., :7],
                                    return_last_state=True, **kwargs)
    tail = selective_scan_fn(u[..., 7:9], delta[..., 7:9], A, B[..., 7:9], C[..., 7:9], z=z[..., 7:9],
                             initial_state=state, return_last_state=True, **kwargs)
    pieces, state = [head, tail[0]], tail[1].clone()
    for t in range(9, length):
        pieces.append(selective_scan_step(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], z=z[..., t],
                                          **kwargs).unsqueeze(-1))
    torch.testing.assert_close(torch.cat(pieces, dim=-1), full)
    torch.testing.assert_close(state, last)
