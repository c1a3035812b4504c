"""``GPTSentencePieceTokenizer``: a SentencePiece ``.model`` file."""

from functools import cached_property

from megatron.training.tokenizer.abstract import MegatronTokenizer
from megatron.training.tokenizer.model_path import first_line, require_model_path


class GPTSentencePieceTokenizer(MegatronTokenizer):
    """SentencePiece encoding without added bos/eos; eod is the model's eos id (its bos id when it has no eos)."""

    def __init__(self, tokenizer_model: str | None) -> None:
        path = require_model_path("GPTSentencePieceTokenizer", tokenizer_model, "a SentencePiece .model file")
        import sentencepiece

        if not path.is_file():
            raise ValueError(f"GPTSentencePieceTokenizer: {path} is not a file (expected a SentencePiece .model file)")
        self._model = sentencepiece.SentencePieceProcessor()
        try:
            self._model.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"GPTSentencePieceTokenizer: cannot load {path}: {first_line(error)}") from None

    @staticmethod
    def _optional(token_id: int) -> int | None:
        # SentencePiece marks a disabled special token with id -1.
        return None if token_id < 0 else token_id

    @property
    def vocab_size(self) -> int:
        """The number of pieces in the model."""
        return self._model.get_piece_size()

    def tokenize(self, text: str) -> list[int]:
        """The piece ids of ``text``."""
        return self._model.encode(text, out_type=int)

    def detokenize(self, ids: list[int]) -> str:
        """The text of the piece ids ``ids``."""
        return self._model.decode([int(i) for i in ids])

    @property
    def bos(self) -> int | None:
        """The model's bos id, or None when disabled."""
        return self._optional(self._model.bos_id())

    @property
    def eos(self) -> int | None:
        """The model's eos id, or None when disabled."""
        return self._optional(self._model.eos_id())

    @property
    def pad(self) -> int | None:
        """The model's pad id, or None when disabled."""
        return self._optional(self._model.pad_id())

    @property
    def eod(self) -> int:
        """The eos id, else the bos id; an error when the model has neither."""
        eod = self.eos if self.eos is not None else self.bos
        if eod is None:
            raise ValueError("GPTSentencePieceTokenizer: the model has neither an eos nor a bos piece to end documents")
        return eod

    @cached_property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> piece."""
        return {i: self._model.id_to_piece(i) for i in range(self.vocab_size)}

    @cached_property
    def vocab(self) -> dict[str, int]:
        """Piece -> id."""
        return {piece: i for i, piece in self.inv_vocab.items()}
