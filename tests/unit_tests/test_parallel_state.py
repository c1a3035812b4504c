"""Process groups in Megatron's rank order, checked on 8 local gloo processes (TP2 x DP2 x PP2)."""

from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron.core import parallel_state as ps


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_groups(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with pytest.raises(ValueError, match="world size 8 is not divisible by tensor-parallel size 3"):
            ps.initialize_model_parallel(3, 1)
        ps.initialize_model_parallel(2, 2)
        tp, dp, pp = rank % 2, (rank // 2) % 2, rank // 4
        assert (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
                ps.get_pipeline_model_parallel_rank()) == (tp, dp, pp)
        assert (ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size(),
                ps.get_pipeline_model_parallel_world_size()) == (2, 2, 2)
        assert ps.get_pipeline_model_parallel_ranks() == [tp + 2 * dp, tp + 2 * dp + 4]
        assert ps.is_pipeline_first_stage() == (pp == 0) and ps.is_pipeline_last_stage() == (pp == 1)

        def members(group: dist.ProcessGroup) -> list[int]:
            gathered: list[int] = [0] * dist.get_world_size(group)
            dist.all_gather_object(gathered, rank, group=group)
            return sorted(gathered)

        assert members(ps.get_tensor_model_parallel_group()) == [rank - tp, rank - tp + 1]
        assert members(ps.get_data_parallel_group()) == [tp + 4 * pp, tp + 2 + 4 * pp]
        assert members(ps.get_pipeline_model_parallel_group()) == ps.get_pipeline_model_parallel_ranks()
        assert members(ps.get_model_parallel_group()) == sorted([2 * dp, 2 * dp + 1, 2 * dp + 4, 2 * dp + 5])
        assert members(ps.get_embedding_group()) == ps.get_pipeline_model_parallel_ranks()
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def test_rank_order_tensor_then_data_then_pipeline():
    mp.spawn(_check_groups, args=(8, _free_port()), nprocs=8)


def test_single_process_defaults():
    assert not ps.model_parallel_is_initialized()
    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_tensor_model_parallel_group() is None
    assert ps.is_pipeline_first_stage() and ps.is_pipeline_last_stage() and ps.get_embedding_group() is None
    assert ps.rank_coordinates(13, tp=2, dp=3) == (1, 0, 2)
