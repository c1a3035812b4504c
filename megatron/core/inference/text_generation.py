"""Text in, text out: tokenization, stop conditions that depend on text, and Megatron's response fields.

:class:`TextGenerator` wraps a model and a tokenizer (anything with ``tokenize``, ``detokenize``, ``eod``, ``bos``
and ``vocab_size``) and answers the requests of the REST server: ``text`` (prompt + generation), ``segments`` (the
text of each token), ``tokens``, ``logprobs``, plus what OpenAI-style clients need (completion text, finish reason,
token counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from megatron.core.inference.generation import GenerationOutput, generate
from megatron.core.inference.sampling import SamplingParams
from megatron.core.inference.speculative import speculative_generate


@dataclass
class TextRequest:
    """One batch of prompts and how to continue them (the fields of Megatron's ``PUT /api``, plus ``stop``)."""

    prompts: list[str]
    tokens_to_generate: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_log_probs: bool = False
    add_BOS: bool = False
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    prevent_newline_after_colon: bool = False
    stop_on_eod: bool = True
    random_seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class TextResult:
    """Per prompt: full text, the generated text alone (cut before a stop string), token texts, tokens, log-probs
    of every token after the first, why generation ended, and the prompt's token count."""

    text: list[str]
    completions: list[str]
    segments: list[list[str]]
    tokens: list[list[int]]
    logprobs: list[list[float]] | None
    finish_reasons: list[str]
    prompt_tokens: list[int]


class TextGenerator:
    """Generates text with ``model`` (a whole model on this process, or its tensor-parallel share: every rank of the
    group must make the same calls). With a ``draft_model`` (same tokenizer, usually much smaller) generation is
    speculative: the draft proposes ``num_speculative_tokens`` tokens, the model verifies them in one forward."""

    def __init__(self, model: nn.Module, tokenizer: object, max_sequence_length: int,
                 draft_model: nn.Module | None = None, num_speculative_tokens: int = 4) -> None:
        if draft_model is not None and num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.draft_model = draft_model
        self.num_speculative_tokens = num_speculative_tokens
        self._newline_ids: torch.Tensor | None = None

    def tokenize(self, prompts: list[str], add_bos: bool) -> list[list[int]]:
        """Token ids of each prompt, with the BOS token first when asked (``ValueError`` if the tokenizer has
        none)."""
        bos = getattr(self.tokenizer, "bos", None)
        if add_bos and bos is None:
            raise ValueError("add_BOS: the tokenizer has no BOS token")
        return [([bos] if add_bos else []) + list(self.tokenizer.tokenize(prompt)) for prompt in prompts]

    def generate(self, request: TextRequest) -> TextResult:
        """Run ``request``; ``ValueError`` for a prompt that is empty or too long for the model."""
        prompts = self.tokenize(request.prompts, request.add_BOS)
        generator = None
        if request.random_seed is not None:
            generator = torch.Generator().manual_seed(request.random_seed)
        options = dict(
            eod=self.tokenizer.eod if request.stop_on_eod else None, stop=self._stop_test(request),
            logits_processor=self._no_newline_after_colon if request.prevent_newline_after_colon else None,
            return_log_probs=request.return_log_probs,
        )
        if self.draft_model is None:
            output = generate(self.model, prompts, request.tokens_to_generate, self.max_sequence_length,
                              request.sampling, generator, **options)
        else:
            output = speculative_generate(self.model, self.draft_model, prompts, request.tokens_to_generate,
                                          self.max_sequence_length, self.num_speculative_tokens, request.sampling,
                                          generator, **options)
        return self._result(output, request)

    def _stop_test(self, request: TextRequest) -> object:
        if not (request.stop_on_eol or request.stop_on_double_eol or request.stop):
            return None

        # A token that completes a stop string holds at least one of its characters, and the tokens before it at
        # least one each (text-less special tokens aside), so the last len(longest stop) + 1 tokens contain it.
        window = max([len(stop_string) for stop_string in request.stop] + [2]) + 1

        def stop(index: int, generated: list[int]) -> bool:
            if request.stop_on_eol and "\n" in self.tokenizer.detokenize(generated[-1:]):
                return True
            tail = self.tokenizer.detokenize(generated[-window:])
            if request.stop_on_double_eol and "\n\n" in tail:
                return True
            return any(stop_string in tail for stop_string in request.stop)

        return stop

    def _no_newline_after_colon(self, logits: torch.Tensor, last_tokens: list[int]) -> None:
        """Forbid every token containing a newline right after a token that ends with a colon."""
        after_colon = [i for i, token in enumerate(last_tokens) if self.tokenizer.detokenize([token]).endswith(":")]
        if after_colon:
            logits[torch.tensor(after_colon).unsqueeze(-1), self.newline_ids().to(logits.device)] = float("-inf")

    def newline_ids(self) -> torch.Tensor:
        """Ids of the tokens whose text contains a newline (computed once)."""
        if self._newline_ids is None:
            ids = [i for i in range(self.tokenizer.vocab_size) if "\n" in self.tokenizer.detokenize([i])]
            self._newline_ids = torch.tensor(ids, dtype=torch.long)
        return self._newline_ids

    def _result(self, output: GenerationOutput, request: TextRequest) -> TextResult:
        detokenize = self.tokenizer.detokenize
        texts, completions, segments = [], [], []
        for index, tokens in enumerate(output.tokens):
            prompt_length = output.prompt_lengths[index]
            # Detokenizing the whole sequence keeps the spacing a tokenizer attaches to a token's neighbours.
            full, prompt_text = detokenize(tokens), detokenize(tokens[:prompt_length])
            completion = full[len(prompt_text):] if full.startswith(prompt_text) else detokenize(tokens[prompt_length:])
            if output.finish_reasons[index] == "stop" and request.stop:
                cut = min((completion.find(s) for s in request.stop if s in completion), default=-1)
                completion = completion[:cut] if cut >= 0 else completion
            texts.append(prompt_text + completion)
            completions.append(completion)
            segments.append([detokenize([token]) for token in tokens])
        return TextResult(texts, completions, segments, output.tokens, output.log_probs, output.finish_reasons,
                          output.prompt_lengths)
