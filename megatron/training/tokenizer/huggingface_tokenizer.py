"""``HuggingFaceTokenizer``: a local ``tokenizer.json`` file or a local Hugging Face tokenizer folder.

A ``tokenizer.json`` is read with the ``tokenizers`` library; its bos/eos/pad tokens come from the folder's
``tokenizer_config.json`` / ``special_tokens_map.json``. A folder without ``tokenizer.json`` (slow tokenizers only)
goes through ``transformers.AutoTokenizer`` with ``local_files_only=True``. Nothing is ever fetched from a hub.
"""

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from megatron.training.tokenizer.abstract import MegatronTokenizer
from megatron.training.tokenizer.model_path import first_line, require_model_path

_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_ROLES = ("bos", "eos", "pad")
# Used only for a bare tokenizer.json with no config beside it: the usual names of each role's special token.
_WELL_KNOWN = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"),
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
}


def _token_content(value: Any) -> str | None:
    """A special-token entry of a Hugging Face config: a string, or a dict with its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _configured_tokens(folder: Path) -> dict[str, str] | None:
    """Role -> token string from the folder's config files (earlier files win); None when there are none."""
    found: dict[str, str] | None = None
    for name in _CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"HuggingFaceTokenizer: cannot read {path}: {first_line(error)}") from None
        found = {} if found is None else found
        if isinstance(config, dict):
            for role in _ROLES:
                token = _token_content(config.get(f"{role}_token"))
                if token is not None:
                    found.setdefault(role, token)
    return found


class HuggingFaceTokenizer(MegatronTokenizer):
    """A Hugging Face tokenizer used without adding special tokens; eod is its eos id (bos when it has no eos).

    ``bos_token`` / ``eos_token`` / ``pad_token`` override the tokens the config files name.
    """

    def __init__(self, tokenizer_model: str | None, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None) -> None:
        path = require_model_path("HuggingFaceTokenizer", tokenizer_model, "a tokenizer.json file or a folder")
        overrides = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
        self._fast: Any = None  # a tokenizers.Tokenizer
        self._auto: Any = None  # a transformers tokenizer, for folders without tokenizer.json
        if path.is_dir() and not (path / "tokenizer.json").is_file():
            self._load_auto(path)
            self._ids = {role: getattr(self._auto, f"{role}_token_id", None) for role in _ROLES}
            for role, token in overrides.items():
                if token is not None:
                    self._ids[role] = self._id_of(token, f"{role}_token")
            return
        file = path / "tokenizer.json" if path.is_dir() else path
        self._load_fast(file)
        configured = _configured_tokens(file.parent) if path.is_dir() or file.name == "tokenizer.json" else None
        tokens = dict(configured or {})
        if configured is None:
            tokens = self._guess_special_tokens()
        tokens.update({role: token for role, token in overrides.items() if token is not None})
        self._ids = {role: self._id_of(tokens[role], f"{role}_token") if role in tokens else None for role in _ROLES}

    def _load_fast(self, file: Path) -> None:
        from tokenizers import Tokenizer

        try:
            self._fast = Tokenizer.from_file(str(file))
        except Exception as error:  # the library raises a bare Exception for malformed files
            raise ValueError(f"HuggingFaceTokenizer: cannot load {file}: {first_line(error)}") from None

    def _load_auto(self, folder: Path) -> None:
        if not any((folder / name).is_file() for name in ("tokenizer_config.json", "config.json")):
            raise ValueError(f"HuggingFaceTokenizer: {folder} holds no tokenizer.json, tokenizer_config.json or "
                             "config.json")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(f"HuggingFaceTokenizer: {folder} holds no tokenizer.json; loading other tokenizer files "
                             "needs the 'transformers' package") from None
        try:
            self._auto = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as error:  # transformers raises many kinds of errors for unusable folders
            raise ValueError(f"HuggingFaceTokenizer: cannot load a tokenizer from {folder}: "
                             f"{first_line(error)}") from None

    def _guess_special_tokens(self) -> dict[str, str]:
        """Role -> token for a bare tokenizer.json: the first special added token with a well-known name."""
        specials = {added.content for added in self._fast.get_added_tokens_decoder().values() if added.special}
        tokens = {}
        for role, names in _WELL_KNOWN.items():
            match = next((name for name in names if name in specials), None)
            if match is not None:
                tokens[role] = match
        return tokens

    def _id_of(self, token: str, what: str) -> int:
        token_id = self.vocab.get(token)
        if token_id is None:
            raise ValueError(f"HuggingFaceTokenizer: {what} {token!r} is not in the vocabulary")
        return token_id

    @cached_property
    def vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included."""
        if self._fast is not None:
            return self._fast.get_vocab(with_added_tokens=True)
        return dict(self._auto.get_vocab())

    @cached_property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> token, added tokens included."""
        return {token_id: token for token, token_id in self.vocab.items()}

    @cached_property
    def vocab_size(self) -> int:
        """One more than the largest id, added tokens included."""
        return max(len(self.vocab), max(self.vocab.values(), default=-1) + 1)

    def tokenize(self, text: str) -> list[int]:
        """The ids of ``text``, with no bos/eos or other template tokens added."""
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return list(self._auto.encode(text, add_special_tokens=False))

    def detokenize(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens kept."""
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        return self._auto.decode(ids, skip_special_tokens=False)

    @property
    def bos(self) -> int | None:
        """The bos token's id, or None."""
        return self._ids["bos"]

    @property
    def eos(self) -> int | None:
        """The eos token's id, or None."""
        return self._ids["eos"]

    @property
    def pad(self) -> int | None:
        """The pad token's id, or None."""
        return self._ids["pad"]

    @property
    def eod(self) -> int:
        """The eos id, else the bos id; an error when the tokenizer names neither."""
        eod = self.eos if self.eos is not None else self.bos
        if eod is None:
            raise ValueError("HuggingFaceTokenizer: the tokenizer names no eos or bos token to end documents; set "
                             "eos_token in tokenizer_config.json")
        return eod
