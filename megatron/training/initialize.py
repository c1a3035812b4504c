"""Start and stop the distributed world of a training run: process group, model-parallel groups, device, seeds.

Launchers: ``torchrun`` sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``; a plain
``srun python ...`` (one task per GPU) is read from ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` with
``MASTER_ADDR`` / ``MASTER_PORT`` exported by the batch script. A single process needs no launcher at all.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron.core import parallel_state


def launcher_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else Slurm's, else a single process."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))


def initialize_distributed(args: argparse.Namespace) -> None:
    """Join the process group (when more than one process runs) and create the tensor/pipeline/data-parallel groups
    that ``args`` ask for. Sets ``args.rank`` and picks this process's GPU when CUDA is used."""
    rank, world, local_rank = launcher_environment()
    args.rank = rank
    if world > 1 and not dist.is_initialized():
        if args.distributed_backend == "nccl":
            torch.cuda.set_device(local_rank)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(args.distributed_backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(minutes=args.distributed_timeout_minutes))
    if dist.is_initialized():
        parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                                 args.virtual_pipeline_model_parallel_size)


def destroy_distributed() -> None:
    """Tear down the model-parallel groups and the process group (safe to call when none exist)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
