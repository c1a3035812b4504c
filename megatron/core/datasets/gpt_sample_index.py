"""The GPT dataset's sample index: which tokens make up every sample, built once and cached as ``.npy`` files.

The concatenation of the documents (in a per-epoch shuffled order, as many epochs as needed) is cut into samples of
``seq_length + 1`` tokens; consecutive samples share one token (the last label of one sample is the first input of
the next), as in Megatron. Three arrays describe it:

- ``document_index`` int64 ``(num_epochs * num_documents,)``: the document ids in reading order;
- ``sample_index`` int64 ``(num_samples, 2)``: the start of every sample as (position in ``document_index``, token
  offset inside that document);
- ``shuffle_index`` int64 ``(num_samples,)``: the order in which samples are served. Samples are shuffled within the
  epoch they start in, so every sample of an epoch is served before any sample of the next.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

import numpy

INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


@dataclass(frozen=True)
class SampleIndex:
    """The three arrays that locate every sample of a :class:`~megatron.core.datasets.gpt_dataset.GPTDataset`."""

    document_index: numpy.ndarray
    sample_index: numpy.ndarray
    shuffle_index: numpy.ndarray


def build_sample_index(sequence_lengths: numpy.ndarray, document_ids: numpy.ndarray, num_samples: int,
                       seq_length: int, seed: int) -> SampleIndex:
    """Build the sample index for ``num_samples`` samples of ``seq_length + 1`` tokens.

    ``sequence_lengths`` (``(num_sequences,)``) are the token counts of the whole indexed dataset; ``document_ids``
    (``(num_documents,)``) selects the sequences this dataset reads.
    """
    lengths = numpy.asarray(sequence_lengths, dtype=numpy.int64)
    document_ids = numpy.asarray(document_ids, dtype=numpy.int64)
    if num_samples == 0:
        empty = numpy.zeros(0, dtype=numpy.int64)
        return SampleIndex(empty, numpy.zeros((0, 2), dtype=numpy.int64), empty.copy())
    tokens_per_epoch = int(lengths[document_ids].sum())
    if tokens_per_epoch <= 0:
        raise ValueError("the GPT dataset's documents contain no tokens")
    # Sample k spans tokens [k * seq_length, k * seq_length + seq_length] of the endless concatenation.
    tokens_needed = num_samples * seq_length + 1
    num_epochs = max(1, -(-tokens_needed // tokens_per_epoch))

    rng = numpy.random.RandomState(seed)
    document_index = numpy.concatenate([rng.permutation(document_ids) for _ in range(num_epochs)])
    read_lengths = lengths[document_index]
    ends = numpy.cumsum(read_lengths)
    starts = ends - read_lengths

    sample_starts = numpy.arange(num_samples, dtype=numpy.int64) * seq_length
    # The first document whose end lies beyond the start token; empty documents are skipped this way.
    positions = numpy.searchsorted(ends, sample_starts, side="right")
    sample_index = numpy.stack([positions, sample_starts - starts[positions]], axis=1)

    epoch_of_sample = sample_starts // tokens_per_epoch
    shuffle_index = numpy.arange(num_samples, dtype=numpy.int64)
    for epoch in range(num_epochs):
        lo, hi = numpy.searchsorted(epoch_of_sample, [epoch, epoch + 1])
        shuffle_index[lo:hi] = lo + rng.permutation(hi - lo)
    return SampleIndex(document_index, sample_index, shuffle_index)


def cache_key(path_prefix: str, document_ids: numpy.ndarray, num_samples: int, seq_length: int, seed: int,
              num_sequences: int, num_tokens: int) -> str:
    """Return an md5 hex digest of every parameter that affects the sample index (dataset size included)."""
    description = {
        "class": "GPTDataset",
        "path_prefix": os.path.abspath(path_prefix) if path_prefix else "",
        "document_ids_md5": hashlib.md5(numpy.ascontiguousarray(document_ids, dtype=numpy.int64).tobytes()).hexdigest(),
        "num_documents": len(document_ids),
        "num_samples": int(num_samples),
        "seq_length": int(seq_length),
        "seed": int(seed),
        "num_sequences": int(num_sequences),
        "num_tokens": int(num_tokens),
        "format": 1,
    }
    return hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()


def cache_paths(cache_dir: str, key: str, name: str) -> dict[str, str]:
    """Return the ``.npy`` path of each index array for this cache ``key`` and split ``name``."""
    return {array: os.path.join(cache_dir, f"{key}-{name}-{array}.npy") for array in INDEX_NAMES}


def load_cached(paths: dict[str, str]) -> SampleIndex | None:
    """Load a cached sample index (memory-mapped) or return None when any file is missing."""
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    return SampleIndex(*(numpy.load(paths[name], mmap_mode="r", allow_pickle=False) for name in INDEX_NAMES))


def save_cached(paths: dict[str, str], index: SampleIndex) -> None:
    """Write the index arrays to their cache ``paths``."""
    save_arrays({paths[name]: getattr(index, name) for name in INDEX_NAMES})


def save_arrays(arrays: dict[str, numpy.ndarray]) -> None:
    """Save each array as ``.npy`` through a temporary file renamed into place, so readers never see a partial file."""
    for target, array in arrays.items():
        directory = os.path.dirname(target) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npy.tmp")
        try:
            with os.fdopen(fd, "wb") as stream:
                numpy.save(stream, array, allow_pickle=False)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
