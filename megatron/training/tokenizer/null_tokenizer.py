"""``NullTokenizer``: the text already is the ids, for tests and synthetic data."""

from megatron.training.tokenizer.abstract import MegatronTokenizer


class NullTokenizer(MegatronTokenizer):
    """Reads whitespace-separated integer ids; the end-of-document id is ``vocab_size`` itself.

    As in Megatron, the reported ``vocab_size`` is the given one plus one, to make room for that eod id.
    """

    def __init__(self, vocab_size: int | None) -> None:
        if vocab_size is None:
            raise ValueError("NullTokenizer needs --vocab-size")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"NullTokenizer: --vocab-size must be a positive integer, got {vocab_size!r}")
        self._eod = vocab_size

    @property
    def vocab_size(self) -> int:
        """The given vocabulary size plus the eod id."""
        return self._eod + 1

    def tokenize(self, text: str) -> list[int]:
        """The integers in ``text``; each must lie in ``[0, vocab_size]`` (the last one being eod)."""
        ids = []
        for word in text.split():
            try:
                value = int(word)
            except ValueError:
                raise ValueError(f"NullTokenizer: {word[:40]!r} is not an integer token id") from None
            if not 0 <= value <= self._eod:
                raise ValueError(f"NullTokenizer: token id {value} is outside [0, {self._eod}] (--vocab-size "
                                 f"{self._eod} plus eod)")
            ids.append(value)
        return ids

    def detokenize(self, ids: list[int]) -> str:
        """The ids written as space-separated integers."""
        return " ".join(str(int(i)) for i in ids)

    @property
    def eod(self) -> int:
        """The end-of-document id: the given vocabulary size."""
        return self._eod

    @property
    def vocab(self) -> dict[str, int]:
        """Each id's decimal string -> the id."""
        return {str(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Each id -> its decimal string."""
        return {i: str(i) for i in range(self.vocab_size)}
