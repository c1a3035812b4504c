"""Reshard legacy-layout checkpoints between tensor / pipeline / virtual-pipeline layouts.

A checkpoint saved at one layout is first *gathered* into one full-size state dict with global layer indices
(:func:`gather_checkpoint`, returning a :class:`FullCheckpoint`, optionally with the full per-parameter AdamW state),
then *split* for another layout (:func:`split_checkpoint` / :func:`iter_split_checkpoint`) and written atomically
(:func:`write_checkpoint`). :func:`convert_checkpoint` does all three; ``tools/checkpoint/hybrid_conversion.py`` is a
thin command line over it, and the training code can reshard on load with :func:`gather_checkpoint` +
:func:`build_rank_file`.

Every tensor-parallel split comes from :mod:`megatron.core.tensor_parallel.sharding` (``tp_split_rule``,
``shard_tensor``, ``merge_shards``), legacy key spellings are upgraded with
:func:`~megatron.core.models.hybrid.state_dict_compat.upgrade_state_dict`, and pipeline segments come from
:func:`~megatron.core.models.hybrid.hybrid_layer_allocation.pipeline_segments`. Problems with the checkpoint or the
requested layout raise :class:`ReshardError`, ``CheckpointError`` or ``UnknownTensorError``, each with a one-line
message.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron.core.models.hybrid.hybrid_layer_allocation import (
    ATTENTION,
    MAMBA,
    MLP,
    STAGE_BOUNDARY,
    pipeline_segments,
    resolve_hybrid_pattern,
    strip_stage_boundaries,
    validate_layer_pattern,
)
from megatron.core.models.hybrid.state_dict_compat import upgrade_state_dict
from megatron.core.tensor_parallel.sharding import (
    SplitRule,
    UnknownTensorError,
    merge_shards,
    shard_tensor,
    tp_split_rule,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.arguments import core_transformer_config_from_args
from megatron.training.checkpointing import (
    CHECKPOINT_VERSION,
    NEWER_ARG_DEFAULTS,
    TRACKER_FILENAME,
    CheckpointError,
    checkpoint_name,
    load_state,
    read_tracker,
)
from megatron.training.staging import staged_directory
from megatron.training.tokenizer import padded_vocab_size

__all__ = [
    "ConversionSummary", "FullCheckpoint", "Layout", "OptimizerState", "ReshardError", "build_rank_file",
    "convert_checkpoint", "gather_checkpoint", "iter_split_checkpoint", "resolve_layout", "split_checkpoint",
    "target_layout", "target_vocab", "validate_target", "write_checkpoint",
]

VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
# The last stage of a tied model holds a copy of the word embeddings (to compute logits), nothing else of the embedding.
TIED_COPY = "embedding.word_embeddings.weight"
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_CHUNK_KEY = re.compile(r"^model(\d+)$")
_CHUNK_NAME = re.compile(r"^model(\d+)\.(.+)$")
_SUBLAYER_SYMBOL = {"mixer": MAMBA, "self_attention": ATTENTION, "mlp": MLP}
_LAST_STAGE_PREFIXES = ("decoder.final_norm.", "output_layer.")
# Defaults of model arguments that checkpoints of older code may lack (the flag defaults of arguments.py).
_ARG_DEFAULTS: dict[str, Any] = {
    "normalization": "LayerNorm", "norm_epsilon": 1e-5, "add_bias_linear": True, "add_qkv_bias": False,
    "swiglu": False, "squared_relu": False, "hidden_dropout": 0.1, "attention_dropout": 0.1,
    "init_method_std": 0.02, "mamba_version": 2, "mamba_state_dim": 128, "mamba_head_dim": 64,
    "mamba_num_groups": 8, "mamba_num_heads": None, "rotary_base": 10000, "rotary_percent": 1.0,
    "num_query_groups": None, "kv_channels": None,
    "ffn_hidden_size": None, "num_attention_heads": 0, "hybrid_attention_ratio": 0.0, "hybrid_mlp_ratio": 0.0,
    "hybrid_override_pattern": None, "hybrid_layer_pattern": None, "num_layers": None,
    "make_vocab_size_divisible_by": 128, "untie_embeddings_and_output_weights": False,
    "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "sequence_parallel": False,
    **NEWER_ARG_DEFAULTS,  # also filled in by load_state; repeated so args given directly are completed too
}


class ReshardError(ValueError):
    """A checkpoint that cannot be resharded as asked, or an impossible target layout (one-line message)."""


@dataclass(frozen=True)
class Layout:
    """A parallel layout: tensor size, pipeline size, model chunks per pipeline rank (None: not interleaved) and the
    layer pattern (with ``|`` where stages are marked)."""

    tp: int
    pp: int
    vpp: int | None
    pattern: str

    @property
    def num_stages(self) -> int:
        """Virtual pipeline stages (``pp * vpp``)."""
        return self.pp * (self.vpp or 1)

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline rank."""
        return self.vpp or 1

    def segments(self) -> list[str]:
        """The layer symbols of each virtual stage, in order."""
        return pipeline_segments(self.pattern, self.num_stages)

    def offsets(self) -> list[int]:
        """The global index of each virtual stage's first layer."""
        starts, total = [], 0
        for segment in self.segments():
            starts.append(total)
            total += len(segment)
        return starts

    def stage(self, pp_rank: int, chunk: int) -> int:
        """The virtual stage of ``chunk`` on pipeline rank ``pp_rank`` (``chunk * pp + pp_rank``)."""
        return chunk * self.pp + pp_rank

    def describe(self) -> str:
        """``tp 2 x pp 2`` (``x vpp 2`` when interleaved)."""
        return f"tp {self.tp} x pp {self.pp}" + (f" x vpp {self.vpp}" if self.vpp else "")


@dataclass
class OptimizerState:
    """Full-size AdamW state by global parameter name: the hyper-parameters of each group (a template with
    ``params`` / ``param_names`` left empty), the group of each parameter, and each parameter's state."""

    groups: list[dict[str, Any]]
    group_of: dict[str, int]
    state: dict[str, dict[str, Any]]


@dataclass
class FullCheckpoint:
    """One checkpoint gathered to full-size tensors with global layer indices, in model order."""

    directory: Path
    iteration: int | str  # the tracker's value: an int or "release"
    file_iteration: int  # the ``iteration`` stored in the files
    args: argparse.Namespace  # the saved args, unchanged
    config: TransformerConfig  # full sizes, for the split rules
    layout: Layout
    tensors: dict[str, torch.Tensor]
    optimizer: OptimizerState | None
    has_optimizer: bool  # whether the source files hold optimizer state (gathered or not)
    extras: dict[str, Any]  # other entries of the first file (opt_param_scheduler, grad_scaler, ...)
    rng_states: dict[tuple[int, int], Any]
    shard_shapes: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)  # per source tp rank
    source_stage: dict[str, int] = field(default_factory=dict)  # virtual stage of each tensor in the source

    @property
    def tied(self) -> bool:
        """Whether the output layer shares the word embeddings."""
        return not getattr(self.args, "untie_embeddings_and_output_weights", False)

    @property
    def padded_vocab(self) -> int:
        """Rows of the (padded) word-embedding table."""
        return int(self.tensors["embedding.word_embeddings.weight"].shape[0])

    @property
    def true_vocab_size(self) -> int | None:
        """The unpadded vocabulary size recorded in the args, if any."""
        return getattr(self.args, "true_vocab_size", None)


@dataclass(frozen=True)
class ConversionSummary:
    """What :func:`convert_checkpoint` did."""

    source: Layout
    target: Layout
    source_iteration: int | str
    target_iteration: int | str
    files: int
    tensors: int
    parameters: int
    source_vocab: int
    target_vocab: int
    optimizer_kept: bool
    save_dir: Path

    def line(self) -> str:
        """A one-line description."""
        return (f"converted iteration {self.source_iteration} ({self.source.describe()}) to "
                f"{self.target_iteration} ({self.target.describe()}): {self.files} files, {self.tensors} tensors, "
                f"{self.parameters:,} parameters, padded vocabulary {self.source_vocab} -> {self.target_vocab}, "
                f"optimizer state {'kept' if self.optimizer_kept else 'dropped'}; written to {self.save_dir}")


# ----------------------------------------------------------------------------------------------------------- layout

def resolve_layout(tp: int, pp: int, vpp: int | None, pattern: str, *, flags: tuple[str, str, str] = (
        "--target-tp-size", "--target-pp-size", "--target-virtual-pipeline-size")) -> Layout:
    """Check a layout and fill in ``vpp``: a pattern with ``|`` segments fixes the stages (``pp * vpp`` of them; vpp
    is inferred when None); without ``|`` the layers split evenly into ``pp * vpp`` stages, and an interleaved
    layout gets the ``|`` written into its pattern (the training arguments derive the chunk count from them).
    ``flags`` name the sizes in messages."""
    tp_flag, pp_flag, vpp_flag = flags
    for flag, value in ((tp_flag, tp), (pp_flag, pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ReshardError(f"{flag} must be a positive integer, got {value!r}")
    if vpp is not None and (isinstance(vpp, bool) or not isinstance(vpp, int) or vpp < 1):
        raise ReshardError(f"{vpp_flag} must be a positive integer, got {vpp!r}")
    validate_layer_pattern(pattern)
    if STAGE_BOUNDARY in pattern:
        count = len(pattern.split(STAGE_BOUNDARY))
        if vpp is None:
            if count % pp:
                raise ReshardError(f"layer pattern {pattern!r} has {count} pipeline segments, not a multiple of "
                                   f"{pp_flag} {pp}")
            vpp = count // pp
        elif count != pp * vpp:
            raise ReshardError(f"layer pattern {pattern!r} has {count} pipeline segments but {pp_flag} {pp} x "
                               f"{vpp_flag} {vpp} needs {pp * vpp}")
    else:
        stages = pp * (vpp or 1)
        layers = len(pattern)
        if layers % stages:
            raise ReshardError(f"{layers} layers do not split evenly into {stages} pipeline stages; mark the "
                               "stages with '|' in the layer pattern (--target-layer-pattern)")
        if (vpp or 1) > 1:
            size = layers // stages
            pattern = STAGE_BOUNDARY.join(pattern[i:i + size] for i in range(0, layers, size))
    return Layout(tp, pp, vpp if vpp and vpp > 1 else None, pattern)


def _source_pattern(args: argparse.Namespace) -> str:
    """The saved model's layer pattern, from any of the three ways of giving it."""
    layer_pattern = getattr(args, "hybrid_layer_pattern", None)
    if layer_pattern is not None:
        return layer_pattern
    try:
        return resolve_hybrid_pattern(
            num_layers=getattr(args, "num_layers", None),
            attention_ratio=getattr(args, "hybrid_attention_ratio", 0.0) or 0.0,
            mlp_ratio=getattr(args, "hybrid_mlp_ratio", 0.0) or 0.0,
            override_pattern=getattr(args, "hybrid_override_pattern", None))
    except ValueError as error:
        raise ReshardError(f"cannot tell the checkpoint's layer pattern: {error}; give --hybrid-layer-pattern") \
            from None


def _complete_args(saved: argparse.Namespace, overrides: dict[str, Any] | None) -> argparse.Namespace:
    """A copy of the saved args with overrides for missing fields and the derived values the model config needs.
    An override that contradicts a saved value is an error."""
    merged = dict(_ARG_DEFAULTS)
    merged.update({k: v for k, v in vars(saved).items() if v is not None or k not in merged})
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        saved_value = getattr(saved, name, None)
        if saved_value is not None and saved_value != value:
            raise ReshardError(f"--{name.replace('_', '-')} {value} disagrees with the checkpoint's {name} "
                               f"{saved_value}")
        merged[name] = value
    args = argparse.Namespace(**merged)
    args.hybrid_layer_pattern = _source_pattern(args)
    layers = len(strip_stage_boundaries(args.hybrid_layer_pattern))
    if args.num_layers is not None and args.num_layers != layers:
        raise ReshardError(f"num_layers {args.num_layers} disagrees with the layer pattern "
                           f"{args.hybrid_layer_pattern!r} ({layers} layers)")
    args.num_layers = layers
    if args.hidden_size is None:
        raise ReshardError("the checkpoint's args lack hidden_size; give --hidden-size")
    if not isinstance(getattr(args, "params_dtype", None), torch.dtype):
        args.params_dtype = torch.float32
    if ATTENTION in args.hybrid_layer_pattern and not args.num_attention_heads:
        raise ReshardError("the checkpoint's args lack num_attention_heads; give --num-attention-heads")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = (int((4 * args.hidden_size * 2 / 3) / 64) * 64 if args.swiglu
                                else 4 * args.hidden_size)
    return args


def _model_config(args: argparse.Namespace) -> TransformerConfig:
    """The full-size config of the saved model (the split rules need only full sizes)."""
    try:
        return core_transformer_config_from_args(args)
    except (ValueError, AttributeError) as error:
        raise ReshardError(f"the checkpoint's args do not describe a valid model: {error}") from None


# ----------------------------------------------------------------------------------------------------------- reading

def _read_file(path: Path) -> dict[str, Any]:
    """One rank's file; accepts the ``model0``, ``model1``, ... entries of an interleaved pipeline rank."""
    try:
        return load_state(path)
    except CheckpointError as error:
        if "has no 'model' entry" not in str(error):
            raise
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model0" not in state:
        raise CheckpointError(f"checkpoint {path} has no 'model' (or 'model0') entry")
    return state


def _file_chunks(state: dict[str, Any], path: Path) -> list[dict[str, torch.Tensor]]:
    """The state dict of each model chunk in a file, in chunk order."""
    if "model" in state:
        return [state["model"]]
    numbers = sorted(int(m[1]) for m in map(_CHUNK_KEY.match, state) if m)
    if numbers != list(range(len(numbers))):
        raise CheckpointError(f"checkpoint {path} holds model chunks {numbers}, not 0..{len(numbers) - 1}")
    return [state[f"model{n}"] for n in numbers]


def _storage_id(value: Any) -> tuple[int, int] | None:
    if not isinstance(value, torch.Tensor) or value.numel() == 0:
        return None
    return value.untyped_storage().data_ptr(), value.storage_offset()


def _upgrade(chunk: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``upgrade_state_dict`` applied to a copy, keeping each renamed tensor at its old key's position; returns the
    upgraded dict and the renames (old key -> new key)."""
    upgraded = dict(chunk)
    try:
        upgrade_state_dict(upgraded)
    except KeyError as error:
        raise CheckpointError(f"checkpoint {path}: {error.args[0]}") from None
    added = {_storage_id(v): k for k, v in upgraded.items() if k not in chunk}
    ordered: dict[str, torch.Tensor] = {}
    renames: dict[str, str] = {}
    for key, value in chunk.items():
        if key in upgraded:
            ordered[key] = upgraded[key]
        elif (new := added.get(_storage_id(value))) is not None:
            ordered[new] = upgraded[new]
            renames[key] = new
    ordered.update({k: v for k, v in upgraded.items() if k not in ordered})
    return ordered, renames


def _locate_first_file(directory: Path, iteration: int | str) -> tuple[Path, bool]:
    """The file of rank (0, 0) and whether the layout is pipeline-parallel (folder ``mp_rank_00_000``)."""
    for pipelined in (False, True):
        path = checkpoint_name(directory, iteration, 0, 0, pipelined)
        if path.exists():
            return path, pipelined
    raise CheckpointError(f"missing rank file {checkpoint_name(directory, iteration, 0, 0, False)} (nor "
                          f"{checkpoint_name(directory, iteration, 0, 0, True).parent.name}/ for a pipelined run)")


def _source_layout(args: argparse.Namespace, first: dict[str, Any], first_path: Path) -> Layout:
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    chunks = len(_file_chunks(first, first_path))
    if vpp is None and chunks > 1:
        vpp = chunks
    try:
        layout = resolve_layout(tp, pp, vpp, args.hybrid_layer_pattern, flags=(
            "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size"))
    except ValueError as error:
        raise CheckpointError(f"checkpoint {first_path}: its args are inconsistent: {error}") from None
    if layout.chunks != chunks:
        raise CheckpointError(f"checkpoint {first_path} holds {chunks} model chunk(s) but its args give "
                              f"{layout.chunks} per pipeline rank")
    return layout


def _globalize(local: str, stage: int, layout: Layout, segments: list[str], offsets: list[int], tied: bool,
               path: Path) -> str | None:
    """The global key of a stage-local key; None for the tied embedding copy of a later stage (``embedding.*``,
    or Megatron's ``output_layer.weight`` on the last stage of a tied model)."""
    match = _LAYER_KEY.match(local)
    if match is None:
        if local.startswith("embedding."):
            return local if stage == 0 else None
        if tied and local == "output_layer.weight" and stage > 0:
            return None
        if local.startswith(_LAST_STAGE_PREFIXES) and stage != layout.num_stages - 1:
            raise CheckpointError(f"checkpoint {path}: {local!r} belongs on the last pipeline stage, found on "
                                  f"stage {stage}")
        return local
    index, rest = int(match[1]), match[2]
    segment = segments[stage]
    if index >= len(segment):
        raise CheckpointError(f"checkpoint {path}: {local!r} is beyond stage {stage}'s {len(segment)} layers "
                              f"({segment!r})")
    symbol = _SUBLAYER_SYMBOL.get(rest.split(".", 1)[0])
    global_index = offsets[stage] + index
    if symbol is not None and symbol != segment[index]:
        raise CheckpointError(f"checkpoint {path}: {local!r} (global layer {global_index}) is a "
                              f"{rest.split('.', 1)[0]} tensor but the layer pattern has {segment[index]!r} there")
    return f"decoder.layers.{global_index}.{rest}"


def _check_placement(key: str) -> None:
    """Tensors outside the embedding, the layers, the final norm and the output layer have no home in a layout."""
    if not (key.startswith(("embedding.", "decoder.layers.")) or key.startswith(_LAST_STAGE_PREFIXES)):
        raise UnknownTensorError(f"unknown tensor {key!r}: not part of a hybrid model's embedding, layers, final "
                                 "norm or output layer")


def _merge(key: str, shards: list[torch.Tensor], rule: SplitRule) -> torch.Tensor:
    try:
        return merge_shards(shards, rule)
    except (RuntimeError, ValueError) as error:
        shapes = [tuple(s.shape) for s in shards]
        raise CheckpointError(f"cannot merge the shards {shapes} of {key!r}: {str(error).splitlines()[0]}") \
            from None


def _optimizer_entries(state: dict[str, Any], renames: list[dict[str, str]], chunked: bool,
                       path: Path) -> tuple[dict[tuple[int, str], tuple[int, dict[str, Any]]], list[dict]] | None:
    """Per (chunk, local key): (group index, per-parameter state); and the group templates. None without state
    or without ``param_names`` (which the gather needs)."""
    optimizer = state.get("optimizer")
    if not optimizer or "param_groups" not in optimizer:
        return None
    entries: dict[tuple[int, str], tuple[int, dict[str, Any]]] = {}
    templates = []
    for group_index, group in enumerate(optimizer["param_groups"]):
        names = group.get("param_names")
        if names is None or len(names) != len(group["params"]):
            return None
        templates.append(dict(group) | {"params": [], "param_names": []})
        for index, name in zip(group["params"], names, strict=True):
            chunk, local = 0, name
            if chunked:
                match = _CHUNK_NAME.match(name)
                if match is None:
                    raise CheckpointError(f"checkpoint {path}: optimizer parameter {name!r} has no model<N>. prefix")
                chunk, local = int(match[1]), match[2]
            if chunk >= len(renames):
                raise CheckpointError(f"checkpoint {path}: optimizer parameter {name!r} names a missing chunk")
            local = renames[chunk].get(local, local)
            entries[(chunk, local)] = (group_index, optimizer["state"].get(index, {}))
    return entries, templates


def _merge_param_state(key: str, states: list[dict[str, Any]], shard_shapes: list[torch.Size],
                       rule: SplitRule) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name, value in states[0].items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == shard_shapes[0]:
            merged[name] = _merge(f"{key} (optimizer {name})", [s[name] for s in states], rule)
        else:
            merged[name] = value.clone() if isinstance(value, torch.Tensor) else value
    return merged


def _open_source(directory: Path, overrides: dict[str, Any] | None
                 ) -> tuple[FullCheckpoint, dict[tuple[int, int], Path], dict[str, Any]]:
    """An empty :class:`FullCheckpoint` with the source's args, config and layout, the path of every rank file
    (all checked to exist) and the already-read file of rank (0, 0)."""
    iteration = read_tracker(directory)
    if iteration is None:
        raise CheckpointError(f"no {TRACKER_FILENAME} in {directory}: not a checkpoint directory")
    first_path, pipelined = _locate_first_file(directory, iteration)
    first = _read_file(first_path)
    saved_args = first.get("args")
    if saved_args is None and not overrides:
        raise CheckpointError(f"checkpoint {first_path} has no saved args; give the model sizes on the command line")
    saved_args = saved_args if saved_args is not None else argparse.Namespace()
    args = _complete_args(saved_args, overrides)
    layout = _source_layout(args, first, first_path)
    if pipelined != (layout.pp > 1):
        raise CheckpointError(f"checkpoint {first_path}: folder naming does not match pipeline size {layout.pp}")
    paths = {(t, p): checkpoint_name(directory, iteration, t, p, layout.pp > 1)
             for p in range(layout.pp) for t in range(layout.tp)}
    for path in paths.values():
        if not path.exists():
            raise CheckpointError(f"missing rank file {path} (the checkpoint's args give {layout.describe()})")
    extras = {k: v for k, v in first.items() if k not in ("optimizer", "rng_state") and not _CHUNK_KEY.match(k)
              and k != "model"}
    full = FullCheckpoint(directory, iteration, int(first.get("iteration", 0) or 0), saved_args, _model_config(args),
                          layout, {}, None, False, extras, {})
    return full, paths, first


def _read_chunks(files: list[tuple[Path, dict[str, Any]]], layout: Layout
                 ) -> list[list[tuple[dict[str, torch.Tensor], dict[str, str]]]]:
    """Per file: each chunk's upgraded state dict and its key renames."""
    per_file = []
    for path, state in files:
        chunks = [_upgrade(chunk, path) for chunk in _file_chunks(state, path)]
        if len(chunks) != layout.chunks:
            raise CheckpointError(f"checkpoint {path} holds {len(chunks)} model chunk(s), expected {layout.chunks}")
        per_file.append(chunks)
    return per_file


def _read_optimizer_entries(files: list[tuple[Path, dict[str, Any]]], chunks_per_file: list[list[tuple[dict, dict]]],
                            layout: Layout, templates: list[dict] | None
                            ) -> tuple[list[dict[tuple[int, str], tuple[int, dict[str, Any]]]], list[dict]] | None:
    """The optimizer entries of each file of one pipeline rank and the group templates; None when some file has no
    usable optimizer state."""
    found = [_optimizer_entries(state, [renames for _, renames in chunks], layout.chunks > 1, path)
             for (path, state), chunks in zip(files, chunks_per_file, strict=True)]
    if any(entry is None for entry in found):
        return None
    templates = templates or found[0][1]
    if any(len(groups) != len(templates) for _, groups in found):
        raise CheckpointError(f"the optimizer states of {files[0][0].parent.name} and its peers have different "
                              "numbers of parameter groups")
    return [entries for entries, _ in found], templates


def gather_checkpoint(directory: str | Path, *, load_optimizer: bool = True,
                      overrides: dict[str, Any] | None = None, progress: bool = False) -> FullCheckpoint:
    """Read every rank file of the checkpoint the tracker of ``directory`` names and merge it into full tensors
    with global layer indices (legacy key spellings upgraded). With ``load_optimizer`` the per-parameter AdamW
    state is gathered too (when every file holds it, with ``param_names``). ``overrides`` fill model arguments that
    the saved args lack (``{"hidden_size": 2560, ...}``). Holds one pipeline rank's files at a time.

    Raises ``CheckpointError`` (missing tracker / file, inconsistent shards), ``UnknownTensorError`` (a tensor no
    split rule knows, named) or :class:`ReshardError`.
    """
    full, paths, first = _open_source(Path(directory), overrides)
    layout = full.layout
    segments, offsets = layout.segments(), layout.offsets()
    optimizer_parts: dict[str, tuple[int, dict[str, Any]]] = {}
    optimizer_ok, templates = load_optimizer, None
    bar = tqdm(total=len(paths), desc="reading rank files", unit="file", disable=not progress)
    for pp_rank in range(layout.pp):
        files = []
        for tp_rank in range(layout.tp):
            path = paths[(tp_rank, pp_rank)]
            files.append((path, first if (tp_rank, pp_rank) == (0, 0) else _read_file(path)))
            bar.update()
        full.rng_states.update({(t, pp_rank): state.get("rng_state") for t, (_, state) in enumerate(files)})
        full.has_optimizer = full.has_optimizer or any(state.get("optimizer") for _, state in files)
        chunks_per_file = _read_chunks(files, layout)
        found = _read_optimizer_entries(files, chunks_per_file, layout, templates) if optimizer_ok else None
        optimizer_ok = found is not None
        if found is not None:
            templates = found[1]
        for chunk in range(layout.chunks):
            dicts = [chunks[chunk][0] for chunks in chunks_per_file]
            _gather_stage(full, layout.stage(pp_rank, chunk), dicts, [p for p, _ in files], segments, offsets,
                          found[0] if found else None, chunk, optimizer_parts)
        del files, chunks_per_file, found
    bar.close()
    # Interleaved ranks were read rank by rank: put the tensors back in model (virtual stage) order.
    order = sorted(full.tensors, key=full.source_stage.__getitem__)
    full.tensors = {key: full.tensors[key] for key in order}
    _check_complete(full, segments)
    if optimizer_ok and templates is not None:
        full.optimizer = OptimizerState(templates, {k: g for k, (g, _) in optimizer_parts.items()},
                                        {k: s for k, (_, s) in optimizer_parts.items() if s})
    return full


def _gather_stage(full: FullCheckpoint, stage: int, dicts: list[dict[str, torch.Tensor]], paths: list[Path],
                  segments: list[str], offsets: list[int],
                  entries: list[dict[tuple[int, str], tuple[int, dict[str, Any]]]] | None, chunk: int,
                  optimizer_parts: dict[str, tuple[int, dict[str, Any]]]) -> None:
    """Merge one virtual stage's tensor-parallel shards (and optimizer state) into ``full``."""
    keys = list(dicts[0])
    for t, other in enumerate(dicts[1:], start=1):
        if set(other) != set(keys):
            extra = sorted(set(other) ^ set(keys))[0]
            raise CheckpointError(f"tensor {extra!r} is in only some of the tensor-parallel files of stage {stage} "
                                  f"({paths[0].parent.name} vs {paths[t].parent.name})")
    for local in keys:
        key = _globalize(local, stage, full.layout, segments, offsets, full.tied, paths[0])
        if key is None:
            continue
        _check_placement(key)
        rule = tp_split_rule(key, full.config)
        shards = [d[local] for d in dicts]
        full.tensors[key] = _merge(key, shards, rule)
        full.shard_shapes[key] = [tuple(s.shape) for s in shards]
        full.source_stage[key] = stage
        if entries is None or (chunk, local) not in entries[0]:
            continue
        per_rank = [e.get((chunk, local)) for e in entries]
        if any(p is None or p[0] != per_rank[0][0] for p in per_rank):
            raise CheckpointError(f"the optimizer state of {key!r} differs in layout between tensor-parallel files")
        states = [p[1] for p in per_rank]
        merged = _merge_param_state(key, states, [s.shape for s in shards], rule) if states[0] else {}
        optimizer_parts[key] = (per_rank[0][0], merged)
    if entries is not None:
        known = {(chunk, k) for k in keys}
        stray = [name for name in entries[0] if name[0] == chunk and name not in known]
        if stray:
            raise CheckpointError(f"checkpoint {paths[0]}: optimizer state for {stray[0][1]!r}, which the model "
                                  "state lacks")


def _check_complete(full: FullCheckpoint, segments: list[str]) -> None:
    """Every layer of the pattern has tensors, and the embedding (and untied output layer) are present."""
    layers = {int(m[1]) for m in map(_LAYER_KEY.match, full.tensors) if m}
    pattern = "".join(segments)
    missing = [i for i in range(len(pattern)) if i not in layers]
    if missing:
        raise CheckpointError(f"the checkpoint has no tensors for layer {missing[0]} ({pattern[missing[0]]!r}) of "
                              f"the pattern {full.layout.pattern!r}")
    required = ["embedding.word_embeddings.weight"] + ([] if full.tied else ["output_layer.weight"])
    for key in required:
        if key not in full.tensors:
            raise CheckpointError(f"the checkpoint has no {key!r}")
    saved_padded = getattr(full.args, "padded_vocab_size", None)
    if saved_padded is not None and saved_padded != full.padded_vocab:
        raise CheckpointError(f"embedding.word_embeddings.weight has {full.padded_vocab} rows but the args say "
                              f"padded_vocab_size {saved_padded}")


# ------------------------------------------------------------------------------------------------------------ target

def target_layout(full: FullCheckpoint, tp: int, pp: int, vpp: int | None = None,
                  pattern: str | None = None) -> Layout:
    """The layout to write: ``pattern`` (which must hold the source's layers in the same order) or, by default,
    the source pattern (its ``|`` kept when they fit ``pp * vpp`` stages, else dropped for an even split)."""
    source_layers = strip_stage_boundaries(full.layout.pattern)
    if pattern is not None:
        try:
            validate_layer_pattern(pattern)
        except ValueError as error:
            raise ReshardError(f"--target-layer-pattern: {error}") from None
        if strip_stage_boundaries(pattern) != source_layers:
            raise ReshardError(f"--target-layer-pattern {pattern!r} has layers {strip_stage_boundaries(pattern)!r} "
                               f"but the checkpoint has {source_layers!r}")
        return resolve_layout(tp, pp, vpp, pattern)
    if vpp is None and pp == full.layout.pp:
        vpp = full.layout.vpp  # an unchanged pipeline keeps its interleaving
    source = full.layout.pattern
    if STAGE_BOUNDARY in source and len(source.split(STAGE_BOUNDARY)) != pp * (vpp or 1):
        source = source_layers  # the marked stages do not fit the new pipeline: split evenly
    return resolve_layout(tp, pp, vpp, source)


def target_vocab(full: FullCheckpoint, tp: int, true_vocab_size: int | None = None) -> tuple[int | None, int]:
    """(true vocabulary, padded size) for tensor-parallel size ``tp``: the true size is ``true_vocab_size``, else the
    args' ``true_vocab_size``, else unknown (then the source's padded size is padded up). A true size beyond the
    checkpoint's rows extends the vocabulary (the new rows are zeros)."""
    true_vocab = true_vocab_size if true_vocab_size is not None else full.true_vocab_size
    if true_vocab is not None and (isinstance(true_vocab, bool) or not isinstance(true_vocab, int) or true_vocab < 1):
        raise ReshardError(f"--true-vocab-size must be a positive integer, got {true_vocab!r}")
    divisible_by = getattr(full.args, "make_vocab_size_divisible_by", None) or 128
    base = true_vocab if true_vocab is not None else full.padded_vocab
    return true_vocab, padded_vocab_size(base, divisible_by, tp)


def validate_target(full: FullCheckpoint, layout: Layout) -> None:
    """Raise :class:`ReshardError` (or ``UnknownTensorError``) unless every tensor splits over ``layout.tp``."""
    tp, config, layers = layout.tp, full.config, strip_stage_boundaries(layout.pattern)
    checks: list[tuple[str, int]] = []
    if ATTENTION in layers:
        checks += [("num_attention_heads", config.num_attention_heads), ("num_query_groups", config.num_query_groups)]
    if MAMBA in layers:
        if config.mamba_version == 2:
            checks += [("mamba_num_heads", config.mamba_nheads), ("mamba_num_groups", config.mamba_num_groups)]
        else:
            checks += [("the Mamba1 inner width", config.mamba_d_inner)]
    if MLP in layers:
        checks.append(("ffn_hidden_size", config.ffn_hidden_size))
    for name, value in checks:
        if value % tp:
            raise ReshardError(f"--target-tp-size {tp} does not divide {name} {value}")
    for key, tensor in full.tensors.items():
        rule = tp_split_rule(key, config)
        if rule.dim is None or key in VOCAB_KEYS:
            continue
        for part in rule.parts or (tensor.shape[rule.dim],):
            if part % tp:
                raise ReshardError(f"--target-tp-size {tp} does not divide dimension {rule.dim} of {key!r} "
                                   f"(a component of size {part})")


def _target_args(full: FullCheckpoint, layout: Layout, true_vocab: int | None, padded: int,
                 reset_iterations: bool) -> argparse.Namespace:
    args = argparse.Namespace(**vars(full.args))
    args.tensor_model_parallel_size = layout.tp
    args.pipeline_model_parallel_size = layout.pp
    args.virtual_pipeline_model_parallel_size = layout.vpp
    args.hybrid_layer_pattern = layout.pattern
    args.num_layers = len(strip_stage_boundaries(layout.pattern))
    args.padded_vocab_size = padded
    if true_vocab is not None:
        args.true_vocab_size = true_vocab
    if isinstance(getattr(args, "data_parallel_size", None), int) and hasattr(args, "world_size"):
        args.world_size = layout.tp * layout.pp * args.data_parallel_size
    if layout.tp == 1 and getattr(args, "sequence_parallel", False):
        args.sequence_parallel = False
    if reset_iterations:
        args.consumed_train_samples = 0
        if hasattr(args, "consumed_valid_samples"):
            args.consumed_valid_samples = 0
    return args


def _resize_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` rows, with zero rows appended when the tensor is shorter."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    padding = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding])


def _repadded(full: FullCheckpoint, padded: int) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Shallow copies of the tensors and optimizer state with the vocabulary tensors (and their moments) resized."""
    tensors = dict(full.tensors)
    states = dict(full.optimizer.state) if full.optimizer is not None else {}
    for key in VOCAB_KEYS:
        if key not in tensors:
            continue
        shape = tensors[key].shape
        tensors[key] = _resize_rows(tensors[key], padded)
        if key in states:
            states[key] = {name: _resize_rows(value, padded) if isinstance(value, torch.Tensor)
                           and value.shape == shape else value for name, value in states[key].items()}
    return tensors, states


def _stage_keys(full: FullCheckpoint, layout: Layout, stage: int, keys: Iterable[str]) -> list[tuple[str, str]]:
    """(global key, stage-local key) of the tensors of virtual stage ``stage``, in model order."""
    offsets, segments = layout.offsets(), layout.segments()
    start, end = offsets[stage], offsets[stage] + len(segments[stage])
    last = stage == layout.num_stages - 1
    tied_copy = last and full.tied and layout.num_stages > 1
    placed = []
    for key in keys:
        match = _LAYER_KEY.match(key)
        if match is not None:
            index = int(match[1])
            if start <= index < end:
                placed.append((key, f"decoder.layers.{index - start}.{match[2]}"))
        elif key.startswith("embedding."):
            if stage == 0 or (tied_copy and key == TIED_COPY):
                placed.append((key, key))
        elif last:
            placed.append((key, key))
    return placed


def build_rank_file(full: FullCheckpoint, layout: Layout, tp_rank: int, pp_rank: int, *,
                    tensors: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, dict[str, Any]] | None = None, keep_optimizer: bool = False,
                    args: argparse.Namespace | None = None, iteration: int | None = None) -> dict[str, Any]:
    """The file dict of rank (``tp_rank``, ``pp_rank``) of ``layout``: ``model`` (or ``model0``, ...), the
    optimizer (resharded when ``keep_optimizer``), scheduler, grad scaler, RNG state, args, iteration and version.
    ``tensors`` / ``optimizer_state`` default to the (already re-padded) ones of ``full``; ``args`` to the saved
    ones. Call :func:`validate_target` first."""
    tensors = full.tensors if tensors is None else tensors
    if optimizer_state is None:
        optimizer_state = full.optimizer.state if full.optimizer is not None else {}
    file: dict[str, Any] = {}
    stages = []
    for chunk in range(layout.chunks):
        stage = layout.stage(pp_rank, chunk)
        placed = _stage_keys(full, layout, stage, tensors)
        model = {local: shard_tensor(tensors[key], tp_split_rule(key, full.config), tp_rank, layout.tp)
                 for key, local in placed}
        file["model" if layout.chunks == 1 else f"model{chunk}"] = model
        stages.append((chunk, stage, placed))
    keep = keep_optimizer and full.optimizer is not None
    file["optimizer"] = _rank_optimizer(full, layout, tp_rank, stages, tensors, optimizer_state) if keep else None
    file["opt_param_scheduler"] = full.extras.get("opt_param_scheduler") if keep else None
    file["grad_scaler"] = full.extras.get("grad_scaler") if keep else None
    same_layout = (layout.tp, layout.pp) == (full.layout.tp, full.layout.pp)
    file["rng_state"] = full.rng_states.get((tp_rank, pp_rank)) if keep and same_layout else None
    file["args"] = args if args is not None else full.args
    file["iteration"] = full.file_iteration if iteration is None else iteration
    file["checkpoint_version"] = CHECKPOINT_VERSION
    for key, value in full.extras.items():
        file.setdefault(key, value)
    return file


def _rank_optimizer(full: FullCheckpoint, layout: Layout, tp_rank: int,
                    stages: list[tuple[int, int, list[tuple[str, str]]]], tensors: dict[str, torch.Tensor],
                    optimizer_state: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """This rank's AdamW state dict: the source groups, parameters in model order, state indices 0..n-1."""
    source = full.optimizer
    names: list[list[tuple[str, str]]] = [[] for _ in source.groups]
    for chunk, _stage, placed in stages:
        for key, local in placed:
            if key not in source.group_of:
                continue
            name = f"model{chunk}.{local}" if layout.chunks > 1 else local
            names[source.group_of[key]].append((key, name))
    groups, state, index = [], {}, 0
    for template, members in zip(source.groups, names, strict=True):
        group = dict(template)
        group["params"] = list(range(index, index + len(members)))
        group["param_names"] = [name for _, name in members]
        for key, _ in members:
            if key in optimizer_state:
                state[index] = _shard_param_state(key, optimizer_state[key], tensors[key], full.config, tp_rank,
                                                  layout.tp)
            index += 1
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _shard_param_state(key: str, param_state: dict[str, Any], full_tensor: torch.Tensor, config: TransformerConfig,
                       tp_rank: int, tp: int) -> dict[str, Any]:
    rule = tp_split_rule(key, config)
    sharded: dict[str, Any] = {}
    for name, value in param_state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == full_tensor.shape:
            sharded[name] = shard_tensor(value, rule, tp_rank, tp)
        else:
            sharded[name] = value.clone() if isinstance(value, torch.Tensor) else value
    return sharded


def iter_split_checkpoint(full: FullCheckpoint, layout: Layout, *, keep_optimizer: bool = False,
                          true_vocab_size: int | None = None, reset_iterations: bool = False,
                          progress: bool = False) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
    """Validate ``layout`` for ``full`` (now, raising before anything is produced) and return an iterator of
    ``((tp_rank, pp_rank), file dict)`` for every rank, built one at a time (so that only one rank's shards are in
    memory besides the full tensors). The vocabulary is re-padded for the
    target tensor-parallel size; ``reset_iterations`` writes iteration 0 with ``consumed_train_samples`` 0."""
    if keep_optimizer and full.optimizer is None:
        reason = "has none" if not full.has_optimizer else "lacks param_names or was not gathered"
        raise ReshardError(f"cannot keep the optimizer state: the source checkpoint {reason}; "
                           "rerun without --keep-optimizer")
    validate_target(full, layout)
    true_vocab, padded = target_vocab(full, layout.tp, true_vocab_size)
    args = _target_args(full, layout, true_vocab, padded, reset_iterations)
    tensors, optimizer_state = _repadded(full, padded)
    iteration = 0 if reset_iterations else full.file_iteration
    ranks = [(t, p) for p in range(layout.pp) for t in range(layout.tp)]

    def files() -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
        for tp_rank, pp_rank in tqdm(ranks, desc="splitting", unit="rank", disable=not progress):
            yield (tp_rank, pp_rank), build_rank_file(full, layout, tp_rank, pp_rank, tensors=tensors,
                                                      optimizer_state=optimizer_state,
                                                      keep_optimizer=keep_optimizer, args=args, iteration=iteration)

    return files()


def split_checkpoint(full: FullCheckpoint, tp: int, pp: int, vpp: int | None = None, pattern: str | None = None,
                     *, keep_optimizer: bool = False, true_vocab_size: int | None = None,
                     reset_iterations: bool = False) -> dict[tuple[int, int], dict[str, Any]]:
    """Every rank file of the layout ``tp`` x ``pp`` (x ``vpp``; ``pattern`` as in :func:`target_layout`), keyed
    by ``(tp_rank, pp_rank)``. Holds all of them in memory: prefer :func:`iter_split_checkpoint` for big models."""
    layout = target_layout(full, tp, pp, vpp, pattern)
    return dict(iter_split_checkpoint(full, layout, keep_optimizer=keep_optimizer, true_vocab_size=true_vocab_size,
                                      reset_iterations=reset_iterations))


# ----------------------------------------------------------------------------------------------------------- writing

def _check_save_dir(save_dir: Path, load_dir: Path | None) -> None:
    if load_dir is not None and save_dir.resolve() == load_dir.resolve():
        raise ReshardError(f"--save-dir {save_dir} is the --load-dir: write the converted checkpoint elsewhere")
    if load_dir is not None and save_dir.resolve().is_relative_to(load_dir.resolve()):
        raise ReshardError(f"--save-dir {save_dir} is inside the --load-dir {load_dir}: write it elsewhere")
    if save_dir.exists() and (not save_dir.is_dir() or any(save_dir.iterdir())):
        raise ReshardError(f"--save-dir {save_dir} already exists and is not an empty directory")


def write_checkpoint(save_dir: str | Path, files: Iterable[tuple[tuple[int, int], dict[str, Any]]],
                     iteration: int | str, pipeline_parallel: bool) -> int:
    """Write the rank ``files`` (and the tracker, naming ``iteration``) into a temporary sibling of ``save_dir``
    that is renamed to ``save_dir`` once everything is written; on any error nothing is left behind.
    ``save_dir`` must not exist or be empty. Returns the number of files written."""
    save_dir = Path(save_dir)
    _check_save_dir(save_dir, None)
    count = 0
    with staged_directory(save_dir) as staging:
        for (tp_rank, pp_rank), state in files:
            path = checkpoint_name(staging, iteration, tp_rank, pp_rank, pipeline_parallel)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            count += 1
        (staging / TRACKER_FILENAME).write_text(str(iteration))
    return count


def convert_checkpoint(load_dir: str | Path, save_dir: str | Path, tp: int, pp: int, vpp: int | None = None,
                       pattern: str | None = None, *, keep_optimizer: bool = False, reset_iterations: bool = False,
                       true_vocab_size: int | None = None, overrides: dict[str, Any] | None = None,
                       progress: bool = False) -> ConversionSummary:
    """Gather the checkpoint of ``load_dir``, split it for ``tp`` x ``pp`` (x ``vpp``, ``pattern``) and write it to
    ``save_dir`` atomically (the source is only read). ``reset_iterations`` writes a ``release`` checkpoint at
    iteration 0. Everything is validated before the first file is written."""
    load_dir, save_dir = Path(load_dir), Path(save_dir)
    _check_save_dir(save_dir, load_dir)
    full = gather_checkpoint(load_dir, load_optimizer=keep_optimizer, overrides=overrides, progress=progress)
    layout = target_layout(full, tp, pp, vpp, pattern)
    _, padded = target_vocab(full, tp, true_vocab_size)
    files = iter_split_checkpoint(full, layout, keep_optimizer=keep_optimizer, true_vocab_size=true_vocab_size,
                                  reset_iterations=reset_iterations, progress=progress)
    iteration: int | str = "release" if reset_iterations else full.iteration
    count = write_checkpoint(save_dir, files, iteration, layout.pp > 1)
    parameters = sum(t.numel() for k, t in full.tensors.items() if k not in VOCAB_KEYS)
    parameters += sum(padded * full.tensors[k].shape[1] for k in VOCAB_KEYS if k in full.tensors)
    return ConversionSummary(full.layout, layout, full.iteration, iteration, count, len(full.tensors), parameters,
                             full.padded_vocab, padded, keep_optimizer, save_dir)
