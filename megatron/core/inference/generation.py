"""Batched incremental generation from token ids: prefill, then one token per step from the cached states.

Prompts of different lengths share one batch the way Megatron does it: the shortest prompt length is prefilled in one
forward, then every sequence advances one position per step; a sequence still inside its prompt is fed its next
prompt token (teacher forcing), the others their sampled token. Every sequence therefore sits at the same position,
which is what the Mamba conv/SSM states and the KV caches need. Each sequence generates at most its own budget and
stops early on end-of-document or on the caller's stop test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import parallel_state
from megatron.core.inference.sampling import GREEDY, SamplingParams, sample
from megatron.core.inference_params import InferenceParams

# (sequence index, tokens generated so far for it) -> whether it must stop now.
StopTest = Callable[[int, list[int]], bool]
# Edits next-token logits (b, vocab) in place, given each sequence's latest token.
LogitsProcessor = Callable[[torch.Tensor, list[int]], None]


@dataclass
class GenerationOutput:
    """Per sequence: all tokens (prompt then generation), the prompt length, why it ended (``"length"``, ``"eod"``
    or ``"stop"``) and, when asked, ``log_probs[i][j]`` = log p(tokens[i][j + 1] | tokens[i][: j + 1]) under the
    model (untempered), prompt tokens included. Speculative decoding also reports how many draft proposals the
    target accepted."""

    tokens: list[list[int]]
    prompt_lengths: list[int]
    finish_reasons: list[str]
    log_probs: list[list[float]] | None = None
    acceptance: tuple[int, int] | None = None  # speculative decoding: (proposals accepted, proposals made)

    def generated(self, index: int) -> list[int]:
        """The tokens sequence ``index`` generated."""
        return self.tokens[index][self.prompt_lengths[index]:]


def broadcast_from_tensor_rank_0(tensor: torch.Tensor) -> torch.Tensor:
    """Make every tensor-parallel rank use tensor-parallel rank 0's values (the ranks must agree on every token even
    if their sampling could differ in the last bit)."""
    group = parallel_state.get_tensor_model_parallel_group()
    if group is not None and parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
    return tensor


@dataclass
class PromptBatch:
    """Prompts laid out for generation: ``tokens`` ``(b, total)`` holds each prompt at the start of its row (the
    rest is filled with ``eod``, or 0), ``total`` is the longest prompt + budget."""

    tokens: torch.Tensor
    lengths: list[int]
    budgets: list[int]
    total: int


def prepare_prompts(prompts: list[list[int]], tokens_to_generate: int | list[int], max_sequence_length: int,
                    eod: int | None, device: torch.device) -> PromptBatch:
    """Check the prompts and their budgets (one for all, or one per prompt) and lay them out; ``ValueError`` for an
    empty prompt or one that would exceed ``max_sequence_length``."""
    budgets = [tokens_to_generate] * len(prompts) if isinstance(tokens_to_generate, int) else list(tokens_to_generate)
    lengths = [len(prompt) for prompt in prompts]
    check_lengths(lengths, budgets, max_sequence_length)
    total = max(length + budget for length, budget in zip(lengths, budgets, strict=True))
    tokens = torch.full((len(prompts), total), eod if eod is not None else 0, dtype=torch.long, device=device)
    for index, prompt in enumerate(prompts):
        tokens[index, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    return PromptBatch(tokens, lengths, budgets, total)


def check_lengths(prompt_lengths: list[int], budgets: list[int], max_sequence_length: int) -> None:
    """``ValueError`` when a prompt is empty or a prompt plus its budget exceeds the model's limit."""
    for index, (length, budget) in enumerate(zip(prompt_lengths, budgets, strict=True)):
        if length == 0:
            raise ValueError(f"prompt {index} is empty (add_BOS, or give it at least one token)")
        if length + budget > max_sequence_length:
            raise ValueError(f"prompt {index} has {length} tokens; with {budget} tokens to generate that exceeds the "
                             f"model's maximum sequence length {max_sequence_length}")


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    tokens_to_generate: int | list[int],
    max_sequence_length: int,
    sampling: SamplingParams = GREEDY,
    generator: torch.Generator | None = None,
    eod: int | None = None,
    stop: StopTest | None = None,
    logits_processor: LogitsProcessor | None = None,
    return_log_probs: bool = False,
) -> GenerationOutput:
    """Continue each prompt (token ids) by up to ``tokens_to_generate`` tokens (one budget, or one per prompt).

    Generation of a sequence ends at its budget, after it emits ``eod`` (kept in its tokens), or when ``stop`` says
    so. ``generator`` seeds sampling. Raises ``ValueError`` for an empty prompt or one that would exceed
    ``max_sequence_length``.
    """
    device = next(model.parameters()).device
    laid_out = prepare_prompts(prompts, tokens_to_generate, max_sequence_length, eod, device)
    tokens, lengths, total, batch = laid_out.tokens, laid_out.lengths, laid_out.total, len(prompts)
    state = _Progress(lengths, laid_out.budgets, eod, stop)
    log_probs = torch.zeros(batch, total, dtype=torch.float32, device=device) if return_log_probs else None

    # Plain greedy decoding needs no logits, only their argmax, which the model finds without most of the output
    # layer's weight traffic.
    argmax_only = sampling.greedy and logits_processor is None and not return_log_probs
    inference_params = InferenceParams(batch, total, last_logits_only=not return_log_probs, argmax_only=argmax_only)
    start = min(lengths)
    logits = model(tokens[:, :start], inference_params=inference_params)  # (b, s) token ids when argmax_only
    inference_params.advance(start)
    if log_probs is not None and start > 1:
        log_probs[:, 1:start] = _token_log_probs(logits[:, :-1], tokens[:, 1:start])
    position = start
    while position < total and not state.all_done():
        if argmax_only:
            chosen = logits[:, -1]
        else:
            next_logits = logits[:, -1].float()
            if logits_processor is not None:
                logits_processor(next_logits, tokens[:, position - 1].tolist())
            chosen = sample(next_logits, sampling, generator)
        chosen = broadcast_from_tensor_rank_0(chosen)
        in_prompt = torch.tensor([position < length for length in lengths], device=device)
        tokens[:, position] = torch.where(in_prompt, tokens[:, position], chosen)
        if log_probs is not None:
            log_probs[:, position] = _token_log_probs(logits[:, -1:], tokens[:, position : position + 1])[:, 0]
        state.record(position, tokens[:, position].tolist())
        position += 1
        if position < total and not state.all_done():
            logits = model(tokens[:, position - 1 : position], inference_params=inference_params)
            inference_params.advance(1)
    return state.output(tokens.tolist(), log_probs)


def _token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under logits ``(b, n, vocab)`` for targets ``(b, n)``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class _Progress:
    """Which sequences are still generating, and why each one stopped."""

    def __init__(self, lengths: list[int], budgets: list[int], eod: int | None, stop: StopTest | None) -> None:
        self.lengths, self.budgets, self.eod, self.stop = lengths, budgets, eod, stop
        self.generated: list[list[int]] = [[] for _ in lengths]
        self.reasons: list[str | None] = ["length" if budget == 0 else None for budget in budgets]

    def all_done(self) -> bool:
        return all(reason is not None for reason in self.reasons)

    def record(self, position: int, column: list[int]) -> None:
        """Take the tokens placed at ``position``; sequences past their prompt count them as generated."""
        for index, token in enumerate(column):
            if self.reasons[index] is not None or position < self.lengths[index]:
                continue
            self.generated[index].append(token)
            if self.eod is not None and token == self.eod:
                self.reasons[index] = "eod"
            elif self.stop is not None and self.stop(index, self.generated[index]):
                self.reasons[index] = "stop"
            elif len(self.generated[index]) >= self.budgets[index]:
                self.reasons[index] = "length"

    def output(self, rows: list[list[int]], log_probs: torch.Tensor | None) -> GenerationOutput:
        ends = [length + len(generated) for length, generated in zip(self.lengths, self.generated, strict=True)]
        tokens = [row[:end] for row, end in zip(rows, ends, strict=True)]
        logs = None
        if log_probs is not None:
            logs = [row[1:end] for row, end in zip(log_probs.tolist(), ends, strict=True)]
        return GenerationOutput(tokens, list(self.lengths), [reason or "length" for reason in self.reasons], logs)


@torch.inference_mode()
def greedy_generate(model: nn.Module, prompt: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Append ``num_tokens`` argmax tokens to each prompt of ``prompt`` ``(b, p)`` (no early stop); returns
    ``(b, num_tokens)``. The fast path for equal-length prompts, used by the benchmarks."""
    batch, length = prompt.shape
    if num_tokens == 0:
        return prompt.new_zeros(batch, 0)
    inference_params = InferenceParams(batch, length + num_tokens, last_logits_only=True, argmax_only=True)
    token = model(prompt, inference_params=inference_params)  # (b, 1): the argmax after the prompt
    inference_params.advance(length)
    generated = [token]
    for _ in range(num_tokens - 1):
        token = model(token, inference_params=inference_params)
        inference_params.advance(1)
        generated.append(token)
    return torch.cat(generated, dim=1)
