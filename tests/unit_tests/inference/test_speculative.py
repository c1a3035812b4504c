"""Speculative decoding against the target model alone (the oracle: plain cached generation with the target)."""

from __future__ import annotations

import pytest
import torch

from megatron.core.inference.generation import generate
from megatron.core.inference.sampling import SamplingParams
from megatron.core.inference.speculative import speculative_generate

from .helpers import generation_model

PROMPTS = [[3, 5, 7, 9, 11, 2, 4], [8, 1], [30, 31, 4, 4, 6]]


@pytest.fixture(scope="module")
def target() -> torch.nn.Module:
    return generation_model("M*-M", seed=0)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
@pytest.mark.parametrize("draft_kind", ["disagreeing", "same"])
def test_greedy_speculative_equals_greedy_target(target, k, draft_kind):
    # A different random model disagrees with the target most of the time (forcing roll-backs at every depth);
    # the target itself as draft accepts everything (the all-accepted path and its bonus token).
    draft = generation_model("M-", seed=1) if draft_kind == "disagreeing" else target
    expected = generate(target, PROMPTS, 12, max_sequence_length=128, return_log_probs=True)
    output = speculative_generate(target, draft, PROMPTS, 12, 128, k, return_log_probs=True)
    assert output.tokens == expected.tokens
    assert output.finish_reasons == expected.finish_reasons
    for got, want in zip(output.log_probs, expected.log_probs, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-5)
    accepted, proposed = output.acceptance
    assert proposed > 0
    if draft_kind == "same":
        assert accepted == proposed
    else:
        assert accepted < proposed


def test_attention_only_and_mamba_only_targets():
    for pattern in ("*-", "M"):
        target, draft = generation_model(pattern, seed=0), generation_model("M", seed=2)
        expected = generate(target, PROMPTS, 9, max_sequence_length=128)
        assert speculative_generate(target, draft, PROMPTS, 9, 128, 3).tokens == expected.tokens


def test_stop_conditions_and_budgets_inside_a_round(target):
    draft = target  # accepts all: a round can run past a stop, which must still cut the sequence
    first = generate(target, PROMPTS, 3, 128).generated(1)
    output = speculative_generate(target, draft, PROMPTS, [5, 4, 2], 128, 4, eod=first[1])
    expected = generate(target, PROMPTS, [5, 4, 2], 128, eod=first[1])
    assert output.tokens == expected.tokens and output.finish_reasons == expected.finish_reasons
    assert output.finish_reasons[1] == "eod"


def test_sampled_speculative_keeps_the_target_distribution():
    """4000 copies of one prompt in one batch (rows draw independently): the frequencies of the second generated
    token, the first one a speculative round produces, must match the target's own sampling distribution (rejection
    sampling keeps it exact). The standard error is at most 0.8% per token; the test allows 3%."""
    target = generation_model("M", vocab_size=8, dtype=torch.float32, seed=3)
    draft = generation_model("M", vocab_size=8, dtype=torch.float32, seed=4)
    params = SamplingParams(temperature=0.7)
    prompt = [1, 2, 3]
    output = speculative_generate(target, draft, [prompt] * 4000, 3, 128, 2, params, torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([output.generated(i)[1] for i in range(4000)]), minlength=8)
    assert (counts / 4000 - expected_second(target, [prompt], params)).abs().max() < 0.03


def expected_second(target: torch.nn.Module, prompt: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """Marginal distribution of the second generated token when sampling from the target alone."""
    with torch.no_grad():
        first = torch.softmax(target(torch.tensor(prompt))[0, -1].float() / params.temperature, dim=-1)
        total = torch.zeros_like(first)
        for token, probability in enumerate(first.tolist()):
            logits = target(torch.tensor([prompt[0] + [token]]))[0, -1].float()
            total += probability * torch.softmax(logits / params.temperature, dim=-1)
    return total
