"""GPT dataset: sample boundaries, determinism, caching, epochs, splits, mock data and build_gpt_datasets."""

import itertools
import os

import numpy
import pytest
import torch

from megatron.core.datasets import gpt_dataset as gpt_module
from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset, build_gpt_datasets
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.core.datasets.splits import parse_split, split_document_ranges

STRIDE = 1000  # token = document * STRIDE + position: every token names its own place in the corpus


def _make_corpus(path_prefix: str, lengths: list[int]) -> list[numpy.ndarray]:
    documents = [numpy.arange(n, dtype=numpy.int32) + d * STRIDE for d, n in enumerate(lengths)]
    builder = IndexedDatasetBuilder(path_prefix + ".bin", dtype=numpy.int32)
    for document in documents:
        builder.add_document(document)
    builder.finalize(path_prefix + ".idx")
    return documents


LENGTHS = [7, 3, 12, 0, 5, 9, 1, 15, 4, 8]


@pytest.fixture
def corpus(tmp_path):
    prefix = str(tmp_path / "corpus")
    _make_corpus(prefix, LENGTHS)
    return prefix


def _assert_consecutive(window: list[int], document_ids) -> None:
    """Each next token is the next position in the same document, or position 0 of another selected document after
    the previous document's last token (empty documents contribute nothing)."""
    for a, b in itertools.pairwise(window):
        doc_a, pos_a = divmod(a, STRIDE)
        doc_b, pos_b = divmod(b, STRIDE)
        assert doc_a in document_ids and doc_b in document_ids
        if doc_b == doc_a and pos_b == pos_a + 1:
            continue
        assert pos_a == LENGTHS[doc_a] - 1 and pos_b == 0, (a, b)


def test_samples_are_windows_of_the_concatenation(corpus):
    seq_length = 6
    document_ids = numpy.arange(len(LENGTHS))
    total = sum(LENGTHS)
    num_samples = (total - 1) // seq_length  # exactly one epoch
    dataset = GPTDataset(IndexedDataset(corpus), document_ids, num_samples, seq_length, seed=3)
    assert len(dataset) == num_samples
    seen = []
    for i in range(num_samples):
        sample = dataset[i]
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert sample["tokens"].shape == (seq_length,) and sample["tokens"].dtype == torch.int64
        assert sample["labels"].dtype == torch.int64 and sample["position_ids"].dtype == torch.int64
        assert sample["loss_mask"].dtype == torch.float32 and bool((sample["loss_mask"] == 1).all())
        assert sample["position_ids"].tolist() == list(range(seq_length))
        assert sample["labels"][:-1].tolist() == sample["tokens"][1:].tolist()
        window = sample["tokens"].tolist() + sample["labels"][-1:].tolist()
        _assert_consecutive(window, set(document_ids.tolist()))
        seen.extend(sample["tokens"].tolist())
    # One epoch: no input token is repeated and all but the last (total - num_samples * seq_length) are used.
    assert len(seen) == len(set(seen)) == num_samples * seq_length
    # The documents are read in a permutation of document_ids.
    assert sorted(dataset.document_index.tolist()) == document_ids.tolist()


def test_document_subset_and_several_epochs(corpus):
    seq_length = 5
    document_ids = numpy.array([2, 5, 7, 8])
    tokens_per_epoch = sum(LENGTHS[d] for d in document_ids)
    num_samples = 3 * tokens_per_epoch // seq_length  # about 3 epochs
    dataset = GPTDataset(IndexedDataset(corpus), document_ids, num_samples, seq_length, seed=1)
    epochs = len(dataset.document_index) // len(document_ids)
    assert epochs >= 3
    for row in dataset.document_index.reshape(epochs, len(document_ids)):
        assert sorted(row.tolist()) == document_ids.tolist()
    counts: dict[int, int] = {}
    first_epoch_samples = (tokens_per_epoch - 1) // seq_length
    for i in range(num_samples):
        sample = dataset[i]
        window = sample["tokens"].tolist() + sample["labels"][-1:].tolist()
        _assert_consecutive(window, set(document_ids.tolist()))
        for token in sample["tokens"].tolist():
            counts[token] = counts.get(token, 0) + 1
        if i < first_epoch_samples:
            # Samples are shuffled within their epoch: the first epoch is served first.
            assert int(dataset.sample_index[int(dataset.shuffle_index[i])][0]) < len(document_ids)
    assert set(counts) == {d * STRIDE + p for d in document_ids for p in range(LENGTHS[d])}
    assert max(counts.values()) <= epochs


def test_determinism_and_seeds(corpus):
    indexed = IndexedDataset(corpus)
    ids = numpy.arange(len(LENGTHS))

    def tokens(seed: int) -> list[list[int]]:
        dataset = GPTDataset(indexed, ids, 20, 4, seed=seed)
        return [dataset[i]["tokens"].tolist() for i in range(len(dataset))]

    assert tokens(5) == tokens(5)
    assert tokens(5) != tokens(6)


def test_cache_written_and_reused(corpus, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    indexed = IndexedDataset(corpus)
    ids = numpy.arange(len(LENGTHS))
    first = GPTDataset(indexed, ids, 30, 4, seed=7, cache_dir=cache, name="train")
    assert not first.loaded_from_cache
    files = sorted(os.listdir(cache))
    assert len(files) == 3 and all(f.endswith(".npy") and "-train-" in f for f in files)

    def fail(*args, **kwargs):
        raise AssertionError("the sample index should have been loaded from the cache")

    monkeypatch.setattr(gpt_module, "build_sample_index", fail)
    second = GPTDataset(indexed, ids, 30, 4, seed=7, cache_dir=cache, name="train")
    assert second.loaded_from_cache
    for i in range(30):
        assert first[i]["tokens"].tolist() == second[i]["tokens"].tolist()
    monkeypatch.undo()

    # Every parameter that shapes the index gives a new cache entry.
    for kwargs in ({"seed": 8}, {"num_samples": 31}, {"seq_length": 5}, {"document_ids": ids[:-1]}):
        params = {"document_ids": ids, "num_samples": 30, "seq_length": 4, "seed": 7} | kwargs
        dataset = GPTDataset(indexed, cache_dir=cache, name="train", **params)
        assert not dataset.loaded_from_cache
    assert len(os.listdir(cache)) == 3 * 5
    assert not any(f.endswith(".tmp") for f in os.listdir(cache))


def test_gpt_dataset_errors(corpus, tmp_path):
    indexed = IndexedDataset(corpus)
    with pytest.raises(ValueError, match="no documents"):
        GPTDataset(indexed, numpy.array([], dtype=numpy.int64), 5, 4, seed=0)
    with pytest.raises(ValueError, match="no tokens"):
        GPTDataset(indexed, numpy.array([3]), 5, 4, seed=0)  # document 3 is empty
    empty = str(tmp_path / "empty")
    _make_corpus(empty, [])
    with pytest.raises(ValueError, match="empty"):
        GPTDataset(IndexedDataset(empty), numpy.array([0]), 5, 4, seed=0)
    with pytest.raises(ValueError, match="empty"):
        build_gpt_datasets([empty], "1,0,0", 4, 0, (5, 0, 0))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_gpt_datasets([str(tmp_path / "nowhere")], "1,0,0", 4, 0, (5, 0, 0))


def test_parse_split_and_ranges():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("98,2") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("1/1/2") == pytest.approx([0.25, 0.25, 0.5])
    for bad in ("", "a,b", "1,-1", "0,0,0", "1,2,3,4"):
        with pytest.raises(ValueError):
            parse_split(bad)
    assert split_document_ranges(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges(10, "1,0,0") == [(0, 10), (10, 10), (10, 10)]
    for n in (0, 1, 7, 101):
        for split in ("969,30,1", "1,1,1", "5,3,2", "98,2"):
            ranges = split_document_ranges(n, split)
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a <= b for a, b in ranges) and ranges[0][1] == ranges[1][0] and ranges[1][1] == ranges[2][0]


def test_build_gpt_datasets_single_and_blend(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _make_corpus(a, [20] * 10)
    _make_corpus(b, [30] * 10)
    train, valid, test = build_gpt_datasets([a], "8,2,0", 8, 1, (40, 5, 0), cache_dir=str(tmp_path / "c"))
    assert test is None and len(train) == 40 and len(valid) == 5
    assert set(train.document_ids.tolist()) == set(range(8)) and set(valid.document_ids.tolist()) == {8, 9}

    train, valid, _ = build_gpt_datasets(["0.25", a, "0.75", b], "8,2,0", 8, 1, (100, 10, 0))
    assert len(train) == 100 and len(valid) == 10
    assert train.weights == pytest.approx([0.25, 0.75])
    # Each component holds its share plus Megatron's 0.5% margin.
    assert [len(d) for d in train.datasets] == [26, 76]
    from_a = sum(1 for i in range(100) if train.dataset_index[i] == 0)
    assert abs(from_a - 25) <= 1

    with pytest.raises(ValueError, match=r"valid split .* no documents"):
        build_gpt_datasets([a], "1,0,0", 8, 1, (10, 5, 0))
    with pytest.raises(ValueError, match="weight"):
        build_gpt_datasets(["x", a, "0.5", b], "1,0,0", 8, 1, (10, 0, 0))
    with pytest.raises(ValueError, match="pairs"):
        build_gpt_datasets(["0.5", a, b], "1,0,0", 8, 1, (10, 0, 0))


def test_mock_dataset():
    dataset = MockGPTDataset(10, 16, 50, seed=3)
    assert len(dataset) == 10
    sample = dataset[4]
    assert sample["tokens"].shape == (16,) and int(sample["tokens"].max()) < 50
    assert sample["labels"][:-1].tolist() == sample["tokens"][1:].tolist()
    assert MockGPTDataset(10, 16, 50, seed=3)[4]["tokens"].tolist() == sample["tokens"].tolist()
    assert dataset[5]["tokens"].tolist() != sample["tokens"].tolist()
    train, valid, test = build_gpt_datasets([], "1,1,1", 16, 0, (4, 2, 0), mock=True, vocab_size=50)
    assert len(train) == 4 and len(valid) == 2 and test is None
    with pytest.raises(ValueError, match="vocab"):
        build_gpt_datasets([], "1,1,1", 16, 0, (4, 2, 0), mock=True)
