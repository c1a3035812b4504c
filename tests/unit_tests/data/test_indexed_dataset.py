"""Indexed dataset (MMIDIDX) round trips, checked against the raw bytes with ``struct`` as an independent oracle."""

import pickle
import struct

import numpy
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

# Megatron-LM's dtype codes, spelled out here independently of the implementation.
CODES = {
    numpy.uint8: 1,
    numpy.int8: 2,
    numpy.int16: 3,
    numpy.int32: 4,
    numpy.int64: 5,
    numpy.float64: 6,
    numpy.float32: 7,
    numpy.uint16: 8,
}


def _documents(dtype: type, seed: int = 0) -> list[numpy.ndarray]:
    rng = numpy.random.default_rng(seed)
    lengths = [5, 1, 0, 17, 3, 64]
    high = 100 if numpy.dtype(dtype).kind in "iu" else 1
    return [(rng.random(n) * high).astype(dtype) for n in lengths]


def _write(prefix: str, documents: list[numpy.ndarray], dtype: type) -> None:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for document in documents:
        builder.add_document(document)
    builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("dtype", list(CODES))
def test_round_trip_and_header(tmp_path, dtype):
    prefix = str(tmp_path / "corpus")
    documents = _documents(dtype)
    _write(prefix, documents, dtype)

    # .bin is exactly the little-endian concatenation of the documents.
    expected_bin = b"".join(d.astype(numpy.dtype(dtype).newbyteorder("<")).tobytes() for d in documents)
    with open(prefix + ".bin", "rb") as f:
        assert f.read() == expected_bin

    # .idx field by field.
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    itemsize = numpy.dtype(dtype).itemsize
    n = len(documents)
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack_from("<Q", raw, 9) == (1,)
    assert struct.unpack_from("<B", raw, 17) == (CODES[dtype],)
    assert struct.unpack_from("<Q", raw, 18) == (n,)
    assert struct.unpack_from("<Q", raw, 26) == (n + 1,)
    offset = 34
    lengths = struct.unpack_from(f"<{n}i", raw, offset)
    assert list(lengths) == [len(d) for d in documents]
    offset += 4 * n
    pointers = struct.unpack_from(f"<{n}q", raw, offset)
    expected_pointers, position = [], 0
    for d in documents:
        expected_pointers.append(position)
        position += len(d) * itemsize
    assert list(pointers) == expected_pointers
    offset += 8 * n
    doc_indices = struct.unpack_from(f"<{n + 1}q", raw, offset)
    assert list(doc_indices) == list(range(n + 1))
    offset += 8 * (n + 1)
    assert len(raw) == offset

    dataset = IndexedDataset(prefix)
    assert len(dataset) == n
    assert dataset.dtype == dtype
    assert list(dataset.sequence_lengths) == [len(d) for d in documents]
    assert list(dataset.document_indices) == list(range(n + 1))
    for i, d in enumerate(documents):
        assert dataset[i].dtype == numpy.dtype(dtype)
        numpy.testing.assert_array_equal(dataset[i], d)
    numpy.testing.assert_array_equal(dataset.get(3, offset=2, length=5), documents[3][2:7])
    numpy.testing.assert_array_equal(dataset.get(5, offset=60), documents[5][60:])
    numpy.testing.assert_array_equal(dataset[-1], documents[-1])


def test_multi_sequence_documents(tmp_path):
    prefix = str(tmp_path / "multi")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    builder.add_item([1, 2, 3])
    builder.add_item([4])
    builder.end_document()
    builder.add_item([5, 6])
    builder.end_document()
    builder.finalize(prefix + ".idx")
    dataset = IndexedDataset(prefix)
    assert len(dataset) == 3
    assert list(dataset.document_indices) == [0, 2, 3]
    assert dataset.num_documents == 2
    assert [list(dataset[i]) for i in range(3)] == [[1, 2, 3], [4], [5, 6]]


def test_reads_a_file_written_by_hand(tmp_path):
    """A file built byte by byte (as Megatron-LM writes it) loads: compatibility does not depend on our writer."""
    prefix = str(tmp_path / "hand")
    tokens = [[7, 8, 9], [10, 11]]
    with open(prefix + ".bin", "wb") as f:
        f.write(struct.pack("<5i", 7, 8, 9, 10, 11))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 2, 3))
        f.write(struct.pack("<2i", 3, 2) + struct.pack("<2q", 0, 12) + struct.pack("<3q", 0, 1, 2))
    dataset = IndexedDataset(prefix)
    assert [list(dataset[i]) for i in range(2)] == tokens


def test_errors(tmp_path):
    prefix = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"missing\.idx"):
        IndexedDataset(prefix)
    _write(prefix, [numpy.arange(4, dtype=numpy.int32)], numpy.int32)
    (tmp_path / "missing.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        IndexedDataset(prefix)

    bad = tmp_path / "bad"
    (bad.parent / "bad.bin").write_bytes(b"")
    (bad.parent / "bad.idx").write_bytes(b"NOTANIDX" * 5)
    with pytest.raises(ValueError, match="magic"):
        IndexedDataset(str(bad))

    with pytest.raises(ValueError, match="do not fit"):
        IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=numpy.uint16).add_document([70000])
    with pytest.raises(ValueError, match="unsupported"):
        IndexedDatasetBuilder(str(tmp_path / "y.bin"), dtype=numpy.complex64)

    _write(str(tmp_path / "ok"), [numpy.arange(4, dtype=numpy.int32)], numpy.int32)
    with pytest.raises(IndexError):
        IndexedDataset(str(tmp_path / "ok")).get(0, offset=2, length=5)


def test_empty_dataset_loads(tmp_path):
    prefix = str(tmp_path / "empty")
    _write(prefix, [], numpy.int32)
    dataset = IndexedDataset(prefix)
    assert len(dataset) == 0
    assert list(dataset.document_indices) == [0]


def test_pickles_by_path(tmp_path):
    prefix = str(tmp_path / "p")
    _write(prefix, _documents(numpy.int32), numpy.int32)
    dataset = IndexedDataset(prefix)
    payload = pickle.dumps(dataset)
    assert len(payload) < 500  # the path, not the tokens
    clone = pickle.loads(payload)
    assert [clone[i].tolist() for i in range(len(clone))] == [dataset[i].tolist() for i in range(len(dataset))]
