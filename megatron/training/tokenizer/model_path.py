"""Checks on the ``--tokenizer-model`` path shared by the file-based tokenizers."""

from pathlib import Path


def require_model_path(tokenizer_type: str, tokenizer_model: str | None, what: str) -> Path:
    """The existing path ``tokenizer_model``; a clear error when it is not given or does not exist.

    ``what`` describes the expected file for the messages, e.g. "a SentencePiece .model file".
    """
    if tokenizer_model is None or str(tokenizer_model) == "":
        raise ValueError(f"{tokenizer_type} needs --tokenizer-model ({what})")
    path = Path(tokenizer_model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{tokenizer_type}: tokenizer model not found: {path}")
    return path


def first_line(error: BaseException) -> str:
    """The first line of an error's message, so that wrapped library errors stay one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
