"""Legacy-layout checkpoints: round trip, atomicity under a failing save, and clear errors."""

import argparse
import random

import numpy as np
import pytest
import torch

from megatron.training import checkpointing
from megatron.training.checkpointing import CheckpointError, load_checkpoint, read_tracker, save_checkpoint

from ..models.helpers import tiny_model


def make_run(pattern: str = "M*-"):
    model = tiny_model(pattern)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 61, (2, 9)), labels=torch.randint(0, 61, (2, 9))).mean().backward()
    optimizer.step()
    args = argparse.Namespace(hybrid_layer_pattern=pattern, hidden_size=32, pipeline_model_parallel_size=1,
                              consumed_train_samples=64, params_dtype=torch.float32, data_path=["a", "b"])
    return model, optimizer, args


def test_round_trip_in_megatron_layout(tmp_path):
    model, optimizer, args = make_run()
    path = save_checkpoint(tmp_path, 7, model, optimizer, None, args)
    assert path == tmp_path / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "7"
    saved = torch.load(path, weights_only=False)
    assert {"model", "optimizer", "opt_param_scheduler", "rng_state", "args", "iteration",
            "checkpoint_version"} <= set(saved) and saved["checkpoint_version"] == 3.0
    expected_rng = (random.random(), np.random.rand(), torch.rand(1))

    fresh, fresh_optimizer, _ = make_run()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    iteration, saved_args = load_checkpoint(tmp_path, fresh, fresh_optimizer, None, args)
    assert iteration == 7 and saved_args["consumed_train_samples"] == 64
    for (name, value), other in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(value, other), name
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_rng
    torch.testing.assert_close(fresh_optimizer.state_dict(), optimizer.state_dict())


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, args = make_run()
    save_checkpoint(tmp_path, 5, model, optimizer, None, args)

    def full_disk(obj, handle):
        handle.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(tmp_path, 10, model, optimizer, None, args)
    monkeypatch.undo()
    assert read_tracker(tmp_path) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000005", "latest_checkpointed_iteration.txt"]
    fresh, _, _ = make_run()
    assert load_checkpoint(tmp_path, fresh, None, None, args)[0] == 5


def test_mismatched_and_corrupt_checkpoints_are_named(tmp_path):
    model, optimizer, args = make_run("M*-")
    path = save_checkpoint(tmp_path, 3, model, optimizer, None, args)
    other, _, other_args = make_run("MM-")
    with pytest.raises(CheckpointError, match="hybrid_layer_pattern 'M\\*-' in the checkpoint vs 'MM-'"):
        load_checkpoint(tmp_path, other, None, None, other_args)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path, model, None, None, args)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "empty", model, None, None, args)


def test_other_parallel_layout_is_refused_with_the_conversion_command(tmp_path):
    model, optimizer, args = make_run()
    args.tensor_model_parallel_size = 2  # as if saved by tensor-parallel rank 0 of two
    save_checkpoint(tmp_path, 4, model, optimizer, None, args)
    single = argparse.Namespace(**{**vars(args), "tensor_model_parallel_size": 1})
    with pytest.raises(CheckpointError, match="saved with tensor-parallel size 2 and pipeline-parallel size 1, this "
                                              "run uses 1 and 1: reshard it with tools/checkpoint/hybrid_conversion"):
        load_checkpoint(tmp_path, model, None, None, single)
