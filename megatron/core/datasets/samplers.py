"""Megatron's sequential pretraining sampler: resumable micro-batches of sample indices per data-parallel rank."""

from __future__ import annotations

from collections.abc import Iterator


class MegatronPretrainingSampler:
    """Walk the sample indices ``consumed_samples .. total_samples - 1`` in order, in steps of
    ``micro_batch_size * data_parallel_size``; each step yields this rank's ``micro_batch_size`` indices (rank ``r``
    gets the ``r``-th slice of the step).

    Resuming with the ``consumed_samples`` of a checkpoint continues exactly where the interrupted run stopped: no
    sample is repeated or skipped (``consumed_samples == total_samples`` yields nothing).
    With ``drop_last`` (the default) a final incomplete step is dropped; otherwise each rank takes its slice of it
    (shorter, or empty and then not yielded).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise ValueError(f"no sample to consume: total_samples is {total_samples}")
        # consumed == total is a finished run resumed (for evaluation, say): it yields nothing.
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples ({consumed_samples}) must lie in [0, total_samples={total_samples}]")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank ({data_parallel_rank}) must lie in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        """Total number of samples of the underlying dataset (as in Megatron)."""
        return self.total_samples

    def _rank_slice(self, batch: list[int]) -> list[int]:
        start = self.data_parallel_rank * self.micro_batch_size
        return batch[start : start + self.micro_batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        """Yield this rank's micro-batches: lists of ``micro_batch_size`` sample indices."""
        step = self.micro_batch_times_data_parallel_size
        for start in range(self.consumed_samples, self.total_samples, step):
            batch = list(range(start, min(start + step, self.total_samples)))
            if len(batch) == step:
                yield self._rank_slice(batch)
            elif not self.drop_last:
                part = self._rank_slice(batch)
                if part:
                    yield part
