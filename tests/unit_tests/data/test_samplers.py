"""The pretraining sampler: a resumed run yields exactly the rest of an uninterrupted one, on every DP rank."""

import pytest

from megatron.core.datasets.samplers import MegatronPretrainingSampler


@pytest.mark.parametrize("dp_size", [1, 2, 3])
@pytest.mark.parametrize("micro_batch_size", [1, 4])
def test_resume_yields_the_tail(dp_size, micro_batch_size):
    total = 101
    step = micro_batch_size * dp_size
    full = {
        rank: list(MegatronPretrainingSampler(total, 0, micro_batch_size, rank, dp_size)) for rank in range(dp_size)
    }
    # Ranks together cover each index of every full step exactly once, in order.
    covered = sorted(i for rank in range(dp_size) for batch in full[rank] for i in batch)
    assert covered == list(range(total // step * step))
    for rank in range(dp_size):
        assert all(len(batch) == micro_batch_size for batch in full[rank])
        for k in range(len(full[rank]) + 1):
            if k * step >= total:
                break
            resumed = list(MegatronPretrainingSampler(total, k * step, micro_batch_size, rank, dp_size))
            assert resumed == full[rank][k:]


def test_rank_slices():
    batches = list(MegatronPretrainingSampler(12, 0, 2, data_parallel_rank=1, data_parallel_size=3))
    assert batches == [[2, 3], [8, 9]]
    tail = list(MegatronPretrainingSampler(13, 0, 2, 0, 3, drop_last=False))
    assert tail == [[0, 1], [6, 7], [12]]


def test_sampler_errors():
    with pytest.raises(ValueError, match="total_samples"):
        MegatronPretrainingSampler(0, 0, 1)
    with pytest.raises(ValueError, match="consumed_samples"):
        MegatronPretrainingSampler(10, 11, 1)
    assert list(MegatronPretrainingSampler(10, 10, 1)) == []
    with pytest.raises(ValueError, match="micro_batch_size"):
        MegatronPretrainingSampler(10, 0, 0)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        MegatronPretrainingSampler(10, 0, 1, data_parallel_rank=2, data_parallel_size=2)


def test_drives_a_dataloader():
    import torch

    from megatron.core.datasets.gpt_dataset import MockGPTDataset

    dataset = MockGPTDataset(20, 8, 50, seed=0)
    sampler = MegatronPretrainingSampler(len(dataset), 8, micro_batch_size=4)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    batches = list(loader)
    assert len(batches) == 3
    assert batches[0]["tokens"].shape == (4, 8) and batches[0]["loss_mask"].dtype == torch.float32
    assert batches[0]["tokens"].tolist() == [dataset[i]["tokens"].tolist() for i in range(8, 12)]
