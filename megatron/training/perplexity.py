"""Sliding-window perplexity of a causal language model on local text (``tools/evaluate_perplexity.py``).

* :func:`plan_windows` / :func:`sliding_window_nll` / :func:`documents_nll`: Hugging Face style strided evaluation.
  Windows of at most ``window`` input tokens start every ``stride`` tokens; each window scores only the predictions
  that the previous window did not score, with the rest of the window as their context. A window's ``window`` input
  tokens predict the ``window`` tokens that follow each of them, so every token but a sequence's first is scored
  exactly once, for any ``1 <= stride <= window`` (``stride == window`` gives disjoint windows), and a window at least
  as long as the sequence gives exactly one full forward's mean NLL.
* :func:`read_documents` / :func:`tokenize_documents` / :func:`prepare_sequences`: a ``.txt`` file (one document,
  or one per line with ``split_lines``) or a ``.jsonl`` file (one document per line under ``json_key``), tokenized
  and either joined into one stream with the end-of-document token between documents or kept apart, optionally
  capped to its first tokens.
* :func:`perplexity_result` / :func:`summary_line`: the JSON-ready result and a one-line summary.

Problems with the input raise :class:`PerplexityInputError` (a ``ValueError``) with a one-line message.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMATS", "PerplexityInputError", "Window", "cap_tokens", "check_window", "documents_nll", "input_format",
    "join_documents", "perplexity_result", "plan_windows", "prepare_sequences", "read_documents", "scorable_tokens",
    "sliding_window_nll", "summary_line", "tokenize_documents",
]

# (batch, sequence) int64 token ids -> (batch, sequence, vocabulary) logits of a causal model.
ModelFn = Callable[[torch.Tensor], torch.Tensor]
FORMATS = ("auto", "txt", "jsonl")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


class PerplexityInputError(ValueError):
    """Unusable input text or evaluation settings (one-line message)."""


@dataclass(frozen=True)
class Window:
    """One forward pass: input tokens ``[begin, end)`` of sequence ``sequence``; the predictions made at input
    positions ``[score_from, end)`` (of tokens ``score_from + 1 .. end``) are scored."""

    sequence: int
    begin: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        """Input tokens of the window."""
        return self.end - self.begin

    @property
    def scored(self) -> int:
        """Tokens the window scores."""
        return self.end - self.score_from


def check_window(window: int, stride: int) -> None:
    """``PerplexityInputError`` unless ``1 <= stride <= window``."""
    if window < 1:
        raise PerplexityInputError(f"--window must be >= 1, got {window}")
    if stride < 1:
        raise PerplexityInputError(f"--stride must be >= 1, got {stride}")
    if stride > window:
        raise PerplexityInputError(f"--stride {stride} is larger than --window {window}: tokens between windows "
                                   "would never be scored")


def plan_windows(length: int, window: int, stride: int, sequence: int = 0) -> list[Window]:
    """The windows of a sequence of ``length`` tokens: starts ``0, stride, 2 * stride, ...``, each at most
    ``window`` inputs long, until the last prediction (of token ``length - 1``) is made. The scored ranges
    ``[score_from, end)`` partition ``[0, length - 1)``: each token but the first is scored exactly once, with at
    least ``window - stride`` tokens of context once the first window is past."""
    check_window(window, stride)
    predictions = length - 1  # the last token is only ever a target
    windows: list[Window] = []
    scored_until = 0
    for begin in range(0, max(predictions, 0), stride):
        end = min(begin + window, predictions)
        windows.append(Window(sequence, begin, end, scored_until))
        scored_until = end
        if end == predictions:
            break
    return windows


def _as_list(tokens: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        return [int(t) for t in tokens.reshape(-1).tolist()]
    return [int(t) for t in tokens]


def documents_nll(model_fn: ModelFn, sequences: Sequence[Sequence[int] | torch.Tensor], window: int, stride: int, *,
                  batch_size: int = 1, device: torch.device | str | None = None, progress: bool | None = False,
                  pad_id: int = 0) -> tuple[float, int]:
    """(summed NLL in nats, scored tokens) of every sequence, each evaluated with its own sliding windows.

    Windows of different lengths share a batch right-padded with ``pad_id``: the model is causal, so the padding
    never changes the logits of the real positions. ``progress``: a tqdm bar on stderr (None: only on a terminal).
    """
    if batch_size < 1:
        raise PerplexityInputError(f"--batch-size must be >= 1, got {batch_size}")
    check_window(window, stride)
    token_lists = [_as_list(sequence) for sequence in sequences]
    windows = [w for index, tokens in enumerate(token_lists) for w in plan_windows(len(tokens), window, stride, index)]
    windows.sort(key=lambda w: -w.length)  # similar lengths together: little padding
    total, scored = 0.0, 0
    from tqdm import tqdm

    with torch.inference_mode(), tqdm(total=len(windows), unit="window", desc="perplexity", file=sys.stderr,
                                      disable=None if progress is None else not progress, dynamic_ncols=True) as bar:
        for first in range(0, len(windows), batch_size):
            batch = windows[first:first + batch_size]
            width = batch[0].length
            inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for row, w in enumerate(batch):
                inputs[row, :w.length] = torch.tensor(token_lists[w.sequence][w.begin:w.end], dtype=torch.long)
            logits = model_fn(inputs if device is None else inputs.to(device))
            for row, w in enumerate(batch):
                rows = logits[row, w.score_from - w.begin:w.length]
                rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # at least float32
                targets = torch.tensor(token_lists[w.sequence][w.score_from + 1:w.end + 1], dtype=torch.long,
                                       device=rows.device)
                nll = -torch.log_softmax(rows, dim=-1).gather(-1, targets[:, None])
                total += float(nll.double().sum())
                scored += w.scored
            bar.update(len(batch))
    return total, scored


def sliding_window_nll(model_fn: ModelFn, token_ids: Sequence[int] | torch.Tensor, window: int, stride: int, *,
                       batch_size: int = 1, device: torch.device | str | None = None,
                       progress: bool | None = False) -> tuple[float, int]:
    """(summed NLL in nats, scored tokens) of one token sequence with :func:`plan_windows`' windows: every token
    but the first is scored exactly once, so ``scored_tokens == len(token_ids) - 1``."""
    return documents_nll(model_fn, [token_ids], window, stride, batch_size=batch_size, device=device,
                         progress=progress)


# ------------------------------------------------------------------------------------------------------ input text

def input_format(path: str | Path, fmt: str = "auto") -> str:
    """``txt`` or ``jsonl``: ``fmt`` itself, or with ``auto`` the file's suffix (``.jsonl`` / ``.ndjson``)."""
    if fmt not in FORMATS:
        raise PerplexityInputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    return "jsonl" if Path(path).suffix.lower() in _JSONL_SUFFIXES else "txt"


def _read_text(path: Path) -> str:
    if not path.exists():
        raise PerplexityInputError(f"input file {path} does not exist")
    if not path.is_file():
        raise PerplexityInputError(f"input {path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PerplexityInputError(f"input file {path} is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise PerplexityInputError(f"cannot read input file {path}: {error.strerror or error}") from None


def read_documents(path: str | Path, *, fmt: str = "auto", json_key: str = "text",
                   split_lines: bool = False) -> list[str]:
    """The documents of a text file: the whole file (``split_lines``: each non-blank line), or for JSONL each
    non-blank line's ``json_key`` string. ``PerplexityInputError`` for a missing or unreadable file, a bad JSONL
    line, or a file without any non-blank document."""
    path = Path(path)
    kind = input_format(path, fmt)
    text = _read_text(path)
    if kind == "txt":
        documents = [line for line in text.splitlines() if line.strip()] if split_lines else [text]
    else:
        documents = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise PerplexityInputError(f"{path} line {number} is not JSON: {error}") from None
            if not isinstance(record, dict):
                raise PerplexityInputError(f"{path} line {number} is not a JSON object")
            if json_key not in record:
                raise PerplexityInputError(f"{path} line {number} has no {json_key!r} key (--json-key); keys: "
                                           + ", ".join(map(repr, list(record)[:8])))
            value = record[json_key]
            if not isinstance(value, str):
                raise PerplexityInputError(f"{path} line {number}: {json_key!r} is a {type(value).__name__}, "
                                           "not a string")
            documents.append(value)
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise PerplexityInputError(f"input file {path} has no text" + (f" under {json_key!r}" if kind == "jsonl"
                                                                        else ""))
    return documents


def tokenize_documents(documents: Iterable[str], tokenize: Callable[[str], Sequence[int]], *,
                       bos: int | None = None) -> list[list[int]]:
    """Each document's ids (after ``bos`` when given), leaving out documents without tokens;
    ``PerplexityInputError`` when none has any."""
    tokenized = []
    for document in documents:
        ids = [int(i) for i in tokenize(document)]
        if ids:
            tokenized.append(([bos] if bos is not None else []) + ids)
    if not tokenized:
        raise PerplexityInputError("the input text has no tokens")
    return tokenized


def join_documents(tokenized: Sequence[Sequence[int]], eod: int | None) -> list[int]:
    """One stream of the documents with ``eod`` between them."""
    if len(tokenized) > 1 and eod is None:
        raise PerplexityInputError("the tokenizer has no end-of-document token to join documents with; use "
                                   "--per-document")
    joined: list[int] = []
    for index, ids in enumerate(tokenized):
        if index:
            joined.append(int(eod))
        joined.extend(ids)
    return joined


def cap_tokens(sequences: list[list[int]], max_tokens: int | None) -> tuple[list[list[int]], bool]:
    """(the first ``max_tokens`` tokens of the sequences in order, whether anything was cut); None: no cap."""
    if max_tokens is None:
        return sequences, False
    if max_tokens < 1:
        raise PerplexityInputError(f"--max-tokens must be >= 1, got {max_tokens}")
    kept, left = [], max_tokens
    for sequence in sequences:
        if left <= 0:
            break
        kept.append(sequence[:left])
        left -= len(kept[-1])
    return kept, sum(map(len, kept)) < sum(map(len, sequences))


def prepare_sequences(tokenized: list[list[int]], eod: int | None, *, per_document: bool = False,
                      max_tokens: int | None = None) -> tuple[list[list[int]], int, bool]:
    """(sequences to evaluate, documents they hold, whether ``max_tokens`` cut the text): the documents apart
    (``per_document``) or joined with ``eod``, then capped to their first ``max_tokens`` tokens."""
    if per_document:
        sequences, truncated = cap_tokens(tokenized, max_tokens)
        return sequences, len(sequences), truncated
    sequences, truncated = cap_tokens([join_documents(tokenized, eod)], max_tokens)
    kept, start, documents = len(sequences[0]), 0, 0
    for ids in tokenized:  # documents whose first token made it under the cap
        if start < kept:
            documents += 1
        start += len(ids) + 1
    return sequences, documents, truncated


def scorable_tokens(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens the evaluation will score (all but each sequence's first)."""
    return sum(max(len(sequence) - 1, 0) for sequence in sequences)


# ------------------------------------------------------------------------------------------------------ the result

def perplexity_result(total_nll: float, tokens: int, *, documents: int, window: int, stride: int,
                      model: dict[str, Any], input: dict[str, Any]) -> dict[str, Any]:
    """The JSON result: ``perplexity`` (``exp(nll)``), ``nll`` (mean nats per scored token), ``tokens`` (scored),
    ``documents``, ``window``, ``stride``, ``model`` and ``input`` descriptions, and ``total_nll``."""
    if tokens < 1:
        raise PerplexityInputError("nothing to score: the text needs at least two tokens")
    nll = total_nll / tokens
    perplexity = math.exp(nll) if nll < 700 else math.inf
    return {"perplexity": perplexity, "nll": nll, "tokens": tokens, "documents": documents, "window": window,
            "stride": stride, "model": model, "input": input, "total_nll": total_nll}


def summary_line(result: dict[str, Any]) -> str:
    """``perplexity 12.3456 (nll 2.5133 nats/token, 1,234 tokens, ...)`` on one line."""
    model = result["model"]
    name = model.get("path") or model.get("load") or model.get("type", "model")
    source = result["input"].get("path", "input")
    return (f"perplexity {result['perplexity']:.4f} (nll {result['nll']:.4f} nats/token, {result['tokens']:,} "
            f"tokens, {result['documents']:,} documents, window {result['window']}, stride {result['stride']}) "
            f"model {name} input {source}")
