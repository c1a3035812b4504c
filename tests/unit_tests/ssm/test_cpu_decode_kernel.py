"""The fused C++ decode step against the composed PyTorch reference ops (float32: op order differs, so agreement is
to 1e-5; several steps so state errors would compound)."""

import os

import pytest
import torch

from megatron.core.cpu_kernels import cpu_op
from megatron.core.inference_params import InferenceParams
from megatron.core.ssm.mamba_mixer import MambaMixer

from ..models.helpers import randomize_, tiny_model

pytestmark = pytest.mark.skipif(os.environ.get("MEGATRON_CPU_KERNELS") == "0", reason="CPU kernels disabled")


def run_decode(model, tokens, steps):
    params = InferenceParams(tokens.shape[0], tokens.shape[1] + steps)
    with torch.inference_mode():
        model(tokens, inference_params=params)
        params.advance(tokens.shape[1])
        outputs = []
        for t in range(steps):
            outputs.append(model(tokens[:, t : t + 1], inference_params=params))
            params.advance(1)
    return torch.cat(outputs, dim=1)


def test_fused_step_matches_reference(monkeypatch):
    assert cpu_op("mamba2_decode_step", torch.zeros(1)) is not None, "the fused step should build on this machine"
    model = randomize_(tiny_model("M-M*M", mamba_num_groups=2, mamba_head_dim=8, mamba_state_dim=12)).eval()
    tokens = torch.randint(0, 61, (3, 11))
    fused = run_decode(model, tokens, 6)
    monkeypatch.setattr("megatron.core.ssm.mamba_mixer.cpu_op", lambda *args, **kwargs: None)
    reference = run_decode(model, tokens, 6)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_not_used_for_other_dtypes_or_devices():
    assert cpu_op("mamba2_decode_step", torch.zeros(1, dtype=torch.float64)) is None
    assert cpu_op("mamba2_decode_step", torch.zeros(1, device="meta")) is None
    assert cpu_op("mamba2_decode_step", torch.zeros(1), torch.zeros(1, dtype=torch.float64)) is None


def test_fused_layer_matches_module_path(monkeypatch):
    """The one-call layer (norm, in_proj, step, out_proj, residual) against the module path with the fused step."""
    model = randomize_(tiny_model("M-M*M", mamba_num_groups=2, mamba_head_dim=8, mamba_state_dim=12)).eval()
    tokens = torch.randint(0, 61, (3, 11))
    fused_calls = []
    original = MambaMixer.decode_with_residual

    def counted(self, *args):
        out = original(self, *args)
        fused_calls.append(out is not None)
        return out

    monkeypatch.setattr(MambaMixer, "decode_with_residual", counted)
    fused = run_decode(model, tokens, 6)
    assert fused_calls == [False] * 3 + [True] * 6 * 3, "the prefill runs the module path, every step the fused one"
    monkeypatch.setattr(MambaMixer, "decode_with_residual", lambda self, *args: None)
    module_path = run_decode(model, tokens, 6)
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)


def test_fused_layer_takes_several_tokens(monkeypatch):
    """A multi-token continuation (speculative verification) through the fused layer: bit for bit the tokens fed
    one at a time (same kernels row by row) in a Mamba/MLP model, and the chunked scan's result to float32 rounding;
    the states after it continue the same way."""
    model = randomize_(tiny_model("M-M", mamba_num_groups=2, mamba_head_dim=8, mamba_state_dim=12)).eval()
    tokens = torch.randint(0, 61, (2, 12))

    def continue_with(chunks: list[int]) -> torch.Tensor:
        params = InferenceParams(2, 12)
        outputs, position = [], 4
        with torch.inference_mode():
            model(tokens[:, :position], inference_params=params)
            params.advance(position)
            for size in chunks:
                outputs.append(model(tokens[:, position : position + size], inference_params=params))
                params.advance(size)
                position += size
        return torch.cat(outputs, dim=1)

    one_by_one = continue_with([1] * 8)
    grouped = continue_with([5, 3])  # 10 and 6 rows: within SMALL_BATCH_ROWS, so the fused layer runs
    assert torch.equal(grouped, one_by_one)
    monkeypatch.setattr(MambaMixer, "decode_with_residual", lambda self, *args: None)
    torch.testing.assert_close(continue_with([5, 3]), one_by_one, atol=1e-5, rtol=1e-5)  # the chunked scan


def test_rewind_to_a_recorded_token():
    """States recorded during a multi-token forward: rewinding to token i equals having fed only tokens 0..i, bit
    for bit in a Mamba/MLP model (attention over a different number of queries would round differently)."""
    model = randomize_(tiny_model("M-M", mamba_num_groups=2, mamba_head_dim=8, mamba_state_dim=12)).eval()
    tokens = torch.randint(0, 61, (2, 10))

    def continue_after(params: InferenceParams, start: int) -> torch.Tensor:
        return model(tokens[:, start : start + 1], inference_params=params)

    with torch.inference_mode():
        expected_params = InferenceParams(2, 10)
        model(tokens[:, :4], inference_params=expected_params)  # prompt 0..3, then tokens 4 and 5
        expected_params.advance(4)
        model(tokens[:, 4:6], inference_params=expected_params)
        expected_params.advance(2)
        expected = continue_after(expected_params, 6)

        params = InferenceParams(2, 10)
        model(tokens[:, :4], inference_params=params)
        params.advance(4)
        params.record_token_states = True
        model(tokens[:, 4:9], inference_params=params)  # a 5-token verification of which 2 are kept
        params.record_token_states = False
        assert params.token_states.keys() == params.recurrent_layers
        assert params.rewind_to_token(1, 6) and params.sequence_len_offset == 6
        assert torch.equal(continue_after(params, 6), expected)

        float64_model = tiny_model("M-M").double().eval()  # the module path records nothing: no rewind
        params = InferenceParams(2, 10)
        float64_model(tokens[:, :4], inference_params=params)
        params.advance(4)
        params.record_token_states = True
        float64_model(tokens[:, 4:9], inference_params=params)
        assert not params.rewind_to_token(1, 6) and params.sequence_len_offset == 4
