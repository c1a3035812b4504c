"""Command line, model, tokenizer and weights of the text generation server.

* :func:`parse_serving_args`: ``pretrain_hybrid.py``'s model flags plus the server's own (``--port``, ``--host``,
  ``--draft-load``, ``--num-speculative-tokens``, ``--max-batch-size``). With ``--use-checkpoint-args`` the
  model-defining arguments (layer pattern, sizes, normalization, position embeddings, sequence length, vocabulary
  padding, and the tokenizer flags not given) come from the args saved in the ``--load`` checkpoint; a flag given on
  the command line that contradicts the checkpoint is an error.
* :func:`load_model_for_serving`: this rank's tensor-parallel share of the model in evaluation mode, float32 (or
  ``--bf16`` / ``--fp16`` parameters), its tokenizer and the longest sequence it serves. A checkpoint saved at
  another tensor- or pipeline-parallel size (or with another vocabulary padding) is gathered and re-split on load;
  serving never pipelines.
* :func:`load_draft_model`: the ``--draft-load`` model of speculative decoding, always described by its own saved
  args, sharing the target's tokenizer and padded vocabulary.

Vocabulary rows past the tokenizer's size (the padding) are masked out of the logits, so that no request can
produce an id the tokenizer cannot decode. Problems raise :class:`ArgumentError`, ``CheckpointError`` or
``ReshardError`` with one-line messages.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatron.core import parallel_state
from megatron.training.arguments import ArgumentError, build_parser, validate_args
from megatron.training.checkpoint_args import (
    TOKENIZER_ARGS,
    apply_checkpoint_args,
    explicit_flags,
    read_checkpoint_args,
)
from megatron.training.checkpointing import CheckpointError, check_compatible

# What the draft model takes from the target's command line.
SHARED_ARGS = ("tensor_model_parallel_size", "distributed_backend", "distributed_timeout_minutes", "bf16", "fp16",
               "seed")
def build_serving_parser() -> argparse.ArgumentParser:
    """``pretrain_hybrid.py``'s parser plus the server's flags."""
    parser = build_parser()
    parser.description = "Serve a hybrid Mamba / attention / MLP checkpoint over HTTP (Megatron's PUT /api)"
    serving_help = {
        "load": "Checkpoint directory to serve (required); any tensor/pipeline-parallel layout.",
        "use_checkpoint_args": "Take the model-defining arguments (and the tokenizer flags not given) from the args "
                               "saved in the --load checkpoint; flags that contradict them are an error.",
    }
    for action in parser._actions:  # argparse offers no public access to an argument's help
        action.help = serving_help.get(action.dest, action.help)
    group = parser.add_argument_group(title="text generation server")
    group.add_argument("--port", type=int, default=5000, help="TCP port of the server (0: any free port).")
    group.add_argument("--host", type=str, default="127.0.0.1",
                       help="Address to listen on (0.0.0.0: every interface; the server has no authentication).")
    group.add_argument("--draft-load", type=str, default=None,
                       help="Checkpoint of a smaller draft model with the same tokenizer: generate speculatively "
                            "(always read with its own saved args).")
    group.add_argument("--num-speculative-tokens", type=int, default=4,
                       help="Tokens the draft model proposes per verification step (with --draft-load).")
    group.add_argument("--max-batch-size", type=int, default=128,
                       help="Most prompts one request may hold (at most Megatron's 128).")
    group.add_argument("--model-name", type=str, default=None,
                       help="Model name reported by /health and /v1/completions (default: the --load folder name).")
    return parser


def parse_serving_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the server's command line (``ArgumentError`` / ``CheckpointError`` on mistakes)."""
    argv = list(argv) if argv is not None else None
    parser = build_serving_parser()
    args = parser.parse_args(argv)
    if args.load is None:
        raise ArgumentError("--load is required: the checkpoint directory to serve")
    if args.use_checkpoint_args:
        apply_checkpoint_args(args, read_checkpoint_args(args.load), explicit_flags(build_serving_parser, argv))
    validate_args(args, training=False)
    if args.pipeline_model_parallel_size != 1:
        raise ArgumentError("--pipeline-model-parallel-size: serving does not pipeline; leave it at 1 (a pipelined "
                            "checkpoint is re-split on load)")
    if args.world_size != args.tensor_model_parallel_size:
        raise ArgumentError(f"the server runs exactly --tensor-model-parallel-size "
                            f"({args.tensor_model_parallel_size}) processes, got a world of {args.world_size}")
    if not 0 <= args.port <= 65535:
        raise ArgumentError(f"--port must be in [0, 65535], got {args.port}")
    if args.num_speculative_tokens < 1:
        raise ArgumentError(f"--num-speculative-tokens must be >= 1, got {args.num_speculative_tokens}")
    if not 1 <= args.max_batch_size <= 128:
        raise ArgumentError(f"--max-batch-size must be in [1, 128], got {args.max_batch_size}")
    if args.model_name is None:
        args.model_name = Path(args.load).resolve().name or "megatron-hybrid"
    return args


# ----------------------------------------------------------------------------------------------- checkpoint args

# -------------------------------------------------------------------------------------------------------- loading

class VocabularyMask(nn.Module):
    """A model whose logits for the padding ids (``>= vocab_size``) are ``-inf``: never sampled, zero
    probability; in argmax-only decoding, ids the argmax never returns. Attribute reads fall through to the wrapped
    model."""

    def __init__(self, model: nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        params = kwargs.get("inference_params")
        if params is not None and params.argmax_only:  # the model returns token ids: restrict its argmax instead
            params.argmax_vocab_size = self.vocab_size
            return self.model(*args, **kwargs)
        logits = self.model(*args, **kwargs)
        if kwargs.get("labels") is None and logits.shape[-1] > self.vocab_size:
            logits[..., self.vocab_size:] = float("-inf")
        return logits

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


def serving_device(args: argparse.Namespace) -> torch.device:
    """The GPU of this rank with NCCL, else the CPU."""
    if args.distributed_backend == "nccl" and torch.cuda.is_available():
        return torch.device(f"cuda:{torch.cuda.current_device()}")
    return torch.device("cpu")


def _check_vocabulary(saved: argparse.Namespace, vocab: int, directory: str, what: str) -> None:
    saved_vocab = getattr(saved, "true_vocab_size", None)
    if saved_vocab is not None and saved_vocab != vocab:
        raise CheckpointError(f"{what} {directory} was trained with a vocabulary of {saved_vocab} tokens but the "
                              f"tokenizer has {vocab}: serve it with the tokenizer it was trained with")
    saved_padded = getattr(saved, "padded_vocab_size", None)
    if saved_vocab is None and saved_padded is not None and vocab > saved_padded:
        raise CheckpointError(f"{what} {directory} has {saved_padded} vocabulary rows, fewer than the tokenizer's "
                              f"{vocab} tokens")


def _load_weights(model: nn.Module, directory: str, args: argparse.Namespace, saved: argparse.Namespace) -> None:
    """Load this rank's share of the checkpoint into ``model`` (built for ``args``), resharding when the
    checkpoint's tensor/pipeline layout or vocabulary padding differ from the serving ones."""
    from megatron.training.checkpoint_reshard import (
        VOCAB_KEYS,
        build_rank_file,
        gather_checkpoint,
        target_layout,
        validate_target,
    )
    from megatron.training.checkpointing import load_checkpoint

    tp = args.tensor_model_parallel_size
    # A checkpoint without saved args cannot be gathered (its layout is unknown): it must match the command line.
    same_layout = not vars(saved) or (
        getattr(saved, "tensor_model_parallel_size", 1) == tp
        and getattr(saved, "pipeline_model_parallel_size", 1) == 1
        and getattr(saved, "virtual_pipeline_model_parallel_size", None) in (None, 1)
        and getattr(saved, "padded_vocab_size", None) == args.padded_vocab_size)
    if same_layout:
        load_checkpoint(directory, model, None, None, args, load_optim=False, load_rng=False)
        return
    full = gather_checkpoint(directory, load_optimizer=False)
    comparable = argparse.Namespace(**vars(full.args))
    comparable.padded_vocab_size = args.padded_vocab_size  # the padding is redone below
    check_compatible(comparable, args, Path(directory))
    layout = target_layout(full, tp, 1)
    validate_target(full, layout)
    tensors = dict(full.tensors)
    for key in VOCAB_KEYS:  # re-pad the vocabulary rows for the serving tensor-parallel size
        if key in tensors:
            rows = tensors[key]
            if rows.shape[0] >= args.padded_vocab_size:
                tensors[key] = rows[: args.padded_vocab_size]
            else:
                tensors[key] = torch.cat([rows, rows.new_zeros(args.padded_vocab_size - rows.shape[0],
                                                               *rows.shape[1:])])
    file = build_rank_file(full, layout, parallel_state.get_tensor_model_parallel_rank(), 0, tensors=tensors)
    try:
        model.load_state_dict(file["model"])
    except RuntimeError as error:
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise CheckpointError(f"checkpoint {directory} does not fit the model: {detail}") from None


def _build_and_load(args: argparse.Namespace, directory: str, saved: argparse.Namespace,
                    vocab: int) -> nn.Module:
    from megatron.training.training import build_model

    model = build_model(args)
    _load_weights(model, directory, args, saved)
    model = model.to(serving_device(args), dtype=args.params_dtype).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return VocabularyMask(model, vocab).eval() if args.padded_vocab_size > vocab else model


def load_model_for_serving(args: argparse.Namespace) -> tuple[nn.Module, Any, int]:
    """(model, tokenizer, max_sequence_length) of the ``--load`` checkpoint for this rank (call
    ``initialize_distributed`` first with tensor parallelism). Sets ``args.true_vocab_size`` and
    ``args.padded_vocab_size``."""
    from megatron.training.tokenizer import build_tokenizer_from_args, padded_vocab_size
    from megatron.training.training import set_seed

    set_seed(args.seed)  # every rank draws the same numbers for unseeded sampling
    saved = read_checkpoint_args(args.load, required=False) or argparse.Namespace()
    tokenizer = build_tokenizer_from_args(args)
    vocab = tokenizer.vocab_size
    _check_vocabulary(saved, vocab, args.load, "checkpoint")
    args.true_vocab_size = vocab
    args.padded_vocab_size = padded_vocab_size(vocab, args.make_vocab_size_divisible_by,
                                               args.tensor_model_parallel_size)
    model = _build_and_load(args, args.load, saved, vocab)
    return model, tokenizer, args.max_position_embeddings or args.seq_length


def load_draft_model(args: argparse.Namespace, tokenizer: Any) -> tuple[nn.Module, int]:
    """(draft model, longest sequence it can run) of ``--draft-load`` for this rank, built from its own saved
    args, with the target's tensor-parallel size and padded vocabulary (call after
    :func:`load_model_for_serving`). ``CheckpointError`` when its vocabulary differs from the tokenizer's."""
    directory = args.draft_load
    saved = read_checkpoint_args(directory)
    vocab = tokenizer.vocab_size
    _check_vocabulary(saved, vocab, directory, "--draft-load checkpoint")
    draft = build_serving_parser().parse_args([])
    apply_checkpoint_args(draft, saved, explicit={})
    for name in (*SHARED_ARGS, *TOKENIZER_ARGS):  # the target's parallel layout, precision and tokenizer
        setattr(draft, name, getattr(args, name))
    draft.load = directory
    try:
        validate_args(draft, training=False)
    except ArgumentError as error:
        raise ArgumentError(f"--draft-load {directory}: {error}") from None
    draft.true_vocab_size, draft.padded_vocab_size = vocab, args.padded_vocab_size
    model = _build_and_load(draft, directory, saved, vocab)
    limit = draft.max_position_embeddings or draft.seq_length
    return model, (limit if draft.position_embedding_type == "learned_absolute" else 2**62)
