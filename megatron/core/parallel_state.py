"""Tensor-, pipeline- and data-parallel process groups, with Megatron's rank order.

Global rank ``r`` of a world of ``tp * dp * pp`` processes sits at ``tp_rank = r % tp``,
``dp_rank = (r // tp) % dp``, ``pp_rank = r // (tp * dp)``: tensor-parallel ranks are neighbours (one node), then
data-parallel replicas, then pipeline stages. Before :func:`initialize_model_parallel` (or after
:func:`destroy_model_parallel`) every query answers as for a single process, so single-process code needs no branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


@dataclass
class _ParallelState:
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tensor_group: ProcessGroup
    pipeline_group: ProcessGroup
    data_group: ProcessGroup
    model_group: ProcessGroup  # tensor x pipeline: the ranks holding one full model replica
    embedding_group: ProcessGroup | None  # first and last pipeline stage, for tied embeddings
    pipeline_ranks: list[int]
    virtual_pipeline_size: int | None


_STATE: _ParallelState | None = None


def rank_coordinates(rank: int, tp: int, dp: int) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) of a global rank in Megatron's order."""
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
) -> None:
    """Create the process groups on an initialised ``torch.distributed`` world; every rank must call it.

    Raises ``ValueError`` when the world size is not ``tp x pp x dp``.
    """
    global _STATE
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before initialize_model_parallel")
    world, rank = dist.get_world_size(), dist.get_rank()
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor-parallel size {tp} x pipeline-parallel "
                         f"size {pp}")
    dp = world // (tp * pp)
    tp_rank, dp_rank, pp_rank = rank_coordinates(rank, tp, dp)

    def index(t: int, d: int, p: int) -> int:
        return t + tp * (d + dp * p)

    # new_group must be called by every rank for every group, in the same order.
    mine: dict[str, ProcessGroup] = {}
    for p in range(pp):
        for d in range(dp):
            ranks = [index(t, d, p) for t in range(tp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine["tensor"] = group
    for p in range(pp):
        for t in range(tp):
            ranks = [index(t, d, p) for d in range(dp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine["data"] = group
    pipeline_ranks: list[int] = []
    embedding_group = None
    for d in range(dp):
        for t in range(tp):
            ranks = [index(t, d, p) for p in range(pp)]
            group = dist.new_group(ranks)
            ends = sorted({ranks[0], ranks[-1]})
            embedding = dist.new_group(ends)
            if rank in ranks:
                mine["pipeline"], pipeline_ranks = group, ranks
                embedding_group = embedding if rank in ends else None
    for d in range(dp):
        ranks = [index(t, d, p) for p in range(pp) for t in range(tp)]
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["model"] = group
    _STATE = _ParallelState(tp, pp, dp, tp_rank, pp_rank, dp_rank, mine["tensor"], mine["pipeline"], mine["data"],
                            mine["model"], embedding_group, pipeline_ranks, virtual_pipeline_model_parallel_size)


def model_parallel_is_initialized() -> bool:
    """Whether :func:`initialize_model_parallel` has run (and not been undone)."""
    return _STATE is not None


def destroy_model_parallel() -> None:
    """Forget the groups (the ``torch.distributed`` world itself is left to its owner)."""
    global _STATE
    _STATE = None


def get_tensor_model_parallel_group() -> ProcessGroup | None:
    """The tensor-parallel group of this rank (None when not initialised)."""
    return _STATE.tensor_group if _STATE else None


def get_tensor_model_parallel_world_size() -> int:
    """Number of ranks a layer is split over."""
    return _STATE.tp if _STATE else 1


def get_tensor_model_parallel_rank() -> int:
    """This rank's index within its tensor-parallel group."""
    return _STATE.tp_rank if _STATE else 0


def get_pipeline_model_parallel_group() -> ProcessGroup | None:
    """The pipeline group of this rank (None when not initialised)."""
    return _STATE.pipeline_group if _STATE else None


def get_pipeline_model_parallel_world_size() -> int:
    """Number of pipeline stages (physical ranks, not virtual stages)."""
    return _STATE.pp if _STATE else 1


def get_pipeline_model_parallel_rank() -> int:
    """This rank's pipeline stage."""
    return _STATE.pp_rank if _STATE else 0


def get_virtual_pipeline_model_parallel_world_size() -> int | None:
    """Model chunks per pipeline rank for the interleaved schedule (None when not interleaved)."""
    return _STATE.virtual_pipeline_size if _STATE else None


def get_pipeline_model_parallel_ranks() -> list[int]:
    """Global ranks of this rank's pipeline, stage 0 first."""
    return _STATE.pipeline_ranks if _STATE else [0]


def is_pipeline_first_stage() -> bool:
    """Whether this rank holds the first pipeline stage (the embedding)."""
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    """Whether this rank holds the last pipeline stage (final norm, output layer and loss)."""
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def get_data_parallel_group() -> ProcessGroup | None:
    """The data-parallel group of this rank (None when not initialised)."""
    return _STATE.data_group if _STATE else None


def get_data_parallel_world_size() -> int:
    """Number of model replicas."""
    return _STATE.dp if _STATE else 1


def get_data_parallel_rank() -> int:
    """This rank's replica index."""
    return _STATE.dp_rank if _STATE else 0


def get_model_parallel_group() -> ProcessGroup | None:
    """The tensor x pipeline group holding one full model replica (gradient norms are summed over it)."""
    return _STATE.model_group if _STATE else None


def get_embedding_group() -> ProcessGroup | None:
    """First and last pipeline stage of this pipeline (None on middle stages, or without pipelining)."""
    return _STATE.embedding_group if _STATE and _STATE.pp > 1 else None
