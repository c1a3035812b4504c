"""Blended datasets: Megatron's greedy interleaving keeps every dataset within one sample of its share."""

import numpy
import pytest

from megatron.core.datasets.blended_dataset import BlendedDataset, build_blending_indices


class _Labelled:
    """A stand-in dataset whose sample i is (name, i)."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        assert 0 <= i < self.size
        return (self.name, i)


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.2, 0.3, 0.5], [1, 1, 1, 1, 1, 1, 1], [0.01, 0.99], [5.0]])
def test_proportions_within_one_sample(weights):
    size = 997
    total = sum(weights)
    dataset_index, dataset_sample_index = build_blending_indices([w / total for w in weights], size)
    counts = numpy.zeros(len(weights), dtype=int)
    for n, d in enumerate(dataset_index.tolist(), start=1):
        assert dataset_sample_index[n - 1] == counts[d]  # each dataset is read in order, no gap
        counts[d] += 1
        assert numpy.all(numpy.abs(counts - numpy.array(weights) / total * n) <= 1 + 1e-9), (n, counts)


def test_blended_dataset_reads_components_in_order():
    weights = [0.25, 0.75]
    blend = BlendedDataset([_Labelled("a", 30), _Labelled("b", 80)], [1, 3], 100)
    assert blend.weights == pytest.approx(weights)
    samples = [blend[i] for i in range(len(blend))]
    a = [i for name, i in samples if name == "a"]
    b = [i for name, i in samples if name == "b"]
    assert a == list(range(25)) and b == list(range(75))
    # Deterministic.
    again = BlendedDataset([_Labelled("a", 30), _Labelled("b", 80)], [1, 3], 100)
    assert [again[i] for i in range(100)] == samples


def test_blend_cache(tmp_path):
    parts = [_Labelled("a", 60), _Labelled("b", 60)]
    first = BlendedDataset(parts, [0.4, 0.6], 100, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2
    second = BlendedDataset(parts, [0.4, 0.6], 100, cache_dir=str(tmp_path))
    assert [first[i] for i in range(100)] == [second[i] for i in range(100)]


def test_blend_errors():
    with pytest.raises(ValueError, match="needs"):
        BlendedDataset([_Labelled("a", 10), _Labelled("b", 100)], [0.5, 0.5], 100)
    with pytest.raises(ValueError, match="positive"):
        BlendedDataset([_Labelled("a", 10), _Labelled("b", 100)], [0.0, 1.0], 10)
    with pytest.raises(ValueError, match="weights"):
        BlendedDataset([_Labelled("a", 10)], [0.5, 0.5], 5)
    with pytest.raises(IndexError):
        BlendedDataset([_Labelled("a", 10)], [1.0], 5)[5]
