"""Checkpoints in Megatron's legacy layout, written atomically and read back safely.

    DIR/latest_checkpointed_iteration.txt          the iteration (or "release")
    DIR/iter_{iteration:07d}/mp_rank_{tp:02d}/model_optim_rng.pt            (pipeline size 1)
    DIR/iter_{iteration:07d}/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt   (pipeline size > 1)

Each file is a dict: ``model``, ``optimizer``, ``opt_param_scheduler``, ``rng_state``, ``args``, ``iteration``,
``checkpoint_version`` (3.0). A save goes to a temporary directory that is renamed into place, and the tracker file is
replaced last, so an interrupted save leaves the previous checkpoint and tracker untouched.
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

CHECKPOINT_VERSION = 3.0
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
# Model-defining arguments that must agree between a checkpoint and the run loading it.
ARCHITECTURE_ARGS = ("hybrid_layer_pattern", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "kv_channels", "mamba_state_dim", "mamba_head_dim", "mamba_num_groups",
                     "mamba_num_heads", "mamba_version", "padded_vocab_size", "normalization", "swiglu",
                     "position_embedding_type", "untie_embeddings_and_output_weights")


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
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])


def save_checkpoint(directory: str | Path, iteration: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, scheduler: Any | None, args: argparse.Namespace,
                    tp_rank: int = 0, pp_rank: int = 0, grad_scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write this rank's checkpoint for ``iteration`` and point the tracker at it; returns the file written.

    The file is written inside ``iter_XXXXXXX.tmp`` and the folder renamed when complete; the tracker is replaced
    atomically afterwards. A failure (full disk, crash) leaves the previous checkpoint and tracker as they were.
    """
    directory = Path(directory)
    pipeline_parallel = getattr(args, "pipeline_model_parallel_size", 1) > 1
    final = checkpoint_name(directory, iteration, tp_rank, pp_rank, pipeline_parallel)
    staging = final.parents[1].with_name(final.parents[1].name + ".tmp")
    staged_file = staging / final.parent.name / final.name
    shutil.rmtree(staging, ignore_errors=True)
    staged_file.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "opt_param_scheduler": scheduler.state_dict() if scheduler is not None else None,
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None and grad_scaler.is_enabled() else None,
        "rng_state": [get_rng_state()],
        "args": argparse.Namespace(**{k: v for k, v in vars(args).items() if _is_plain(v)}),
        "iteration": iteration,
        "checkpoint_version": CHECKPOINT_VERSION,
    }
    try:
        with open(staged_file, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if final.parents[1].exists():
            shutil.rmtree(final.parents[1])
        os.replace(staging, final.parents[1])
        _write_tracker(directory, iteration)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} has no 'model' entry")
    return state


def check_compatible(saved_args: argparse.Namespace | None, args: argparse.Namespace, path: Path) -> None:
    """Raise :class:`CheckpointError` naming every architecture argument on which the checkpoint and run differ."""
    if saved_args is None:
        return
    differences = [f"{name} {getattr(saved_args, name)!r} in the checkpoint vs {getattr(args, name)!r}"
                   for name in ARCHITECTURE_ARGS
                   if hasattr(saved_args, name) and hasattr(args, name)
                   and getattr(saved_args, name) != getattr(args, name)]
    if differences:
        raise CheckpointError(f"checkpoint {path} was made for a different model: " + "; ".join(differences))


def load_checkpoint(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any | None, args: argparse.Namespace, load_optim: bool = True,
                    load_rng: bool = True, tp_rank: int = 0, pp_rank: int = 0,
                    grad_scaler: torch.amp.GradScaler | None = None) -> tuple[int, dict[str, Any]]:
    """Load the tracked checkpoint of ``directory`` into model (and optimizer, scheduler, RNG when asked).

    Returns the iteration (0 for a release checkpoint) and the saved ``args`` as a dict. Architecture mismatches,
    a missing tracker or file, or unexpected tensors raise :class:`CheckpointError` before anything is modified.
    """
    iteration = read_tracker(directory)
    if iteration is None:
        raise CheckpointError(f"no {TRACKER_FILENAME} in {directory}: not a checkpoint directory")
    path = checkpoint_name(directory, iteration, tp_rank, pp_rank, getattr(args, "pipeline_model_parallel_size", 1) > 1)
    state = load_state(path)
    check_compatible(state.get("args"), args, path)
    try:
        model.load_state_dict(state["model"])
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
