"""Tokenizers behind one interface, chosen by Megatron's ``--tokenizer-type`` names.

``build_tokenizer("GPTSentencePieceTokenizer", "tok.model")`` and friends return a :class:`MegatronTokenizer`;
``padded_vocab_size`` rounds its vocabulary up the way Megatron sizes the embedding table.
"""

from megatron.training.tokenizer.abstract import MegatronTokenizer
from megatron.training.tokenizer.build import TOKENIZER_TYPES, build_tokenizer, build_tokenizer_from_args
from megatron.training.tokenizer.vocab_padding import padded_vocab_size

__all__ = ["TOKENIZER_TYPES", "MegatronTokenizer", "build_tokenizer", "build_tokenizer_from_args", "padded_vocab_size"]
