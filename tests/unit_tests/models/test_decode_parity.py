"""Prefill + one-token steps must give the logits of one full forward (float64: agreement to 1e-10)."""

import pytest
import torch

from megatron.core.inference.generation import greedy_generate
from megatron.core.inference_params import InferenceParams

from .helpers import randomize_, tiny_model

TOL = 1e-10


@pytest.mark.parametrize("mamba_version", [1, 2])
@pytest.mark.parametrize(
    ("pattern", "position_embedding_type"),
    [("M*-M-*M", "rope"), ("*-M", "learned_absolute"), ("MM-M", "none"), ("M*M*", "rope")],
)
def test_prefill_then_steps_equals_full_forward(mamba_version, pattern, position_embedding_type):
    model = randomize_(tiny_model(pattern, mamba_version=mamba_version, params_dtype=torch.float64,
                                  position_embedding_type=position_embedding_type)).eval()
    tokens = torch.randint(0, 61, (3, 23))
    with torch.no_grad():
        full = model(tokens)
        params = InferenceParams(max_batch_size=3, max_sequence_length=40)
        pieces = []
        # A long prefill, a short continued prefill (chunked prefill), then single tokens.
        for start, end in [(0, 13), (13, 17)] + [(t, t + 1) for t in range(17, 23)]:
            pieces.append(model(tokens[:, start:end], inference_params=params))
            params.advance(end - start)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=TOL, rtol=TOL)


def test_reset_starts_a_new_sequence():
    model = randomize_(tiny_model("M*-", params_dtype=torch.float64, position_embedding_type="rope")).eval()
    first, second = torch.randint(0, 61, (2, 1, 9))
    params = InferenceParams(1, 16)
    with torch.no_grad():
        model(first, inference_params=params)
        params.advance(9)
        params.reset()
        again = model(second, inference_params=params)
        torch.testing.assert_close(again, model(second), atol=TOL, rtol=TOL)


def test_greedy_generate_matches_recomputation():
    model = randomize_(tiny_model("M*-M", params_dtype=torch.float64, position_embedding_type="rope")).eval()
    prompt = torch.randint(0, 61, (2, 7))
    generated = greedy_generate(model, prompt, 9)
    sequence = prompt
    with torch.no_grad():
        for _ in range(9):  # oracle: a full forward over everything so far, no caches
            sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence[:, 7:])


def test_inference_params_overflow_is_a_clear_error():
    model = tiny_model("M*").eval()
    params = InferenceParams(1, 8)
    with pytest.raises(ValueError, match="exceed the inference max_sequence_length 8"):
        model(torch.zeros(1, 9, dtype=torch.long), inference_params=params)
    with pytest.raises(ValueError, match="batch size 2 exceeds"):
        model(torch.zeros(2, 3, dtype=torch.long), inference_params=params)
