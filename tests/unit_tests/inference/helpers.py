"""A character-level tokenizer and tiny models for the generation tests."""

from __future__ import annotations

import torch

from ..models.helpers import randomize_, tiny_model

ALPHABET = "\n :abcdefghijklmnopqrstuvwxyz.,"


class CharTokenizer:
    """One token per character of :data:`ALPHABET`; then BOS and EOD. Small enough that every token's text is
    known, which makes the text stop conditions testable."""

    def __init__(self) -> None:
        self.vocab_size = len(ALPHABET) + 2
        self.bos = len(ALPHABET)
        self.eod = len(ALPHABET) + 1

    def tokenize(self, text: str) -> list[int]:
        return [ALPHABET.index(char) for char in text]

    def detokenize(self, ids: list[int]) -> str:
        return "".join(ALPHABET[i] if i < len(ALPHABET) else "" for i in ids)


def generation_model(pattern: str = "M*-M", vocab_size: int = 33, dtype: torch.dtype = torch.float64,
                     seed: int = 0) -> torch.nn.Module:
    """A randomised tiny hybrid in evaluation mode (float64 by default, so argmax never hinges on rounding)."""
    torch.manual_seed(seed)
    model = randomize_(tiny_model(pattern, vocab_size=vocab_size, max_sequence_length=128))
    return model.to(dtype).eval()
