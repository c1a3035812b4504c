"""Checkpoints in Megatron's legacy layout, written atomically and read back safely.

    DIR/latest_checkpointed_iteration.txt          the iteration (or "release")
    DIR/iter_{iteration:07d}/mp_rank_{tp:02d}/model_optim_rng.pt            (pipeline size 1)
    DIR/iter_{iteration:07d}/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt   (pipeline size > 1)

Each file is a dict: ``model`` (or ``model0``, ``model1``, ... for the chunks of an interleaved pipeline rank),
``optimizer``, ``opt_param_scheduler``, ``rng_state``, ``args``, ``iteration``, ``checkpoint_version`` (3.0). Data-
parallel rank 0 of each tensor/pipeline position writes its file (the distributed optimizer's state gathered into it).
A save goes to a temporary directory that is renamed into place once every rank has written, and the tracker file is
replaced last, so an interrupted or failed save leaves the previous checkpoint and tracker untouched.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megatron.core import parallel_state
from megatron.core.models.hybrid.hybrid_layer_allocation import pipeline_segments, strip_stage_boundaries
from megatron.core.optimizer import optimizer_state_dict
from megatron.core.tensor_parallel.random import get_rng_tracker

CHECKPOINT_VERSION = 3.0
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
# Model-defining arguments that must agree between a checkpoint and the run loading it.
ARCHITECTURE_ARGS = ("hybrid_layer_pattern", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "kv_channels", "mamba_state_dim", "mamba_head_dim", "mamba_num_groups",
                     "mamba_num_heads", "mamba_kv_groups", "mamba_version", "mamba_expand", "padded_vocab_size",
                     "normalization", "swiglu", "position_embedding_type", "untie_embeddings_and_output_weights",
                     "use_rope_scaling", "rope_scaling_factor", "rope_scaling_low_freq_factor",
                     "rope_scaling_high_freq_factor", "rope_scaling_original_max_position_embeddings")


# Model arguments added after checkpoints were first written, with the value that reproduces the older behaviour.
NEWER_ARG_DEFAULTS = {
    "mamba_expand": 2, "mamba_kv_groups": None, "use_rope_scaling": False, "rope_scaling_factor": 8.0,
    "rope_scaling_low_freq_factor": 1.0, "rope_scaling_high_freq_factor": 4.0,
    "rope_scaling_original_max_position_embeddings": 8192,
}


def upgrade_saved_args(saved: argparse.Namespace) -> argparse.Namespace:
    """Give args saved by older code the arguments added since, at their old-behaviour values (in place)."""
    for name, value in NEWER_ARG_DEFAULTS.items():
        if not hasattr(saved, name):
            setattr(saved, name, value)
    return saved


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or made for a different model."""


def checkpoint_name(directory: str | Path, iteration: int | str, tp_rank: int = 0, pp_rank: int = 0,
                    pipeline_parallel: bool = False) -> Path:
    """The path of one rank's file for ``iteration`` (an int, or ``"release"``)."""
    folder = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    rank = f"mp_rank_{tp_rank:02d}_{pp_rank:03d}" if pipeline_parallel else f"mp_rank_{tp_rank:02d}"
    return Path(directory) / folder / rank / "model_optim_rng.pt"


def read_tracker(directory: str | Path) -> int | str | None:
    """The iteration named by the tracker file (``"release"`` for a release checkpoint), or None without one."""
    tracker = Path(directory) / TRACKER_FILENAME
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return text
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"tracker file {tracker} holds {text!r}, not an iteration number") from None


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch random states, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                         "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gauss)},
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": get_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`get_rng_state`."""
    version, internal, gauss = state["random_rng_state"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["np_rng_state"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["position"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch_rng_state"])
    get_rng_tracker().set_states(state.get("rng_tracker_states", {}))
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])


def model_state(chunks: list[nn.Module]) -> dict[str, Any]:
    """The ``model`` entry (one chunk) or ``model0``, ``model1``, ... entries (interleaved pipeline) of a file."""
    if len(chunks) == 1:
        return {"model": chunks[0].state_dict()}
    return {f"model{index}": chunk.state_dict() for index, chunk in enumerate(chunks)}


def _chunks(model: nn.Module | list[nn.Module]) -> list[nn.Module]:
    return model if isinstance(model, list) else [model]


def _all_ranks_succeeded(succeeded: bool) -> bool:
    if not dist.is_initialized():
        return succeeded
    verdicts: list[bool] = [False] * dist.get_world_size()
    dist.all_gather_object(verdicts, succeeded)
    return all(verdicts)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(directory: str | Path, iteration: int, model: nn.Module | list[nn.Module],
                    optimizer: torch.optim.Optimizer | None, scheduler: Any | None, args: argparse.Namespace,
                    grad_scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write this rank's share of the checkpoint for ``iteration`` and point the tracker at it; every rank calls
    it. Returns this rank's file path.

    Files are written inside ``iter_XXXXXXX.tmp``; once every rank has succeeded, global rank 0 renames the folder
    into place and replaces the tracker atomically. Any failure (full disk, a crash on one rank) leaves the previous
    checkpoint and tracker as they were and raises :class:`CheckpointError` on every rank.
    """
    directory = Path(directory)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pipelined = getattr(args, "pipeline_model_parallel_size", 1) > 1
    final = checkpoint_name(directory, iteration, tp_rank, pp_rank, pipelined)
    staging = final.parents[1].with_name(final.parents[1].name + ".tmp")
    optimizer_state = optimizer_state_dict(optimizer) if optimizer is not None else None  # collective under ZeRO
    global_rank_0 = not dist.is_initialized() or dist.get_rank() == 0
    if global_rank_0:
        shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    succeeded, error = True, None
    if parallel_state.get_data_parallel_rank() == 0:
        state = {
            **model_state(_chunks(model)),
            "optimizer": optimizer_state,
            "opt_param_scheduler": scheduler.state_dict() if scheduler is not None else None,
            "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None and grad_scaler.is_enabled() else None,
            "rng_state": [get_rng_state()],
            "args": argparse.Namespace(**{k: v for k, v in vars(args).items() if _is_plain(v)}),
            "iteration": iteration,
            "checkpoint_version": CHECKPOINT_VERSION,
        }
        try:
            staged_file = staging / final.parent.name / final.name
            staged_file.parent.mkdir(parents=True, exist_ok=True)
            with open(staged_file, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
        except Exception as caught:  # reported after every rank has had its say
            succeeded, error = False, caught
    if not _all_ranks_succeeded(succeeded):
        if global_rank_0:
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()
        detail = f": {error}" if error is not None else " on another rank"
        raise CheckpointError(f"saving the checkpoint of iteration {iteration} to {directory} failed{detail}")
    if global_rank_0:
        try:
            if final.parents[1].exists():
                shutil.rmtree(final.parents[1])
            os.replace(staging, final.parents[1])
            _write_tracker(directory, iteration)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    _barrier()
    return final


def _write_tracker(directory: Path, iteration: int) -> None:
    temporary = directory / (TRACKER_FILENAME + ".tmp")
    temporary.write_text(str(iteration))
    os.replace(temporary, directory / TRACKER_FILENAME)


def _is_plain(value: Any) -> bool:
    """Argument values that survive a ``weights_only`` load: no functions, no modules, no open files."""
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype))


def load_state(path: str | Path) -> dict[str, Any]:
    """Read one checkpoint file with ``weights_only=True`` (tensors, plain containers and ``argparse.Namespace``
    only); a missing or corrupt file raises :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(state, dict) or not ("model" in state or "model0" in state):
        raise CheckpointError(f"checkpoint {path} has no 'model' entry")
    if isinstance(state.get("args"), argparse.Namespace):
        upgrade_saved_args(state["args"])
    return state


def check_compatible(saved_args: argparse.Namespace | None, args: argparse.Namespace, path: Path) -> None:
    """Raise :class:`CheckpointError` naming every architecture argument on which the checkpoint and run differ."""
    if saved_args is None:
        return

    def value(source: argparse.Namespace, name: str) -> Any:
        found = getattr(source, name)
        # Where the '|' stage marks fall is a layout question (check_layout), not an architecture one.
        return strip_stage_boundaries(found) if name == "hybrid_layer_pattern" and found else found

    differences = [f"{name} {getattr(saved_args, name)!r} in the checkpoint vs {getattr(args, name)!r}"
                   for name in ARCHITECTURE_ARGS
                   if hasattr(saved_args, name) and hasattr(args, name)
                   and value(saved_args, name) != value(args, name)]
    if differences:
        raise CheckpointError(f"checkpoint {path} was made for a different model: " + "; ".join(differences))


def check_layout(saved_args: argparse.Namespace | None, args: argparse.Namespace, directory: Path) -> None:
    """Raise :class:`CheckpointError` when the checkpoint was saved at another tensor/pipeline layout."""
    if saved_args is None:
        return
    saved = (getattr(saved_args, "tensor_model_parallel_size", 1),
             getattr(saved_args, "pipeline_model_parallel_size", 1))
    wanted = (getattr(args, "tensor_model_parallel_size", 1), getattr(args, "pipeline_model_parallel_size", 1))
    if saved != wanted:
        raise CheckpointError(
            f"checkpoint {directory} was saved with tensor-parallel size {saved[0]} and pipeline-parallel size "
            f"{saved[1]}, this run uses {wanted[0]} and {wanted[1]}: reshard it with tools/checkpoint/"
            f"hybrid_conversion.py --load-dir {directory} --save-dir NEW_DIR --target-tp-size {wanted[0]} "
            f"--target-pp-size {wanted[1]}")
    saved_stages, stages = _stage_patterns(saved_args), _stage_patterns(args)
    if saved_stages and stages and saved_stages != stages:
        raise CheckpointError(
            f"checkpoint {directory} splits the layers into pipeline stages {'|'.join(saved_stages)}, this run into "
            f"{'|'.join(stages)}: pass --hybrid-layer-pattern '{'|'.join(saved_stages)}' or reshard it with "
            f"tools/checkpoint/hybrid_conversion.py --target-layer-pattern '{'|'.join(stages)}'")


def _stage_patterns(args: argparse.Namespace) -> list[str] | None:
    """The layer pattern of each (virtual) pipeline stage, or None without pipelining or a recorded pattern."""
    pattern, stages = getattr(args, "hybrid_layer_pattern", None), getattr(args, "pipeline_model_parallel_size", 1)
    if not pattern or stages == 1:
        return None
    try:
        return pipeline_segments(pattern, stages)
    except ValueError:
        return None


def load_checkpoint(directory: str | Path, model: nn.Module | list[nn.Module],
                    optimizer: torch.optim.Optimizer | None, scheduler: Any | None, args: argparse.Namespace,
                    load_optim: bool = True, load_rng: bool = True,
                    grad_scaler: torch.amp.GradScaler | None = None) -> tuple[int, dict[str, Any]]:
    """Load this rank's file of the tracked checkpoint of ``directory`` into the model chunks (and optimizer,
    scheduler, RNG when asked).

    Returns the iteration (0 for a release checkpoint) and the saved ``args`` as a dict. A different parallel
    layout, architecture mismatches, a missing tracker or file, or unexpected tensors raise :class:`CheckpointError`
    before anything is modified.
    """
    directory = Path(directory)
    iteration = read_tracker(directory)
    if iteration is None:
        raise CheckpointError(f"no {TRACKER_FILENAME} in {directory}: not a checkpoint directory")
    path = checkpoint_name(directory, iteration, parallel_state.get_tensor_model_parallel_rank(),
                           parallel_state.get_pipeline_model_parallel_rank(),
                           getattr(args, "pipeline_model_parallel_size", 1) > 1)
    state = load_state(path)
    check_layout(state.get("args"), args, directory)
    check_compatible(state.get("args"), args, path)
    chunks = _chunks(model)
    keys = ["model"] if len(chunks) == 1 else [f"model{index}" for index in range(len(chunks))]
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)} entry: it holds a different number "
                              "of model chunks than this run's virtual pipeline")
    try:
        for chunk, key in zip(chunks, keys, strict=True):
            chunk.load_state_dict(state[key])
    except RuntimeError as error:
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise CheckpointError(f"checkpoint {path} does not fit the model: {detail}") from None
    if load_optim and optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if load_optim and scheduler is not None and state.get("opt_param_scheduler") is not None:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if load_optim and grad_scaler is not None and state.get("grad_scaler") is not None:
        grad_scaler.load_state_dict(state["grad_scaler"])
    if load_rng and state.get("rng_state"):
        set_rng_state(state["rng_state"][0])
    saved_args = vars(state["args"]) if state.get("args") is not None else {}
    return (0 if iteration == "release" else iteration), saved_args
