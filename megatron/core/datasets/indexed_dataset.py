"""Megatron's memory-mapped indexed dataset (the ``MMIDIDX`` format of ``PREFIX.bin`` + ``PREFIX.idx``).

``PREFIX.bin`` holds the tokens of every sequence back to back in one dtype. ``PREFIX.idx`` (little-endian) holds:

====================  ==========================  ==============================================
field                 type                        meaning
====================  ==========================  ==============================================
magic                 9 bytes                     ``b"MMIDIDX\\x00\\x00"``
version               uint64                      always 1
dtype code            uint8                       see :data:`DTYPE_CODES`
sequence count        uint64                      S
document count        uint64                      D + 1 (number of documents plus one)
sequence_lengths      int32[S]                    tokens per sequence
sequence_pointers     int64[S]                    byte offset of each sequence in ``.bin``
document_indices      int64[D + 1]                first sequence of each document, then S
====================  ==========================  ==============================================

Files written here load in Megatron-LM and files written by Megatron-LM load here.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import numpy

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron's numeric dtype codes, stored in the header.
DTYPE_CODES: dict[type, int] = {
    numpy.uint8: 1,
    numpy.int8: 2,
    numpy.int16: 3,
    numpy.int32: 4,
    numpy.int64: 5,
    numpy.float64: 6,
    numpy.float32: 7,
    numpy.uint16: 8,
}
CODE_DTYPES: dict[int, type] = {code: dtype for dtype, code in DTYPE_CODES.items()}
HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # 34 bytes before the arrays


def data_file_path(path_prefix: str) -> str:
    """Return the token-data path ``PREFIX.bin``."""
    return path_prefix + ".bin"


def index_file_path(path_prefix: str) -> str:
    """Return the index path ``PREFIX.idx``."""
    return path_prefix + ".idx"


def optimal_dtype(vocab_size: int | None) -> type:
    """Return Megatron's storage dtype for token ids below ``vocab_size``: uint16 when it fits, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return numpy.uint16
    return numpy.int32


def _normalize_dtype(dtype: type | numpy.dtype) -> type:
    """Map any numpy dtype spelling to the scalar type used as a key of :data:`DTYPE_CODES`."""
    scalar = numpy.dtype(dtype).type
    if scalar not in DTYPE_CODES:
        supported = ", ".join(sorted(t.__name__ for t in DTYPE_CODES))
        raise ValueError(f"unsupported indexed-dataset dtype {numpy.dtype(dtype)}; supported: {supported}")
    return scalar


class IndexedDatasetBuilder:
    """Write an indexed dataset: tokens stream into ``bin_path``; :meth:`finalize` writes the ``.idx`` index.

    ``add_document(tokens)`` writes one document made of one sequence (the usual case for GPT pretraining data).
    Megatron's finer-grained calls are also available: ``add_item(tokens)`` appends one sequence to the current
    document and ``end_document()`` closes it.
    """

    def __init__(self, bin_path: str, dtype: type = numpy.int32) -> None:
        self.bin_path = bin_path
        self.dtype = _normalize_dtype(dtype)
        self._bin = open(bin_path, "wb")  # noqa: SIM115 -- stays open until finalize()
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def add_item(self, tokens: Sequence[int] | numpy.ndarray) -> None:
        """Append one sequence (1-D tokens, any length including 0) to the current document."""
        array = numpy.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {array.shape}")
        if array.size and array.dtype != self.dtype:
            cast = array.astype(self.dtype)
            # A silent wrap-around (e.g. id 70000 stored as uint16) would corrupt the data without a trace.
            exact = numpy.dtype(self.dtype).kind == "f" or numpy.array_equal(
                cast.astype(numpy.float64), array.astype(numpy.float64)
            )
            if not exact:
                raise ValueError(f"token values do not fit in {numpy.dtype(self.dtype).name}")
            array = cast
        self._bin.write(numpy.ascontiguousarray(array, dtype=self.dtype).tobytes(order="C"))
        self.sequence_lengths.append(int(array.size))

    def end_document(self) -> None:
        """Close the current document: the sequences added since the last call form one document."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens: Sequence[int] | numpy.ndarray) -> None:
        """Append one document consisting of exactly one sequence ``tokens`` (1-D)."""
        self.add_item(tokens)
        self.end_document()

    def add_index(self, path_prefix: str) -> None:
        """Append every sequence and document of the existing indexed dataset at ``path_prefix`` (same dtype)."""
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"cannot merge {path_prefix}: dtype {other.dtype.__name__} != {self.dtype.__name__}")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(int(n) for n in other.sequence_lengths)
        self.document_indices.extend(offset + int(i) for i in other.document_indices[1:])
        with open(data_file_path(path_prefix), "rb") as source:
            while chunk := source.read(1 << 24):
                self._bin.write(chunk)

    def close(self) -> None:
        """Close the ``.bin`` file without writing an index (to abandon a build); finalize() also closes it."""
        self._bin.close()

    def finalize(self, idx_path: str) -> None:
        """Close the ``.bin`` file and write the ``.idx`` index to ``idx_path``."""
        self._bin.close()
        lengths = numpy.asarray(self.sequence_lengths, dtype=numpy.int32)
        itemsize = numpy.dtype(self.dtype).itemsize
        pointers = numpy.zeros(len(lengths), dtype=numpy.int64)
        if len(lengths) > 1:
            numpy.cumsum(lengths[:-1].astype(numpy.int64) * itemsize, out=pointers[1:])
        documents = numpy.asarray(self.document_indices, dtype=numpy.int64)
        with open(idx_path, "wb") as index:
            index.write(INDEX_MAGIC)
            index.write(struct.pack("<Q", INDEX_VERSION))
            index.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            index.write(struct.pack("<Q", len(lengths)))
            index.write(struct.pack("<Q", len(documents)))
            index.write(lengths.astype("<i4").tobytes(order="C"))
            index.write(pointers.astype("<i8").tobytes(order="C"))
            index.write(documents.astype("<i8").tobytes(order="C"))


class IndexedDataset:
    """Read-only view of ``PREFIX.bin`` / ``PREFIX.idx`` through numpy memory maps.

    ``dataset[i]`` is sequence ``i`` as a 1-D array of the file's dtype; ``len(dataset)`` is the sequence count.
    """

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset file not found: {path}")
        with open(idx_path, "rb") as stream:
            header = stream.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE or header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise ValueError(f"{idx_path} is not a Megatron MMIDIDX index file (bad magic)")
        version, code, sequence_count, document_count = struct.unpack("<QBQQ", header[len(INDEX_MAGIC) :])
        if version != INDEX_VERSION:
            raise ValueError(f"{idx_path}: unsupported index version {version} (expected {INDEX_VERSION})")
        if code not in CODE_DTYPES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype: type = CODE_DTYPES[code]
        expected = HEADER_SIZE + sequence_count * (4 + 8) + document_count * 8
        actual = os.path.getsize(idx_path)
        # Megatron's multimodal variant appends one int8 mode per sequence; accept and ignore it.
        if actual not in (expected, expected + sequence_count):
            raise ValueError(f"{idx_path} is truncated or corrupt: {actual} bytes, expected {expected}")

        self._index = numpy.memmap(idx_path, dtype=numpy.uint8, mode="r")
        offset = HEADER_SIZE
        self._sequence_lengths = numpy.frombuffer(self._index, dtype="<i4", count=sequence_count, offset=offset)
        offset += 4 * sequence_count
        self._sequence_pointers = numpy.frombuffer(self._index, dtype="<i8", count=sequence_count, offset=offset)
        offset += 8 * sequence_count
        self._document_indices = numpy.frombuffer(self._index, dtype="<i8", count=document_count, offset=offset)

        itemsize = numpy.dtype(self.dtype).itemsize
        needed = int(self._sequence_pointers[-1] + int(self._sequence_lengths[-1]) * itemsize) if sequence_count else 0
        if os.path.getsize(bin_path) < needed:
            raise ValueError(f"{bin_path} is truncated: {os.path.getsize(bin_path)} bytes, index needs {needed}")
        # numpy cannot memory-map an empty file.
        self._data = numpy.memmap(bin_path, dtype=numpy.uint8, mode="r") if needed else numpy.zeros(0, numpy.uint8)

    def __getstate__(self) -> dict[str, str]:
        # Pickle (DataLoader workers under spawn) by path and re-map on the other side instead of copying the data.
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["path_prefix"])

    def __len__(self) -> int:
        """Number of sequences."""
        return len(self._sequence_lengths)

    def __getitem__(self, i: int) -> numpy.ndarray:
        """Return sequence ``i`` (negative counts from the end), a 1-D array of length ``sequence_lengths[i]``."""
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> numpy.ndarray:
        """Return ``length`` tokens (default: to the end) of sequence ``i`` from token ``offset``, shape ``(n,)``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence index {i} out of range for {n} sequences")
        i = int(i) % n
        size = int(self._sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {size}")
        start = int(self._sequence_pointers[i]) + offset * numpy.dtype(self.dtype).itemsize
        return numpy.frombuffer(self._data, dtype=numpy.dtype(self.dtype).newbyteorder("<"), count=length, offset=start)

    @property
    def sequence_lengths(self) -> numpy.ndarray:
        """Tokens per sequence, int32 of shape ``(num_sequences,)``."""
        return self._sequence_lengths

    @property
    def sequence_pointers(self) -> numpy.ndarray:
        """Byte offset of every sequence in ``.bin``, int64 of shape ``(num_sequences,)``."""
        return self._sequence_pointers

    @property
    def document_indices(self) -> numpy.ndarray:
        """First sequence of every document followed by the sequence count, int64 of shape ``(num_documents + 1,)``."""
        return self._document_indices

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return len(self._document_indices) - 1

    def max_token_id(self, chunk_tokens: int = 1 << 24) -> int:
        """The largest value in the ``.bin`` file (-1 when empty), read in chunks of ``chunk_tokens`` values so that
        memory stays bounded on large files."""
        tokens = self._data.view(self.dtype) if len(self._data) else numpy.zeros(0, self.dtype)
        largest = -1
        for start in range(0, len(tokens), chunk_tokens):
            largest = max(largest, int(tokens[start : start + chunk_tokens].max()))
        return largest
