"""Perplexity of a checkpoint on a local text or JSONL file, with a sliding window.

    python tools/evaluate_perplexity.py --load checkpoints/hybrid --input wiki.txt --json hybrid.json
    python tools/evaluate_perplexity.py --hf-dir models/llama --input wiki.txt --json llama.json
    python tools/evaluate_perplexity.py --load DIR --input docs.jsonl --json-key text --per-document --window 1024

The model is either ``--load DIR``, a checkpoint of this framework in Megatron's legacy layout at any tensor /
pipeline-parallel size (its architecture and tokenizer come from the args saved in it; ``--tokenizer-type`` /
``--tokenizer-model`` / ``--vocab-size`` replace the saved tokenizer; a partitioned checkpoint is gathered into this
one process), or ``--hf-dir DIR``, a Hugging Face causal language model folder with its tokenizer, read offline, to
compare a Llama with its conversion. The same text then gives the same tokens to both (no special tokens are added;
``--add-bos`` puts the tokenizer's BOS before each document).

Input: a ``.txt`` file is one document (``--split-lines``: one per non-blank line); a ``.jsonl`` file holds one JSON
object per line with the text under ``--json-key`` (default ``text``); ``--format`` overrides the suffix. Documents
are joined into one stream with the end-of-document (EOS) token between them, or with ``--per-document`` evaluated
apart. ``--max-tokens`` keeps only the first tokens.

Evaluation: windows of ``--window`` tokens (default: the model's longest sequence) start every ``--stride`` tokens
(default ``window // 2``); each window scores the tokens the previous one did not, with the rest of the window as
context, so every token but a sequence's first is scored exactly once. ``--batch-size`` windows run per forward pass.
The logits of a checkpoint's vocabulary padding rows are masked out; a Hugging Face model's logits are used as
transformers computes its loss.

Output: the JSON result (``perplexity``, ``nll`` in nats per token, ``tokens`` scored, ``documents``, ``window``,
``stride``, ``model``, ``input``) on stdout, or with ``--json OUT`` written to OUT while stdout gets a one-line
summary. A progress bar goes to stderr on a terminal. User mistakes print ``error: <one line>`` and exit with 2.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing comes from a hub

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake of the user's, reported as ``error: <one line>`` with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(message)


class LoadedModel(NamedTuple):
    """A model ready to score: logits of ``(b, s)`` ids, its tokenizer's pieces and a JSON description."""

    logits: Callable[[Any], Any]
    tokenize: Callable[[str], Sequence[int]]
    eod: int | None
    bos: int | None
    max_length: int | None
    device: Any
    info: dict[str, Any]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evaluate_perplexity.py", allow_abbrev=False,
                     description="Sliding-window perplexity of a checkpoint on a local text or JSONL file.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", metavar="DIR", help="Checkpoint directory of this framework (any TP / PP).")
    source.add_argument("--hf-dir", metavar="DIR", help="Hugging Face causal LM folder (with its tokenizer).")
    parser.add_argument("--input", metavar="FILE", required=True, help="A .txt or .jsonl file.")
    parser.add_argument("--format", choices=["auto", "txt", "jsonl"], default="auto",
                        help="Input format (default: from the suffix, .jsonl / .ndjson being JSONL).")
    parser.add_argument("--json-key", default="text", help="Key of the text in each JSONL line (default: text).")
    parser.add_argument("--split-lines", action="store_true", help="A .txt file holds one document per line.")
    parser.add_argument("--per-document", action="store_true",
                        help="Evaluate each document apart instead of joining them with the EOD token.")
    parser.add_argument("--add-bos", action="store_true", help="Put the tokenizer's BOS token before each document.")
    parser.add_argument("--window", type=int, default=None,
                        help="Tokens per window (default and maximum: the model's longest sequence).")
    parser.add_argument("--stride", type=int, default=None,
                        help="Tokens between window starts, at most --window (default: window // 2).")
    parser.add_argument("--max-tokens", type=int, default=None, help="Evaluate only the first N tokens.")
    parser.add_argument("--batch-size", type=int, default=1, help="Windows per forward pass (default 1).")
    parser.add_argument("--json", metavar="OUT", default=None,
                        help="Write the JSON result to OUT and print a one-line summary instead.")
    parser.add_argument("--bf16", action="store_true", help="Run the model in bfloat16 (default float32).")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="Where to run (default: CUDA when available).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    tokenizer = parser.add_argument_group("tokenizer of a --load checkpoint (default: the one saved in it)")
    tokenizer.add_argument("--tokenizer-type", default=None,
                           choices=["GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "TikTokenizer",
                                    "NullTokenizer"])
    tokenizer.add_argument("--tokenizer-model", default=None, help="Tokenizer file or folder.")
    tokenizer.add_argument("--vocab-size", type=int, default=None, help="Vocabulary size of NullTokenizer.")
    return parser


def _check_flags(args: argparse.Namespace) -> None:
    for flag in ("window", "stride", "max_tokens", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.window is not None and args.stride is not None and args.stride > args.window:
        raise UserError(f"--stride {args.stride} is larger than --window {args.window}: tokens between windows "
                        "would never be scored")
    if args.hf_dir is not None:
        given = [f"--{name.replace('_', '-')}" for name in ("tokenizer_type", "tokenizer_model", "vocab_size")
                 if getattr(args, name) is not None]
        if given:
            raise UserError(f"{', '.join(given)} only apply to --load (a --hf-dir folder has its own tokenizer)")
    if args.json is not None:
        parent = Path(args.json).resolve().parent
        if not parent.is_dir():
            raise UserError(f"--json {args.json}: folder {parent} does not exist")
        if Path(args.json).is_dir():
            raise UserError(f"--json {args.json} is a folder")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("run this tool as one process: a partitioned checkpoint is gathered into it")


def _device(choice: str) -> Any:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


# ---------------------------------------------------------------------------------------------------------- models

def load_checkpoint_model(args: argparse.Namespace) -> LoadedModel:
    """The ``--load`` checkpoint on one process, described by its saved args (TP1 / PP1 after gathering)."""
    from megatron.inference.model_loading import apply_checkpoint_args, load_model_for_serving, read_checkpoint_args
    from megatron.training import arguments
    from megatron.training.checkpointing import read_tracker

    device = _device(args.device)
    saved = read_checkpoint_args(args.load, required=False)
    if saved is None:
        raise UserError(f"checkpoint {args.load} has no saved args: this tool takes the model's architecture and "
                        "tokenizer from them")
    model_args = arguments.build_parser().parse_args([])
    explicit = {}
    for name in ("tokenizer_type", "tokenizer_model", "vocab_size"):
        if getattr(args, name) is not None:
            explicit[name] = getattr(args, name)
            setattr(model_args, name, explicit[name])
    apply_checkpoint_args(model_args, saved, explicit)
    model_args.load = args.load
    model_args.bf16 = args.bf16
    model_args.distributed_backend = "nccl" if device.type == "cuda" else "gloo"
    arguments.validate_args(model_args, training=False)
    model, tokenizer, max_length = load_model_for_serving(model_args)
    device = next(model.parameters()).device
    info = {
        "type": "megatron", "load": str(Path(args.load).resolve()), "iteration": read_tracker(args.load),
        "layer_pattern": model_args.hybrid_layer_pattern,
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_sequence_length": max_length, "vocab_size": tokenizer.vocab_size,
        "padded_vocab_size": model_args.padded_vocab_size, "dtype": str(model_args.params_dtype).removeprefix("torch."),
        "saved_layout": {"tensor_model_parallel_size": getattr(saved, "tensor_model_parallel_size", 1),
                         "pipeline_model_parallel_size": getattr(saved, "pipeline_model_parallel_size", 1)},
        "tokenizer": {"type": model_args.tokenizer_type, "model": model_args.tokenizer_model},
        "device": str(device),
    }
    return LoadedModel(logits=lambda ids: model(ids), tokenize=tokenizer.tokenize, eod=_eod(tokenizer),
                       bos=getattr(tokenizer, "bos", None), max_length=max_length, device=device, info=info)


def _eod(tokenizer: Any) -> int | None:
    try:
        return tokenizer.eod
    except (ValueError, AttributeError):  # a tokenizer without eos or bos
        return None


def load_hf_model(args: argparse.Namespace) -> LoadedModel:
    """A Hugging Face causal LM folder and its tokenizer, read offline."""
    folder = Path(args.hf_dir)
    if not folder.is_dir():
        raise UserError(f"--hf-dir {folder} is not a folder")
    device = _device(args.device)
    try:
        import torch
        import transformers
    except ImportError as error:
        raise UserError(f"--hf-dir needs the transformers package: {error}") from None
    transformers.logging.set_verbosity_error()
    if args.no_progress or not sys.stderr.isatty():
        transformers.logging.disable_progress_bar()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                                  **{dtype_key: dtype})
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"cannot load --hf-dir {folder}: {_first_line(error)}") from None
    model = model.to(device).eval()
    config = model.config
    max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    eod = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    info = {
        "type": "huggingface", "path": str(folder.resolve()),
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "parameters": sum(p.numel() for p in model.parameters()), "max_sequence_length": max_length,
        "vocab_size": len(tokenizer), "model_vocab_size": getattr(config, "vocab_size", None),
        "dtype": str(dtype).removeprefix("torch."), "device": str(device),
    }

    def logits(ids: Any) -> Any:
        return model(input_ids=ids, use_cache=False).logits

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return LoadedModel(logits=logits, tokenize=tokenize, eod=eod, bos=tokenizer.bos_token_id, max_length=max_length,
                       device=device, info=info)


# ------------------------------------------------------------------------------------------------------------ main

def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    return text.splitlines()[0] if text else type(error).__name__


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Parse-checked flags -> the JSON result (``UserError`` for mistakes)."""
    from megatron.training import perplexity

    documents = perplexity.read_documents(args.input, fmt=args.format, json_key=args.json_key,
                                          split_lines=args.split_lines)
    loaded = load_hf_model(args) if args.hf_dir is not None else load_checkpoint_model(args)
    limit = loaded.max_length
    window = args.window if args.window is not None else limit
    if window is None:
        raise UserError("the model does not say its longest sequence: give --window")
    if limit is not None and window > limit:
        raise UserError(f"--window {window} is longer than the model's longest sequence ({limit})")
    stride = args.stride if args.stride is not None else max(1, window // 2)
    perplexity.check_window(window, stride)
    bos = None
    if args.add_bos:
        if loaded.bos is None:
            raise UserError("--add-bos: the tokenizer has no BOS token")
        bos = loaded.bos
    tokenized = perplexity.tokenize_documents(documents, loaded.tokenize, bos=bos)
    read = sum(map(len, tokenized)) + (0 if args.per_document else len(tokenized) - 1)
    sequences, count, truncated = perplexity.prepare_sequences(tokenized, loaded.eod, per_document=args.per_document,
                                                               max_tokens=args.max_tokens)
    if perplexity.scorable_tokens(sequences) < 1:
        raise UserError("nothing to score: the text needs at least two tokens" + (
            " per document" if args.per_document else "") + (" within --max-tokens" if truncated else ""))
    total, scored = perplexity.documents_nll(loaded.logits, sequences, window, stride, batch_size=args.batch_size,
                                             device=loaded.device, progress=False if args.no_progress else None)
    input_info = {"path": str(Path(args.input).resolve()),
                  "format": perplexity.input_format(args.input, args.format),
                  "json_key": args.json_key if perplexity.input_format(args.input, args.format) == "jsonl" else None,
                  "split_lines": args.split_lines, "per_document": args.per_document, "add_bos": args.add_bos,
                  "max_tokens": args.max_tokens, "tokens_read": read, "tokens_evaluated": sum(map(len, sequences)),
                  "truncated": truncated}
    return perplexity.perplexity_result(total, scored, documents=count,
                                        window=window, stride=stride, model=loaded.info, input=input_info)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit status (2 after ``error: <one line>`` on stderr)."""
    try:
        args = build_parser().parse_args(argv)
        _check_flags(args)  # before the slow imports: a mistyped flag answers at once
        from megatron.core.tensor_parallel.sharding import UnknownTensorError
        from megatron.training.arguments import ArgumentError
        from megatron.training.checkpoint_reshard import ReshardError
        from megatron.training.checkpointing import CheckpointError

        try:
            result = evaluate(args)
        except (ArgumentError, CheckpointError, ReshardError, UnknownTensorError, ValueError, OSError) as error:
            raise UserError(_first_line(error)) from None
    except UserError as error:
        print(f"error: {_first_line(error)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    text = json.dumps(result, indent=2)
    if args.json is not None:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
        from megatron.training.perplexity import summary_line

        print(summary_line(result), flush=True)
    else:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
