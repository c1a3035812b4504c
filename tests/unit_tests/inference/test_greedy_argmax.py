"""The int8-screened greedy argmax (C++ ``greedy_argmax``) and the argmax-only decoding path built on it.

The kernel promises the argmax of the logits ``small_batch_linear`` computes (first index on ties, NaN counts as the
maximum as in ``torch.argmax``), so that is the oracle, and it must hold exactly, also for adversarial near ties that
the int8 screen alone cannot separate. Independently, the error bound it relies on is checked in float64, and its
answer against a float64 ``F.linear`` wherever the top two logits are clearly apart.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from megatron.core.cpu_kernels import cpu_op
from megatron.core.inference.generation import generate, greedy_generate
from megatron.core.inference.speculative import speculative_generate
from megatron.core.inference_params import InferenceParams
from megatron.inference.model_loading import VocabularyMask

from .helpers import generation_model

pytestmark = pytest.mark.skipif(os.environ.get("MEGATRON_CPU_KERNELS") == "0", reason="CPU kernels disabled")


def ops():
    assert cpu_op("greedy_argmax", torch.zeros(1)) is not None, "the kernels should build on this machine"
    return torch.ops.megatron


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """argmax of the float32 logits that decoding computes (``small_batch_linear``)."""
    return ops().small_batch_linear(x, weight, None).argmax(dim=-1)


def screened(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return ops().greedy_argmax(x, weight, *ops().int8_row_codes(weight))


@pytest.mark.parametrize("k", [1, 7, 32, 257])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_random_weights(k, m):
    generator = torch.Generator().manual_seed(k * 100 + m)
    weight = torch.randn(3000, k, generator=generator) * 0.02
    x = torch.randn(m, k, generator=generator)
    got = screened(x, weight)
    assert torch.equal(got, reference(x, weight))
    exact = F.linear(x.double(), weight.double())
    top = exact.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 1e-4  # float32 rounding cannot swap these
    assert torch.equal(got[clear], exact.argmax(-1)[clear])


def test_near_ties_below_int8_resolution():
    # Rows that differ by far less than an int8 step: the screen keeps them all, the exact pass decides.
    generator = torch.Generator().manual_seed(1)
    k = 64
    base = torch.rand(1, k, generator=generator) * 0.05 + 0.02  # positive: with positive x these rows win
    weight = base.repeat(400, 1)
    weight[:, 3] += torch.arange(400) * 1e-6
    weight = torch.cat([torch.randn(2000, k, generator=generator) * 0.01, weight])
    x = torch.randn(4, k, generator=generator).abs()  # positive x[:, 3]: the last near-copy is the largest
    assert torch.equal(screened(x, weight), reference(x, weight))
    assert (screened(x, weight) == 2399).all()


def test_exact_ties_take_the_first_index():
    weight = torch.zeros(50, 8)
    weight[[7, 20, 41]] = 1.0
    x = torch.ones(2, 8)
    assert screened(x, weight).tolist() == [7, 7]
    assert screened(torch.zeros(1, 8), weight).tolist() == [0]  # all logits zero


def test_non_finite_values_follow_torch_argmax():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(100, 16, generator=generator)
    x = torch.randn(3, 16, generator=generator)
    x[1, 4] = float("nan")  # every logit NaN: index 0
    x[2, 0] = float("inf")  # +-inf and possibly NaN logits
    assert torch.equal(screened(x, weight), reference(x, weight))
    bad_rows = weight.clone()
    bad_rows[30, 2] = float("nan")
    bad_rows[60, 5] = float("inf")
    clean = torch.randn(2, 16, generator=generator)
    assert torch.equal(screened(clean, bad_rows), reference(clean, bad_rows))


def test_codes_bound_the_logit_error():
    # The property the screen rests on: |A - L| <= bound * sum|x| for the int8 estimate A and the float32 logit L.
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(500, 96, generator=generator) * torch.rand(500, 1, generator=generator)
    weight[0] = 0.0
    codes, scales, bounds = ops().int8_row_codes(weight)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    x = torch.randn(8, 96, generator=generator)
    estimate = F.linear(x.double(), codes.double()) * scales.double()
    logits = ops().small_batch_linear(x, weight, None).double()
    limit = bounds.double() * x.double().abs().sum(-1, keepdim=True)
    assert ((estimate - logits).abs() <= limit).all()
    assert (bounds[1:] < 0.6 * scales[1:]).all()  # about half an int8 step: the screen stays selective


# Decoding runs without autograd, and only there does the model take the screened kernel.
@torch.no_grad()
def test_argmax_only_model_output_equals_logits_argmax():
    model = generation_model(dtype=torch.float32, vocab_size=40)
    prompt = torch.randint(0, 40, (3, 9))
    logits = model(prompt, inference_params=InferenceParams(3, 16))
    tokens = model(prompt, inference_params=InferenceParams(3, 16, argmax_only=True))  # 27 rows: logits + argmax
    assert tokens.shape == (3, 9) and torch.equal(tokens, logits.argmax(-1))
    params = InferenceParams(3, 16, last_logits_only=True, argmax_only=True)
    last = model(prompt, inference_params=params)
    assert torch.equal(last, logits[:, -1:].argmax(-1))
    assert params.derived_weights, "3 rows: the screened kernel should have run"


@torch.no_grad()
def test_padded_vocabulary_is_never_chosen():
    model = generation_model(dtype=torch.float32, vocab_size=40)
    model.output_weight()[30:] += 5.0  # the padding ids would win without the mask
    masked = VocabularyMask(model, 30)
    prompt = torch.randint(0, 30, (2, 5))
    params = InferenceParams(2, 8, last_logits_only=True, argmax_only=True)
    tokens = masked(prompt, inference_params=params)
    assert tokens.max() < 30 and params.derived_weights
    assert torch.equal(tokens, masked(prompt, inference_params=InferenceParams(2, 8))[:, -1:].argmax(-1))


def test_generation_paths_agree_in_float32():
    # argmax-only greedy decoding (the default for greedy requests) against the logits path, which a no-op logits
    # processor selects; prompts of different lengths exercise the teacher-forced steps too.
    model = generation_model(dtype=torch.float32, vocab_size=40, seed=5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    fast = generate(model, prompts, 10, 64)
    slow = generate(model, prompts, 10, 64, logits_processor=lambda logits, previous: None)
    assert fast.tokens == slow.tokens
    same_length = torch.tensor([[1, 2, 3], [7, 8, 9]])
    expected = [row[3:] for row in generate(model, same_length.tolist(), 6, 64).tokens]
    assert greedy_generate(model, same_length, 6).tolist() == expected
    draft = generation_model("M-", dtype=torch.float32, vocab_size=40, seed=6)  # argmax-only draft and target
    for k in (1, 3):
        assert speculative_generate(model, draft, prompts, 10, 64, k).tokens == slow.tokens


@torch.no_grad()
def test_codes_follow_weight_updates():
    # The int8 codes live in the InferenceParams; a weight changed in place mid-generation invalidates them.
    model = generation_model(dtype=torch.float32, vocab_size=40)
    params = InferenceParams(1, 8, last_logits_only=True, argmax_only=True)
    prompt = torch.tensor([[3, 4]])
    first = model(prompt, inference_params=params)
    params.advance(2)
    model.output_weight().neg_()  # the argmax becomes the former argmin
    second = model(first, inference_params=params)
    expected = model(torch.cat([prompt, first], dim=1), inference_params=InferenceParams(1, 8))[:, -1].argmax(-1)
    assert second.item() == expected.item()


@torch.no_grad()
def test_codes_are_built_once_per_generation():
    model = VocabularyMask(generation_model(dtype=torch.float32, vocab_size=40), 30)  # a row-limited argmax too
    params = InferenceParams(2, 8, last_logits_only=True, argmax_only=True)
    token = model(torch.tensor([[1, 2], [3, 4]]), inference_params=params)
    params.advance(2)
    (built,) = params.derived_weights.values()
    for _ in range(3):
        token = model(token, inference_params=params)
        params.advance(1)
    (reused,) = params.derived_weights.values()
    assert reused is built
