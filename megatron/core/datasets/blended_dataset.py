"""Megatron's weighted blend of several datasets with a deterministic greedy interleaving."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy
import torch

from megatron.core.datasets.gpt_sample_index import save_arrays


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Assign each of ``size`` samples to a dataset, Megatron's greedy way.

    Sample ``i`` goes to the dataset whose achieved count lags its target ``weight * max(i, 1)`` the most (the first
    such dataset on ties). Returns ``dataset_index`` int64 ``(size,)`` (which dataset) and ``dataset_sample_index``
    int64 ``(size,)`` (the sample's rank within that dataset).
    """
    w = [float(x) for x in weights]
    counts = [0] * len(w)
    dataset_index = numpy.empty(size, dtype=numpy.int64)
    dataset_sample_index = numpy.empty(size, dtype=numpy.int64)
    candidates = range(len(w))
    for i in range(size):
        target = float(max(i, 1))
        best = max(candidates, key=lambda d: w[d] * target - counts[d])  # max() keeps the first of equal keys
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Return ``weights`` scaled to sum to 1; each must be finite and > 0."""
    values = [float(w) for w in weights]
    if not values:
        raise ValueError("a blend needs at least one weight")
    if any(not (w > 0 and w != float("inf")) for w in values):
        raise ValueError(f"blend weights must be positive and finite, got {list(weights)}")
    total = sum(values)
    return [w / total for w in values]


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights`` (normalised), deterministically.

    Sample ``i`` is sample ``dataset_sample_index[i]`` of dataset ``dataset_index[i]`` (see
    :func:`build_blending_indices`); every dataset must hold enough samples for its share. The assignment depends only
    on the weights and ``size``; with ``cache_dir`` it is cached there (its pure-Python build takes ~1 s per million).
    """

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float], size: int,
                 cache_dir: str | None = None) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} blend weights")
        if size < 0:
            raise ValueError(f"blended dataset size must be >= 0, got {size}")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = self._blending_indices(cache_dir)
        for d, dataset in enumerate(self.datasets):
            needed = int(numpy.count_nonzero(self.dataset_index == d))
            if needed > len(dataset):
                raise ValueError(f"blended dataset {d} has {len(dataset)} samples but the blend needs {needed}")

    def _blending_indices(self, cache_dir: str | None) -> tuple[numpy.ndarray, numpy.ndarray]:
        if cache_dir is None:
            return build_blending_indices(self.weights, self.size)
        key = hashlib.md5(json.dumps({"weights": self.weights, "size": self.size}).encode()).hexdigest()
        paths = {name: os.path.join(cache_dir, f"{key}-BlendedDataset-{name}.npy")
                 for name in ("dataset_index", "dataset_sample_index")}
        if all(os.path.isfile(p) for p in paths.values()):
            return numpy.load(paths["dataset_index"], mmap_mode="r"), numpy.load(
                paths["dataset_sample_index"], mmap_mode="r")
        dataset_index, dataset_sample_index = build_blending_indices(self.weights, self.size)
        save_arrays({paths["dataset_index"]: dataset_index, paths["dataset_sample_index"]: dataset_sample_index})
        return dataset_index, dataset_sample_index

    def __len__(self) -> int:
        """Number of blended samples."""
        return self.size

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """Return blended sample ``idx``: the underlying dataset's sample dict."""
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blended dataset of {self.size} samples")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
