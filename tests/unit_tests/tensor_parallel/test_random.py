"""Dropout streams under model parallelism and initialisation independent of the tensor-parallel layout."""

from __future__ import annotations

import torch

from megatron.core.tensor_parallel.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    get_rng_tracker,
    model_parallel_manual_seed,
)


def test_fork_uses_its_own_stream_and_restores_the_default_one():
    tracker = RNGStatesTracker()
    tracker.add("stream", 5)
    torch.manual_seed(1)
    with tracker.fork("stream"):
        forked = torch.rand(3)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(forked, torch.rand(3))  # the stream was seeded 5
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(3))  # the default stream did not move
    with tracker.fork("stream"):
        assert not torch.equal(torch.rand(3), forked)  # the stream continues where it stopped


def test_fork_of_an_unknown_stream_is_a_no_op():
    torch.manual_seed(3)
    with RNGStatesTracker().fork("missing"):
        value = torch.rand(2)
    torch.manual_seed(3)
    assert torch.equal(value, torch.rand(2))


def test_model_parallel_seed_single_process():
    model_parallel_manual_seed(11)
    default = torch.rand(2)
    with get_rng_tracker().fork(MODEL_PARALLEL_RNG):
        tensor_stream = torch.rand(2)
    torch.manual_seed(11)
    assert torch.equal(default, torch.rand(2))
    torch.manual_seed(11 + 2718)
    assert torch.equal(tensor_stream, torch.rand(2))
    get_rng_tracker().states.clear()
