"""``build_tokenizer``: Megatron's ``--tokenizer-type`` name -> a tokenizer."""

from collections.abc import Callable
from typing import Any

from megatron.training.tokenizer.abstract import MegatronTokenizer
from megatron.training.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer
from megatron.training.tokenizer.null_tokenizer import NullTokenizer
from megatron.training.tokenizer.sentencepiece_tokenizer import GPTSentencePieceTokenizer
from megatron.training.tokenizer.tiktoken_tokenizer import TikTokenizer


def _sentencepiece(model: str | None, vocab_size: int | None, **kwargs: Any) -> MegatronTokenizer:
    return GPTSentencePieceTokenizer(model, **kwargs)


def _huggingface(model: str | None, vocab_size: int | None, **kwargs: Any) -> MegatronTokenizer:
    return HuggingFaceTokenizer(model, **kwargs)


def _tiktoken(model: str | None, vocab_size: int | None, **kwargs: Any) -> MegatronTokenizer:
    # Accept Megatron's argument names (args.tiktoken_pattern, ...) as well as the short ones.
    for name in ("pattern", "num_special_tokens", "special_tokens"):
        if f"tiktoken_{name}" in kwargs:
            value = kwargs.pop(f"tiktoken_{name}")
            if value is not None:
                kwargs[name] = value
    return TikTokenizer(model, vocab_size=vocab_size, **kwargs)


def _null(model: str | None, vocab_size: int | None, **kwargs: Any) -> MegatronTokenizer:
    return NullTokenizer(vocab_size, **kwargs)


TOKENIZER_TYPES: dict[str, Callable[..., MegatronTokenizer]] = {
    "GPTSentencePieceTokenizer": _sentencepiece,
    "HuggingFaceTokenizer": _huggingface,
    "TikTokenizer": _tiktoken,
    "NullTokenizer": _null,
}


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None,
                    **kwargs: Any) -> MegatronTokenizer:
    """The tokenizer of type ``tokenizer_type`` (``--tokenizer-type``) read from ``tokenizer_model``.

    ``vocab_size`` (``--vocab-size``) is required by ``NullTokenizer``, optional for ``TikTokenizer`` and ignored
    by the others. ``kwargs`` go to the tokenizer: ``pattern`` / ``num_special_tokens`` / ``special_tokens`` for
    ``TikTokenizer``, ``bos_token`` / ``eos_token`` / ``pad_token`` overrides for ``HuggingFaceTokenizer``.
    Raises ValueError for an unknown type, a missing required flag or an unreadable model, and FileNotFoundError
    for a model path that does not exist.
    """
    factory = TOKENIZER_TYPES.get(tokenizer_type)
    if factory is None:
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; choose from {', '.join(TOKENIZER_TYPES)}")
    try:
        return factory(None if tokenizer_model is None else str(tokenizer_model), vocab_size, **kwargs)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise
        raise ValueError(f"{tokenizer_type}: unsupported option ({error})") from None


TIKTOKEN_ARGS = ("tiktoken_pattern", "tiktoken_num_special_tokens", "tiktoken_special_tokens")


def build_tokenizer_from_args(args: Any) -> MegatronTokenizer:
    """:func:`build_tokenizer` from parsed flags: ``--tokenizer-type``, ``--tokenizer-model``, ``--vocab-size`` and,
    for ``TikTokenizer``, the ``--tiktoken-*`` options that were given."""
    options = {}
    if args.tokenizer_type == "TikTokenizer":
        options = {name: getattr(args, name) for name in TIKTOKEN_ARGS if getattr(args, name, None) is not None}
    return build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size, **options)
