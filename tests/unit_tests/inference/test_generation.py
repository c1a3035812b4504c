"""Token-level generation against full recomputation (the oracle: one whole-sequence forward per new token)."""

from __future__ import annotations

import pytest
import torch

from megatron.core.inference.generation import generate
from megatron.core.inference.sampling import GREEDY, SamplingParams, sampling_log_probs

from .helpers import generation_model

PROMPTS = [[3, 5, 7, 9, 11, 2, 4], [8, 1], [30, 31, 4, 4, 6]]


def recompute_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([tokens]))
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("pattern", ["M*-M", "M", "*-"])
def test_cached_batched_generation_equals_recomputation(pattern):
    model = generation_model(pattern)
    output = generate(model, PROMPTS, 6, max_sequence_length=128)
    for index, prompt in enumerate(PROMPTS):
        assert output.tokens[index] == recompute_greedy(model, prompt, 6)
        assert output.generated(index) == output.tokens[index][len(prompt):]
    assert output.finish_reasons == ["length"] * 3


def test_per_prompt_budgets_and_zero_tokens():
    model = generation_model()
    output = generate(model, PROMPTS, [0, 3, 5], max_sequence_length=128)
    assert [len(output.generated(i)) for i in range(3)] == [0, 3, 5]
    assert output.tokens[0] == PROMPTS[0]


def test_log_probs_equal_a_full_forward():
    model = generation_model()
    output = generate(model, PROMPTS, 4, max_sequence_length=128, return_log_probs=True)
    for tokens, log_probs in zip(output.tokens, output.log_probs, strict=True):
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([tokens[:-1]]))[0], dim=-1)
        expected = full.gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(log_probs, dtype=torch.float64), expected, rtol=0, atol=1e-5)


def test_seeded_sampling_is_reproducible():
    model = generation_model()
    params = SamplingParams(temperature=1.5, top_p=0.9)

    def run(seed: int) -> list[list[int]]:
        return generate(model, PROMPTS, 8, 128, params, torch.Generator().manual_seed(seed)).tokens

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_stop_on_eod_and_on_the_callers_test():
    model = generation_model()
    first = generate(model, PROMPTS, 1, 128).generated(0)[0]
    output = generate(model, PROMPTS, 6, 128, eod=first)
    assert output.finish_reasons[0] == "eod" and output.generated(0) == [first]
    stopped = generate(model, PROMPTS, 6, 128, stop=lambda index, generated: index == 1 and len(generated) == 2)
    assert stopped.finish_reasons == ["length", "stop", "length"] and len(stopped.generated(1)) == 2


def test_too_long_or_empty_prompts_are_refused():
    model = generation_model()
    with pytest.raises(ValueError, match="prompt 0 has 7 tokens; with 127 tokens to generate that exceeds"):
        generate(model, PROMPTS, 127, max_sequence_length=128)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, [[]], 3, max_sequence_length=128)


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    kept = sampling_log_probs(logits, SamplingParams(top_k=2)).isfinite()
    assert kept.tolist() == [[False, False, False, True, True]]
    probs = torch.softmax(logits, dim=-1)[0]  # 0.01, 0.03, 0.09, 0.23, 0.64
    nucleus = sampling_log_probs(logits, SamplingParams(top_p=0.8)).isfinite()
    assert nucleus.tolist() == [[False, False, False, True, True]] and probs[3:].sum() >= 0.8
    assert sampling_log_probs(logits, SamplingParams(top_p=0.5)).isfinite().tolist() == [[False] * 4 + [True]]
    tempered = sampling_log_probs(logits, SamplingParams(temperature=2.0)).exp()
    torch.testing.assert_close(tempered, torch.softmax(logits / 2.0, dim=-1))
    assert GREEDY.greedy and not SamplingParams().greedy
    with pytest.raises(ValueError, match="top_k and top_p cannot both be used"):
        SamplingParams(top_k=3, top_p=0.5)


def test_last_logits_only_returns_the_last_position():
    from megatron.core.inference_params import InferenceParams

    model = generation_model()
    tokens = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        full = model(tokens)
        last = model(tokens, inference_params=InferenceParams(1, 16, last_logits_only=True))
    assert last.shape == (1, 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=0, atol=1e-12)
