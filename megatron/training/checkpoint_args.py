"""``--use-checkpoint-args``: the model-defining arguments a checkpoint saved, filled into a command line.

Used by ``pretrain_hybrid.py`` (continue training a converted or released checkpoint without repeating its sizes)
and by the serving and evaluation tools. Flags given on the command line must agree with the checkpoint.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron.core.models.hybrid.hybrid_layer_allocation import resolve_hybrid_pattern, strip_stage_boundaries
from megatron.training.arguments import ArgumentError
from megatron.training.checkpointing import CheckpointError, checkpoint_name, read_tracker, upgrade_saved_args

# Model-defining arguments --use-checkpoint-args takes from the checkpoint (the layer pattern is handled apart).
MODEL_ARGS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
              "group_query_attention", "mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads",
              "mamba_kv_groups", "mamba_version", "mamba_expand", "normalization", "norm_epsilon", "swiglu",
              "squared_relu", "untie_embeddings_and_output_weights", "position_embedding_type", "rotary_base",
              "rotary_percent", "use_rope_scaling", "rope_scaling_factor", "rope_scaling_low_freq_factor",
              "rope_scaling_high_freq_factor", "rope_scaling_original_max_position_embeddings", "add_bias_linear",
              "add_qkv_bias", "max_position_embeddings", "seq_length", "make_vocab_size_divisible_by")
PATTERN_ARGS = ("hybrid_layer_pattern", "hybrid_override_pattern", "hybrid_attention_ratio", "hybrid_mlp_ratio",
                "num_layers")
# Model arguments whose None means "derive it" (and is what validated args hold when there is nothing to derive).
NULLABLE_ARGS = ("mamba_num_heads", "mamba_kv_groups", "kv_channels")
# Taken from the checkpoint only when not given on the command line.
TOKENIZER_ARGS = ("tokenizer_type", "tokenizer_model", "vocab_size", "tiktoken_pattern", "tiktoken_num_special_tokens",
                  "tiktoken_special_tokens")




def explicit_flags(build: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None) -> dict[str, Any]:
    """The destinations the command line sets explicitly (a parse by ``build()``'s parser with every default
    suppressed; unknown flags are ignored)."""
    parser = build()
    for action in parser._actions:  # argparse has no public way to tell given flags from defaults
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return vars(parser.parse_known_args(argv)[0])


def first_rank_file(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    iteration = read_tracker(directory)
    if iteration is None:
        raise CheckpointError(f"no latest_checkpointed_iteration.txt in {directory}: not a checkpoint directory")
    for pipelined in (False, True):
        path = checkpoint_name(directory, iteration, 0, 0, pipelined)
        if path.exists():
            return path
    raise CheckpointError(f"checkpoint {directory} has no rank-0 file for iteration {iteration} "
                          f"({checkpoint_name(directory, iteration)})")


def read_checkpoint_args(directory: str | Path, required: bool = True) -> argparse.Namespace | None:
    """The args saved in the checkpoint of ``directory`` (read from the first rank file without loading its
    tensors). ``CheckpointError`` without a checkpoint, or without saved args when ``required`` (else None)."""
    path = first_rank_file(directory)
    state, error = None, None
    for mmap in (True, False):  # memory-mapped first (reads no tensor); files of old torch versions cannot be
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as caught:  # torch raises many kinds of errors for unreadable files
            error = caught
    if state is None:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}")
    saved = state.get("args") if isinstance(state, dict) else None
    if not isinstance(saved, argparse.Namespace):
        if not required:
            return None
        raise CheckpointError(f"checkpoint {path} has no saved args; give the model flags instead of "
                              "--use-checkpoint-args")
    return upgrade_saved_args(saved)


def saved_layer_pattern(saved: argparse.Namespace) -> str:
    """The checkpoint's layer pattern without pipeline-stage marks."""
    pattern = getattr(saved, "hybrid_layer_pattern", None)
    if pattern is None:
        try:
            pattern = resolve_hybrid_pattern(
                num_layers=getattr(saved, "num_layers", None),
                attention_ratio=getattr(saved, "hybrid_attention_ratio", 0.0) or 0.0,
                mlp_ratio=getattr(saved, "hybrid_mlp_ratio", 0.0) or 0.0,
                override_pattern=getattr(saved, "hybrid_override_pattern", None))
        except ValueError as error:
            raise CheckpointError(f"cannot tell the checkpoint's layer pattern: {error}") from None
    return strip_stage_boundaries(pattern)


def apply_checkpoint_args(args: argparse.Namespace, saved: argparse.Namespace, explicit: dict[str, Any]) -> None:
    """Fill ``args`` (parsed, not yet validated) with the checkpoint's model-defining ``saved`` args; the
    tokenizer flags only where the command line gives none. ``explicit``: the flags given on the command line,
    which must agree with the checkpoint (``ArgumentError`` naming them otherwise)."""
    conflicts = []
    pattern = saved_layer_pattern(saved)
    if any(name in explicit for name in PATTERN_ARGS):
        try:
            given = strip_stage_boundaries(resolve_hybrid_pattern(
                num_layers=args.num_layers, attention_ratio=args.hybrid_attention_ratio,
                mlp_ratio=args.hybrid_mlp_ratio, override_pattern=args.hybrid_override_pattern,
                layer_pattern=args.hybrid_layer_pattern))
        except ValueError as error:
            given = f"invalid ({error})"
        if given != pattern:
            conflicts.append(f"the layer pattern {given!r} vs the checkpoint's {pattern!r}")
    args.hybrid_layer_pattern, args.hybrid_override_pattern, args.num_layers = pattern, None, None
    args.hybrid_attention_ratio = args.hybrid_mlp_ratio = 0.0
    for name in MODEL_ARGS:
        value = getattr(saved, name, None)
        if value is None and name not in NULLABLE_ARGS:
            continue  # not recorded: keep the command line's value
        if name in explicit and explicit[name] != value:
            conflicts.append(f"--{name.replace('_', '-')} {explicit[name]} vs the checkpoint's {value}")
        setattr(args, name, value)
    if conflicts:
        raise ArgumentError("--use-checkpoint-args: the command line contradicts the checkpoint: "
                            + "; ".join(conflicts) + " (drop those flags)")
    for name in TOKENIZER_ARGS:
        if name not in explicit and getattr(saved, name, None) is not None:
            setattr(args, name, getattr(saved, name))
