"""The interface every tokenizer implements."""

import abc


class MegatronTokenizer(abc.ABC):
    """A text <-> token-id mapping with the special ids the data pipeline and the model need.

    ``vocab_size`` is the tokenizer's own size (every id it can produce is below it); the model pads it with
    :func:`megatron.training.tokenizer.padded_vocab_size`.
    """

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (unpadded)."""

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """The ids of ``text``, with no special tokens added."""

    @abc.abstractmethod
    def detokenize(self, ids: list[int]) -> str:
        """The text of ``ids``."""

    @property
    @abc.abstractmethod
    def eod(self) -> int:
        """The end-of-document id that ``--append-eod`` appends."""

    @property
    def bos(self) -> int | None:
        """The beginning-of-sequence id, or None when the tokenizer has none."""
        return None

    @property
    def eos(self) -> int | None:
        """The end-of-sequence id, or None when the tokenizer has none."""
        return None

    @property
    def pad(self) -> int | None:
        """The padding id, or None when the tokenizer has none."""
        return None

    @property
    @abc.abstractmethod
    def vocab(self) -> dict[str, int]:
        """Token string -> id."""

    @property
    @abc.abstractmethod
    def inv_vocab(self) -> dict[int, str]:
        """Id -> token string."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"
