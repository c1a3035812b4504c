"""``TikTokenizer``: a local tiktoken BPE file, with Megatron's layout of special tokens before the BPE ranks."""

import base64
import binascii
import json
from functools import cached_property
from pathlib import Path

from megatron.training.tokenizer.abstract import MegatronTokenizer
from megatron.training.tokenizer.model_path import require_model_path

# Megatron-LM's split regexes for --tiktoken-pattern v1 / v2 (they must match exactly, or the same text tokenizes
# differently than in data prepared by Megatron-LM), plus the cl100k / Llama-3 one.
PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "cl100k": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
DEFAULT_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
FILLER_TEMPLATE = "<SPECIAL_{id}>"
MEGATRON_MAX_VOCAB = 2**17  # Megatron's default total vocabulary when --vocab-size is not given


def load_ranks(path: Path) -> dict[bytes, int]:
    """Token bytes -> BPE rank from a ``.tiktoken`` file (lines ``base64(bytes) rank``) or a tekken-style JSON.

    The JSON form is a list (or ``{"vocab": [...]}``) of ``{"rank", "token_bytes"}`` objects, as Megatron-LM reads.
    """
    text = path.read_text(encoding="utf-8")
    pairs: list[tuple[bytes, int]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
            entries = data["vocab"] if isinstance(data, dict) else data
            pairs = [(base64.b64decode(entry["token_bytes"], validate=True), int(entry["rank"])) for entry in entries]
        except (ValueError, KeyError, TypeError, binascii.Error) as error:
            raise ValueError(f"TikTokenizer: {path} is not a tiktoken vocabulary JSON ({error})") from None
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 2:
                    raise ValueError("expected 'base64 rank'")
                pairs.append((base64.b64decode(fields[0], validate=True), int(fields[1])))
            except (ValueError, binascii.Error) as error:
                raise ValueError(f"TikTokenizer: {path} line {number}: not 'base64(token) rank' ({error})") from None
    ranks: dict[bytes, int] = {}
    for token, rank in pairs:
        if rank < 0:
            raise ValueError(f"TikTokenizer: {path}: negative rank {rank}")
        if token in ranks:
            raise ValueError(f"TikTokenizer: {path}: token {token!r} appears twice")
        ranks[token] = rank
    if len(set(ranks.values())) != len(ranks):
        raise ValueError(f"TikTokenizer: {path}: two tokens share a rank")
    return ranks


class TikTokenizer(MegatronTokenizer):
    """tiktoken BPE with ``num_special_tokens`` reserved ids first: specials are ids ``0..num_special_tokens-1``
    (the given ``special_tokens``, then ``<SPECIAL_i>`` fillers) and BPE rank ``r`` is id ``r + num_special_tokens``.

    bos is ``<s>``, eos and eod are ``</s>``. With ``vocab_size`` given (Megatron's ``--vocab-size``) only the first
    ``vocab_size - num_special_tokens`` ranks are kept and ``vocab_size`` is reported; without it, ranks beyond
    Megatron's default total of 2**17 are dropped and the size is the specials plus the ranks kept.
    Special tokens are never produced from text: ``"<s>"`` in the text is encoded as ordinary bytes.
    """

    def __init__(self, tokenizer_model: str | None, pattern: str = "v2", vocab_size: int | None = None,
                 num_special_tokens: int = 1000, special_tokens: list[str] | None = None) -> None:
        path = require_model_path("TikTokenizer", tokenizer_model, "a .tiktoken BPE file")
        if not path.is_file():
            raise ValueError(f"TikTokenizer: {path} is not a file (expected a .tiktoken BPE file)")
        if pattern not in PATTERNS:
            raise ValueError(f"TikTokenizer: unknown pattern {pattern!r}; choose from {', '.join(PATTERNS)}")
        specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        missing = [token for token in DEFAULT_SPECIAL_TOKENS if token not in specials]
        if missing:
            raise ValueError(f"TikTokenizer: special_tokens must include {', '.join(missing)}")
        if len(set(specials)) != len(specials):
            raise ValueError("TikTokenizer: special_tokens has duplicates")
        if num_special_tokens < len(specials):
            raise ValueError(f"TikTokenizer: num_special_tokens ({num_special_tokens}) is smaller than the "
                             f"{len(specials)} special tokens")
        specials += [FILLER_TEMPLATE.format(id=i) for i in range(len(specials), num_special_tokens)]
        if vocab_size is not None and vocab_size <= num_special_tokens:
            raise ValueError(f"TikTokenizer: --vocab-size ({vocab_size}) must exceed num_special_tokens "
                             f"({num_special_tokens})")

        ranks = load_ranks(path)
        max_ranks = (vocab_size if vocab_size is not None else MEGATRON_MAX_VOCAB) - num_special_tokens
        ranks = {token: rank for token, rank in ranks.items() if rank < max_ranks}
        # tiktoken can only encode text whose every byte is a token; check here instead of failing mid-corpus.
        absent = [byte for byte in range(256) if bytes([byte]) not in ranks]
        if absent:
            raise ValueError(f"TikTokenizer: {path} lacks {len(absent)} of the 256 single-byte tokens "
                             f"(first: {absent[0]}); a byte-level BPE file needs them all")

        import tiktoken

        self._encoding = tiktoken.Encoding(name=path.stem, pat_str=PATTERNS[pattern], mergeable_ranks=ranks,
                                           special_tokens={})
        self._ranks = ranks
        self._specials = specials
        self._num_special = num_special_tokens
        self._vocab_size = vocab_size if vocab_size is not None else num_special_tokens + max(ranks.values()) + 1

    @property
    def vocab_size(self) -> int:
        """Reserved special ids plus BPE ranks (or the ``vocab_size`` given)."""
        return self._vocab_size

    @property
    def num_special_tokens(self) -> int:
        """How many ids are reserved for special tokens before the BPE ranks."""
        return self._num_special

    def tokenize(self, text: str) -> list[int]:
        """The BPE ids of ``text`` (ranks shifted by ``num_special_tokens``)."""
        return [rank + self._num_special for rank in self._encoding.encode_ordinary(text)]

    def detokenize(self, ids: list[int]) -> str:
        """The text of ``ids``; special ids are dropped, as in Megatron, and broken UTF-8 is replaced."""
        ranks = [int(i) - self._num_special for i in ids if int(i) >= self._num_special]
        return self._encoding.decode(ranks, errors="replace")

    @property
    def bos(self) -> int:
        """The id of ``<s>``."""
        return self._specials.index("<s>")

    @property
    def eos(self) -> int:
        """The id of ``</s>``."""
        return self._specials.index("</s>")

    @property
    def eod(self) -> int:
        """The end-of-document id: eos."""
        return self.eos

    @property
    def pad(self) -> int | None:
        """The id of ``<pad>`` when it is one of the special tokens, else None."""
        return self._specials.index("<pad>") if "<pad>" in self._specials else None

    @cached_property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> token: special names, then BPE tokens as UTF-8 (invalid bytes backslash-escaped)."""
        inv = dict(enumerate(self._specials))
        for token, rank in self._ranks.items():
            inv[rank + self._num_special] = token.decode("utf-8", errors="backslashreplace")
        return inv

    @cached_property
    def vocab(self) -> dict[str, int]:
        """Token -> id, the inverse of ``inv_vocab`` (where two byte tokens print alike, the lower id wins)."""
        vocab: dict[str, int] = {}
        for token_id in sorted(self.inv_vocab):
            vocab.setdefault(self.inv_vocab[token_id], token_id)
        return vocab
