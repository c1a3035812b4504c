"""Tokenize a JSONL corpus into Megatron's indexed dataset (``.bin`` + ``.idx``, the MMIDIDX format).

Each input line is a JSON object; for every ``--json-keys`` key the text is tokenized into one document of
``{output_prefix}_{key}_document.bin/.idx``. Example::

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 4

Outputs are written to temporary files and renamed into place only when the whole input was processed; on bad input
(missing or empty file, invalid JSON, a missing key, an unknown tokenizer) it prints one line to stderr, exits with
code 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

# Runnable as `python tools/preprocess_data.py` from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, optimal_dtype

EXIT_BAD_INPUT = 2


class PreprocessError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse Megatron's ``preprocess_data.py`` flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="JSONL file, one JSON object per line")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from each JSON object")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, help="e.g. GPTSentencePieceTokenizer, HuggingFaceTokenizer, "
                       "TikTokenizer, NullTokenizer")
    group.add_argument("--tokenizer-model", default=None, help="tokenizer model file or folder")
    group.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (NullTokenizer)")
    group.add_argument("--tiktoken-pattern", default=None, help="TikTokenizer pre-tokenization pattern (v1, v2)")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=None,
                       help="TikTokenizer: ids reserved for special tokens before the BPE ranks (default 1000)")
    group.add_argument("--tiktoken-special-tokens", nargs="+", default=None, help="TikTokenizer special tokens")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=1000, help="accepted for Megatron compatibility; "
                       "progress is shown by a progress bar")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys has duplicates: {args.json_keys}")
    return args


def _build_tokenizer(args: argparse.Namespace) -> Any:
    """Build the tokenizer named by the flags, turning its construction errors into :class:`PreprocessError`."""
    from megatron.training.tokenizer import build_tokenizer_from_args

    try:
        return build_tokenizer_from_args(args)
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise PreprocessError(f"cannot build tokenizer {args.tokenizer_type!r}: {error}") from None


class Encoder:
    """Tokenize one JSONL line into one token list per key (an error string instead when the line is bad)."""

    tokenizer: Any = None  # one per process, built by initialize()

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def initialize(self) -> None:
        """Build this process's tokenizer."""
        Encoder.tokenizer = _build_tokenizer(self.args)

    def encode(self, numbered_line: tuple[int, str]) -> tuple[dict[str, list[int]] | str, int]:
        """Return ``({key: ids}, bytes read)``, or ``(error message, bytes read)`` for a bad line."""
        number, line = numbered_line
        size = len(line.encode("utf-8"))
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            return f"line {number}: invalid JSON ({error.msg} at column {error.colno})", size
        if not isinstance(record, dict):
            return f"line {number}: expected a JSON object, got {type(record).__name__}", size
        documents = {}
        for key in self.args.json_keys:
            if key not in record:
                return f"line {number}: key {key!r} not found (keys: {sorted(record)})", size
            text = record[key]
            if not isinstance(text, str):
                return f"line {number}: value of {key!r} is {type(text).__name__}, expected a string", size
            try:
                ids = [int(i) for i in Encoder.tokenizer.tokenize(text)]
            except (ValueError, TypeError, KeyError) as error:
                return f"line {number}: cannot tokenize {key!r}: {error}", size
            # As Megatron: an empty document gets no end-of-document token.
            if self.args.append_eod and ids:
                ids.append(Encoder.tokenizer.eod)
            documents[key] = ids
        return documents, size


def _numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, line)`` for every non-blank line of ``path``."""
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if line.strip():
                yield number, line


def _output_paths(prefix: str, key: str) -> tuple[str, str]:
    base = f"{prefix}_{key}_document"
    return base + ".bin", base + ".idx"


def preprocess(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """Tokenize ``args.input`` into the indexed datasets; return ``{key: (documents, tokens)}`` written.

    Raises :class:`PreprocessError` for bad input; no output file exists then.
    """
    if not os.path.isfile(args.input):
        raise PreprocessError(f"input file not found: {args.input}")
    if os.path.getsize(args.input) == 0:
        raise PreprocessError(f"input file is empty: {args.input}")
    tokenizer = _build_tokenizer(args)  # fail fast, before any worker starts
    dtype = optimal_dtype(getattr(tokenizer, "vocab_size", None))
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    finals = {key: _output_paths(args.output_prefix, key) for key in args.json_keys}
    temps = {key: tuple(f"{p}.tmp{os.getpid()}" for p in paths) for key, paths in finals.items()}
    builders: dict[str, IndexedDatasetBuilder] = {}
    totals = {key: [0, 0] for key in args.json_keys}
    encoder = Encoder(args)
    pool = None
    try:
        if args.workers > 1:
            pool = multiprocessing.Pool(args.workers, initializer=encoder.initialize)
            encoded = pool.imap(encoder.encode, _numbered_lines(args.input), chunksize=64)
        else:
            encoder.initialize()
            encoded = map(encoder.encode, _numbered_lines(args.input))
        for key in args.json_keys:
            builders[key] = IndexedDatasetBuilder(temps[key][0], dtype=dtype)
        progress = tqdm(total=os.path.getsize(args.input), unit="B", unit_scale=True, desc="tokenizing", disable=None)
        with progress:
            for documents, size in encoded:
                if isinstance(documents, str):
                    raise PreprocessError(f"{args.input}: {documents}")
                for key, ids in documents.items():
                    try:
                        builders[key].add_document(ids)
                    except ValueError as error:
                        raise PreprocessError(f"{args.input}: {error} (vocab too large for the dtype?)") from None
                    totals[key][0] += 1
                    totals[key][1] += len(ids)
                progress.update(size)
        if totals[args.json_keys[0]][0] == 0:
            raise PreprocessError(f"input file has no JSON lines: {args.input}")
        for key in args.json_keys:
            builders[key].finalize(temps[key][1])
        for key in args.json_keys:
            os.replace(temps[key][0], finals[key][0])
            os.replace(temps[key][1], finals[key][1])
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for builder in builders.values():
            builder.close()
        for paths in temps.values():
            for path in paths:
                if os.path.exists(path):
                    os.unlink(path)
    return {key: (docs, tokens) for key, (docs, tokens) in totals.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0, or 2 for bad input)."""
    args = get_args(argv)
    try:
        totals = preprocess(args)
    except PreprocessError as error:
        print(f"preprocess_data.py: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except UnicodeDecodeError as error:
        print(f"preprocess_data.py: error: {args.input} is not UTF-8 text ({error.reason})", file=sys.stderr)
        return EXIT_BAD_INPUT
    for key, (documents, tokens) in totals.items():
        print(f"wrote {documents} documents, {tokens} tokens to {_output_paths(args.output_prefix, key)[0][:-4]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
