"""tools/preprocess_data.py end to end (JSONL -> .bin/.idx -> IndexedDataset) and its bad inputs, as a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "tools" / "preprocess_data.py"
VOCAB = 1000  # NullTokenizer: the text is space-separated ids, eod = VOCAB


@pytest.fixture(autouse=True)
def _needs_tokenizer():
    pytest.importorskip("megatron.training.tokenizer", reason="megatron.training.tokenizer is not written yet")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=str(REPO)
    )


def _documents() -> list[list[int]]:
    rng = numpy.random.default_rng(0)
    return [rng.integers(0, VOCAB, n).tolist() for n in [3, 1, 10, 7, 0, 25, 2] * 5]


def _write_jsonl(path: Path, documents: list[list[int]]) -> None:
    with open(path, "w") as f:
        for i, ids in enumerate(documents):
            f.write(json.dumps({"text": " ".join(map(str, ids)), "title": str(i), "meta": {"n": i}}) + "\n")


@pytest.mark.parametrize(("workers", "append_eod"), [(1, False), (1, True), (2, True)])
def test_end_to_end(tmp_path, workers, append_eod):
    documents = _documents()
    _write_jsonl(tmp_path / "corpus.jsonl", documents)
    prefix = str(tmp_path / "out" / "corpus")
    flags = ["--input", str(tmp_path / "corpus.jsonl"), "--output-prefix", prefix, "--json-keys", "text", "title",
             "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--workers", str(workers)]
    result = _run(*flags, *(["--append-eod"] if append_eod else []))
    assert result.returncode == 0, result.stderr

    dataset = IndexedDataset(prefix + "_text_document")
    assert len(dataset) == len(documents)
    assert list(dataset.document_indices) == list(range(len(documents) + 1))
    for i, ids in enumerate(documents):
        expected = [*ids, VOCAB] if append_eod and ids else ids
        assert dataset[i].tolist() == expected
    titles = IndexedDataset(prefix + "_title_document")
    assert [titles[i].tolist() for i in range(len(documents))] == [
        [i] + ([VOCAB] if append_eod else []) for i in range(len(documents))
    ]
    leftovers = [name for name in os.listdir(tmp_path / "out") if ".tmp" in name]
    assert leftovers == []


def _assert_bad(tmp_path: Path, result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    written = [p.name for p in tmp_path.iterdir() if p.suffix in (".bin", ".idx") or ".tmp" in p.name]
    assert written == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("", "empty"),
        ("\n  \n", "no JSON lines"),
        ('{"text": "1 2"}\n{"body": "3"}\n', "line 2: key 'text' not found"),
        ('{"text": "1 2"}\n{"text": "3"\n', "line 2: invalid JSON"),
        ('{"text": 5}\n', "expected a string"),
    ],
)
def test_bad_input(tmp_path, content, message):
    source = tmp_path / "input.jsonl"
    if content is not None:
        source.write_text(content)
    result = _run("--input", str(source), "--output-prefix", str(tmp_path / "out"), "--tokenizer-type",
                  "NullTokenizer", "--vocab-size", str(VOCAB), "--workers", "2")
    _assert_bad(tmp_path, result, message)
