"""GPT pretraining datasets: fixed-length token windows over an indexed dataset, mock data, and ``--data-path`` blends.

Every sample is a dict of ``seq_length``-long tensors: ``tokens`` (int64), ``labels`` (int64, ``tokens`` shifted by
one), ``loss_mask`` (float32 ones) and ``position_ids`` (int64, ``0 .. seq_length - 1``).
"""

from __future__ import annotations

import math
import os

import numpy
import torch

from megatron.core.datasets.blended_dataset import BlendedDataset, normalize_weights
from megatron.core.datasets.gpt_sample_index import build_sample_index, cache_key, cache_paths, load_cached, save_cached
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.splits import parse_split, split_document_ranges

__all__ = [
    "BlendedDataset",
    "GPTDataset",
    "MockGPTDataset",
    "build_gpt_datasets",
    "parse_blend",
    "parse_split",
    "split_document_ranges",
]

SPLIT_NAMES = ("train", "valid", "test")
# Megatron builds each blended component a little larger than its share so that rounding never runs it dry.
BLEND_OVERSAMPLING = 1.005


def _window_to_sample(window: numpy.ndarray, seq_length: int) -> dict[str, torch.Tensor]:
    """Turn ``seq_length + 1`` consecutive tokens into the sample dict."""
    window = torch.from_numpy(numpy.asarray(window, dtype=numpy.int64))
    return {
        "tokens": window[:-1].contiguous(),
        "labels": window[1:].contiguous(),
        "loss_mask": torch.ones(seq_length, dtype=torch.float32),
        "position_ids": torch.arange(seq_length, dtype=torch.int64),
    }


class GPTDataset(torch.utils.data.Dataset):
    """``num_samples`` windows of ``seq_length + 1`` consecutive tokens over the documents ``document_ids``.

    The documents (sequence indices of ``indexed``, shape ``(num_documents,)``) are concatenated in an order shuffled
    per epoch with ``numpy.random.RandomState(seed)``, over as many epochs as ``num_samples`` needs; samples are served
    in an order shuffled within each epoch. The index is cached in ``cache_dir`` (when given) under a hash of every
    parameter that affects it, and loaded from there on the next construction.
    """

    def __init__(self, indexed: IndexedDataset, document_ids: numpy.ndarray, num_samples: int, seq_length: int,
                 seed: int, cache_dir: str | None = None, name: str = "train") -> None:
        if seq_length <= 0:
            raise ValueError(f"seq_length must be > 0, got {seq_length}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        document_ids = numpy.asarray(document_ids, dtype=numpy.int64).reshape(-1)
        prefix = getattr(indexed, "path_prefix", "")
        if len(indexed) == 0:
            raise ValueError(f"indexed dataset {prefix} is empty")
        if len(document_ids) == 0 and num_samples > 0:
            raise ValueError(f"GPT dataset {name!r} of {prefix} has no documents for {num_samples} samples")
        if len(document_ids) and (document_ids.min() < 0 or document_ids.max() >= len(indexed)):
            raise ValueError(f"document ids must lie in [0, {len(indexed)}) for {prefix}")
        lengths = indexed.sequence_lengths
        if num_samples > 0 and int(numpy.asarray(lengths, dtype=numpy.int64)[document_ids].sum()) == 0:
            raise ValueError(f"GPT dataset {name!r} of {prefix} has no tokens in its {len(document_ids)} documents")

        self.indexed = indexed
        self.document_ids = document_ids
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.name = name
        self.cache_paths: dict[str, str] | None = None

        index = None
        if cache_dir is not None:
            key = cache_key(prefix, document_ids, num_samples, seq_length, seed, len(indexed),
                            int(numpy.asarray(lengths, dtype=numpy.int64).sum()))
            self.cache_paths = cache_paths(cache_dir, key, name)
            index = load_cached(self.cache_paths)
        self.loaded_from_cache = index is not None
        if index is None:
            index = build_sample_index(lengths, document_ids, num_samples, seq_length, seed)
            if self.cache_paths is not None:
                save_cached(self.cache_paths, index)
        self.document_index = index.document_index
        self.sample_index = index.sample_index
        self.shuffle_index = index.shuffle_index

    def __len__(self) -> int:
        """Number of samples (``num_samples``)."""
        return self.num_samples

    def window(self, idx: int) -> numpy.ndarray:
        """Return the ``seq_length + 1`` tokens of sample ``idx`` as int64, shape ``(seq_length + 1,)``."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.name} dataset of {self.num_samples} samples")
        position, offset = (int(v) for v in self.sample_index[int(self.shuffle_index[idx])])
        remaining = self.seq_length + 1
        pieces = []
        while remaining > 0:
            document = int(self.document_index[position])
            take = min(remaining, int(self.indexed.sequence_lengths[document]) - offset)
            if take > 0:
                pieces.append(self.indexed.get(document, offset=offset, length=take))
                remaining -= take
            position, offset = position + 1, 0
        return numpy.concatenate(pieces).astype(numpy.int64)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """Return sample ``idx``: ``tokens``/``labels``/``loss_mask``/``position_ids``, each ``(seq_length,)``."""
        return _window_to_sample(self.window(idx), self.seq_length)


class MockGPTDataset(torch.utils.data.Dataset):
    """``num_samples`` synthetic samples of uniform random ids in ``[0, vocab_size)``; sample ``i`` depends only on
    ``(seed, i)``, so the data is reproducible and independent of access order."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int) -> None:
        if num_samples < 0 or seq_length <= 0 or vocab_size <= 0:
            raise ValueError(
                f"mock data needs num_samples >= 0, seq_length > 0, vocab_size > 0; "
                f"got {num_samples}, {seq_length}, {vocab_size}"
            )
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self) -> int:
        """Number of samples."""
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """Return synthetic sample ``idx`` with the same keys and shapes as :class:`GPTDataset`."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for mock dataset of {self.num_samples} samples")
        rng = numpy.random.default_rng([self.seed, idx])
        return _window_to_sample(rng.integers(0, self.vocab_size, self.seq_length + 1), self.seq_length)


def parse_blend(data_path: list[str]) -> tuple[list[str], list[float]]:
    """Parse Megatron's ``--data-path``: ``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]`` -> (prefixes, weights).

    Weights are normalised to sum to 1.
    """
    if not data_path:
        raise ValueError("--data-path is empty")
    if len(data_path) == 1:
        return [data_path[0]], [1.0]
    if len(data_path) % 2:
        raise ValueError(f"--data-path must be one prefix or weight/prefix pairs, got {len(data_path)} values")
    try:
        weights = [float(w) for w in data_path[0::2]]
    except ValueError:
        raise ValueError(f"--data-path weights must be numbers: {data_path[0::2]}") from None
    return list(data_path[1::2]), normalize_weights(weights)


def build_gpt_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], cache_dir: str | None = None, mock: bool = False,
                       vocab_size: int | None = None
                       ) -> tuple[torch.utils.data.Dataset | None, torch.utils.data.Dataset | None,
                                  torch.utils.data.Dataset | None]:
    """Build the (train, valid, test) datasets of ``num_samples`` samples each; a split asked for 0 samples is None.

    ``mock=True`` gives :class:`MockGPTDataset` (needs ``vocab_size``; ``data_path`` is ignored). Otherwise, when
    ``vocab_size`` is given, every file's token ids are checked to lie below it, and every prefix
    of ``data_path`` is split by ``split`` into contiguous document ranges; with several prefixes each split is a
    :class:`BlendedDataset` over per-prefix :class:`GPTDataset` s sized ``ceil(samples * weight * 1.005)``.
    """
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be 3 non-negative counts, got {num_samples}")
    if mock:
        if vocab_size is None:
            raise ValueError("mock data needs a vocab_size")
        return tuple(  # type: ignore[return-value]
            MockGPTDataset(n, seq_length, vocab_size, seed + i) if n > 0 else None for i, n in enumerate(num_samples)
        )

    prefixes, weights = parse_blend(data_path)
    parse_split(split)
    indexed = [IndexedDataset(prefix) for prefix in prefixes]
    for prefix, dataset in zip(prefixes, indexed, strict=True):
        if len(dataset) == 0:
            raise ValueError(f"indexed dataset {prefix} is empty")
        if vocab_size is not None and (largest := dataset.max_token_id()) >= vocab_size:
            raise ValueError(f"indexed dataset {prefix} holds token id {largest} but the tokenizer has only "
                             f"{vocab_size} ids: was it made with another tokenizer (--tokenizer-model, --vocab-size)?")
    ranges = [split_document_ranges(len(dataset), split) for dataset in indexed]

    def component(d: int, s: int, n: int) -> GPTDataset:
        start, stop = ranges[d][s]
        if stop <= start:
            raise ValueError(
                f"--split {split!r} leaves the {SPLIT_NAMES[s]} split of {prefixes[d]} with no documents "
                f"({len(indexed[d])} in all) but {n} samples were requested"
            )
        return GPTDataset(indexed[d], numpy.arange(start, stop), n, seq_length, seed, cache_dir, SPLIT_NAMES[s])

    result: list[torch.utils.data.Dataset | None] = []
    for s, n in enumerate(num_samples):
        if n == 0:
            result.append(None)
        elif len(prefixes) == 1:
            result.append(component(0, s, n))
        else:
            parts = [component(d, s, math.ceil(n * w * BLEND_OVERSAMPLING)) for d, w in enumerate(weights)]
            result.append(BlendedDataset(parts, weights, n, cache_dir))
    return result[0], result[1], result[2]


def default_cache_dir(data_path: list[str]) -> str:
    """Megatron's default cache location when ``--data-cache-path`` is absent: ``cache/`` beside the first prefix."""
    prefixes, _ = parse_blend(data_path)
    return os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "cache", "GPTDataset_indices")
