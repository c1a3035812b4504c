"""Build the tiny recipe's data with no download: docstrings of Python's own standard library as documents, a
byte-level BPE tokenizer trained on them, and the Megatron indexed dataset made by tools/preprocess_data.py.

    python examples/mamba/prepare_tiny_corpus.py OUTPUT_DIR [--vocab-size 2048] [--max-documents 4000]

Writes OUTPUT_DIR/corpus.jsonl, OUTPUT_DIR/tokenizer/tokenizer.json and OUTPUT_DIR/corpus_text_document.{bin,idx}.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def stdlib_docstrings(limit: int) -> list[str]:
    """Module, class and function docstrings of the standard library's source files (parsed, not imported)."""
    documents = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    documents.append(doc)
                    if len(documents) >= limit:
                        return documents
    return documents


def train_tokenizer(documents: list[str], vocab_size: int, folder: Path) -> None:
    """A byte-level BPE tokenizer with an end-of-document token, saved as ``folder/tokenizer.json``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                              "bos_token": "<|endoftext|>"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--max-documents", type=int, default=4000)
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    documents = stdlib_docstrings(args.max_documents)
    corpus = args.output_dir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents))
    train_tokenizer(documents, args.vocab_size, args.output_dir / "tokenizer")
    print(f"{len(documents)} documents, {sum(map(len, documents)):,} characters -> {corpus}")
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "tools" / "preprocess_data.py"),
                    "--input", str(corpus), "--output-prefix", str(args.output_dir / "corpus"),
                    "--tokenizer-type", "HuggingFaceTokenizer",
                    "--tokenizer-model", str(args.output_dir / "tokenizer"), "--append-eod", "--workers", "2"],
                   check=True)


if __name__ == "__main__":
    main()
