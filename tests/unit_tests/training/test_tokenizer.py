"""megatron.training.tokenizer: each tokenizer type on files built here, checked against the libraries used directly."""

import base64
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: nothing may come from a hub

import pytest

from megatron.training.tokenizer import MegatronTokenizer, build_tokenizer, padded_vocab_size

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hybrid models interleave Mamba layers with attention layers.",
    "State space models scan the sequence once; attention looks at every pair of tokens.",
    "Numbers like 12345 and 2024 appear in text, as do symbols: #, $, %, & and @.",
    "Tokenizers split text into pieces and map each piece to an integer id.",
] * 20
TEXTS = [
    "The quick brown fox.",
    "Mamba and attention, together at last!",
    "unseen wörds, naïve café, 東京, emoji 🙂 and tabs\tand\nnewlines",
    "",
    "<s> is plain text here </s>",
]


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------------------------
# padded_vocab_size


@pytest.mark.parametrize(
    ("size", "divisible_by", "tp", "expected"),
    [(50257, 128, 1, 50304), (50257, 128, 2, 50432), (128, 128, 1, 128), (129, 128, 1, 256), (1, 128, 1, 128),
     (32000, 128, 8, 32768), (100, 1, 1, 100), (100, 3, 2, 102)],
)
def test_padded_vocab_size(size, divisible_by, tp, expected):
    padded = padded_vocab_size(size, divisible_by, tp)
    assert padded == expected
    assert padded % (divisible_by * tp) == 0 and padded >= size and padded - size < divisible_by * tp


def test_padded_vocab_size_defaults_and_bad_values():
    assert padded_vocab_size(50257) == 50304
    with pytest.raises(ValueError, match="make-vocab-size-divisible-by"):
        padded_vocab_size(100, 0)
    with pytest.raises(ValueError, match="tensor-model-parallel-size"):
        padded_vocab_size(100, 128, 0)
    with pytest.raises(ValueError, match="vocabulary size"):
        padded_vocab_size(0)


# ----------------------------------------------------------------------------------------------------------------
# NullTokenizer


def test_null_tokenizer():
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=100)
    assert isinstance(tokenizer, MegatronTokenizer)
    assert tokenizer.tokenize("1 2 3") == [1, 2, 3]
    assert tokenizer.tokenize("  7\t8\n9 ") == [7, 8, 9]
    assert tokenizer.tokenize("") == []
    assert tokenizer.detokenize([1, 2, 3]) == "1 2 3"
    assert tokenizer.detokenize(tokenizer.tokenize("4 0 99 100")) == "4 0 99 100"
    assert tokenizer.eod == 100
    assert tokenizer.vocab_size == 101
    assert tokenizer.bos is None and tokenizer.eos is None and tokenizer.pad is None
    assert tokenizer.vocab["42"] == 42 and tokenizer.inv_vocab[100] == "100"


def test_null_tokenizer_bad_text():
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=100)
    with pytest.raises(ValueError, match="not an integer") as error:
        tokenizer.tokenize("1 two 3")
    _one_line(error)
    with pytest.raises(ValueError, match="outside"):
        tokenizer.tokenize("101")
    with pytest.raises(ValueError, match="outside"):
        tokenizer.tokenize("-1")


# ----------------------------------------------------------------------------------------------------------------
# GPTSentencePieceTokenizer


def _train_sentencepiece(prefix: Path, **options) -> Path:
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(prefix), vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2, **options,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    return _train_sentencepiece(tmp_path_factory.mktemp("sp") / "tok", pad_id=3)


def test_sentencepiece_round_trip_matches_library(sentencepiece_model):
    import sentencepiece

    oracle = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    tokenizer = build_tokenizer("GPTSentencePieceTokenizer", str(sentencepiece_model))
    assert tokenizer.vocab_size == oracle.get_piece_size() == 320
    for text in TEXTS:
        ids = tokenizer.tokenize(text)
        assert ids == oracle.encode(text, out_type=int)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.detokenize(ids) == text
    # byte fallback: unseen characters become byte pieces, not unk
    assert oracle.unk_id() not in tokenizer.tokenize("東京 🙂")


def test_sentencepiece_special_ids(sentencepiece_model):
    tokenizer = build_tokenizer("GPTSentencePieceTokenizer", sentencepiece_model)  # a Path works too
    assert (tokenizer.bos, tokenizer.eos, tokenizer.pad) == (1, 2, 3)
    assert tokenizer.eod == tokenizer.eos == 2
    assert tokenizer.inv_vocab[1] == "<s>" and tokenizer.vocab["</s>"] == 2 and tokenizer.vocab["<pad>"] == 3
    assert len(tokenizer.vocab) == len(tokenizer.inv_vocab) == tokenizer.vocab_size
    assert tokenizer.tokenize("fox")[0] != tokenizer.bos  # no bos added


def test_sentencepiece_without_eos_falls_back_to_bos(tmp_path):
    model = _train_sentencepiece(tmp_path / "noeos", eos_id=-1)
    tokenizer = build_tokenizer("GPTSentencePieceTokenizer", str(model))
    assert tokenizer.eos is None and tokenizer.pad is None
    assert tokenizer.bos == 1 and tokenizer.eod == 1


def test_sentencepiece_corrupt_model(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="cannot load") as error:
        build_tokenizer("GPTSentencePieceTokenizer", str(bad))
    assert str(bad) in _one_line(error)


# ----------------------------------------------------------------------------------------------------------------
# HuggingFaceTokenizer


def _train_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    # A template that adds <s>: tokenize() must not apply it.
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf")
    _train_bpe().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
        "pad_token": "<pad>",
    }))
    return folder


def test_huggingface_round_trip_matches_library(hf_folder):
    from tokenizers import Tokenizer

    oracle = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    for model in (hf_folder, hf_folder / "tokenizer.json"):
        tokenizer = build_tokenizer("HuggingFaceTokenizer", str(model))
        assert tokenizer.vocab_size == oracle.get_vocab_size(with_added_tokens=True)
        for text in TEXTS:
            ids = tokenizer.tokenize(text)
            assert ids == oracle.encode(text, add_special_tokens=False).ids
            assert tokenizer.detokenize(ids) == text
        assert tokenizer.tokenize("fox") != oracle.encode("fox").ids  # the oracle's template adds <s>


def test_huggingface_special_ids(hf_folder):
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(hf_folder))
    assert (tokenizer.pad, tokenizer.bos, tokenizer.eos) == (0, 1, 2)
    assert tokenizer.eod == 2
    assert tokenizer.vocab["</s>"] == 2 and tokenizer.inv_vocab[1] == "<s>"
    assert tokenizer.detokenize([*tokenizer.tokenize("fox"), tokenizer.eod]) == "fox</s>"


def test_huggingface_config_and_overrides(tmp_path):
    _train_bpe().save(str(tmp_path / "tokenizer.json"))
    # no config beside it: the usual special-token names are recognised
    bare = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "tokenizer.json"))
    assert (bare.pad, bare.bos, bare.eos, bare.eod) == (0, 1, 2, 2)
    # a config naming only bos: eod falls back to bos
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "</s>"}))
    only_bos = build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    assert only_bos.eos is None and only_bos.pad is None and only_bos.bos == 2 and only_bos.eod == 2
    overridden = build_tokenizer("HuggingFaceTokenizer", str(tmp_path), eos_token="<pad>")
    assert overridden.eos == 0 and overridden.eod == 0
    with pytest.raises(ValueError, match="not in the vocabulary"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path), eos_token="<nope>")
    # a config naming no eos or bos: eod is a clear error
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match="no eos or bos"):
        _ = build_tokenizer("HuggingFaceTokenizer", str(tmp_path)).eod


def test_huggingface_matches_transformers(hf_folder):
    transformers = pytest.importorskip("transformers")
    oracle = transformers.AutoTokenizer.from_pretrained(str(hf_folder), local_files_only=True)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(hf_folder))
    assert (tokenizer.bos, tokenizer.eos, tokenizer.pad) == (oracle.bos_token_id, oracle.eos_token_id,
                                                             oracle.pad_token_id)
    assert tokenizer.vocab_size == len(oracle)
    for text in TEXTS:
        assert tokenizer.tokenize(text) == oracle.encode(text, add_special_tokens=False)


def test_huggingface_folder_without_tokenizer_json_uses_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe = _train_bpe()
    bpe.model.save(str(tmp_path))  # vocab.json + merges.txt only
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    oracle = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    assert (tokenizer.pad, tokenizer.bos, tokenizer.eos, tokenizer.eod) == (0, 1, 2, 2)
    assert tokenizer.vocab_size == len(oracle)
    for text in TEXTS:
        ids = tokenizer.tokenize(text)
        assert ids == bpe.encode(text, add_special_tokens=False).ids
        assert tokenizer.detokenize(ids) == text


def test_huggingface_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="HuggingFaceTokenizer") as error:  # wording depends on transformers
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    assert str(tmp_path) in _one_line(error)


def test_huggingface_corrupt_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot load") as error:
        build_tokenizer("HuggingFaceTokenizer", str(bad))
    assert str(bad) in _one_line(error)


# ----------------------------------------------------------------------------------------------------------------
# TikTokenizer

MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"  "]


def _write_tiktoken(path: Path, merges: list[bytes] = MERGES, skip_byte: int | None = None) -> None:
    """All single bytes at ranks 0..255 (but ``skip_byte``), then ``merges`` at ranks 256, 257, ..."""
    ranks = {bytes([b]): b for b in range(256) if b != skip_byte}
    ranks.update({merge: 256 + i for i, merge in enumerate(merges)})
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()))


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiktoken") / "tiny.tiktoken"
    _write_tiktoken(path)
    return path


def test_tiktoken_layout_and_hand_computed_ids(tiktoken_file):
    tokenizer = build_tokenizer("TikTokenizer", str(tiktoken_file))
    assert tokenizer.vocab_size == 1000 + 256 + len(MERGES)
    assert (tokenizer.inv_vocab[0], tokenizer.inv_vocab[1], tokenizer.inv_vocab[2]) == ("<unk>", "<s>", "</s>")
    assert tokenizer.inv_vocab[3] == "<SPECIAL_3>" and tokenizer.inv_vocab[999] == "<SPECIAL_999>"
    assert (tokenizer.bos, tokenizer.eos, tokenizer.eod, tokenizer.pad) == (1, 2, 2, None)
    assert tokenizer.inv_vocab[1000 + ord("a")] == "a" and tokenizer.vocab["hello"] == 1000 + 259
    # h e l l o -> he, ll -> hell -> hello (rank 259); " world" is one piece of the split, merged to rank 264
    assert tokenizer.tokenize("hello") == [1259]
    assert tokenizer.tokenize("hello world") == [1259, 1264]
    assert tokenizer.tokenize("<s>") == [1000 + ord("<"), 1000 + ord("s"), 1000 + ord(">")]


def test_tiktoken_round_trip_matches_library(tiktoken_file):
    import tiktoken

    from megatron.training.tokenizer.tiktoken_tokenizer import PATTERNS, load_ranks

    for pattern in ("v1", "v2", "cl100k"):
        tokenizer = build_tokenizer("TikTokenizer", str(tiktoken_file), pattern=pattern)
        oracle = tiktoken.Encoding("oracle", pat_str=PATTERNS[pattern], mergeable_ranks=load_ranks(tiktoken_file),
                                   special_tokens={})
        for text in [*TEXTS, "hello world, hello   world"]:
            ids = tokenizer.tokenize(text)
            assert ids == [rank + 1000 for rank in oracle.encode_ordinary(text)]
            assert all(1000 <= i < tokenizer.vocab_size for i in ids)
            assert tokenizer.detokenize(ids) == text
    # special ids are dropped on detokenize, as in Megatron
    assert tokenizer.detokenize([tokenizer.bos, *tokenizer.tokenize("hello"), tokenizer.eod]) == "hello"


def test_tiktoken_patterns_split_differently(tmp_path):
    path = tmp_path / "split.tiktoken"
    _write_tiktoken(path, merges=[b"lo", b"loW", b"12"])
    v1, v2, cl100k = (build_tokenizer("TikTokenizer", str(path), pattern=p) for p in ("v1", "v2", "cl100k"))
    low, twelve = 1000 + 257, 1000 + 258
    # v1 keeps "helloWorld" as one piece, so "loW" can merge; v2 splits it before the capital W
    assert low in v1.tokenize("helloWorld") and low not in v2.tokenize("helloWorld")
    # v1/v2 split digits one by one; cl100k keeps up to three together, so "12" can merge
    assert v1.tokenize("12345") == v2.tokenize("12345") == [1000 + ord(c) for c in "12345"]
    assert cl100k.tokenize("12345") == [twelve, 1000 + ord("3"), 1000 + ord("4"), 1000 + ord("5")]


def test_tiktoken_options(tiktoken_file):
    custom = build_tokenizer("TikTokenizer", str(tiktoken_file), num_special_tokens=10,
                             special_tokens=["<unk>", "</s>", "<s>", "<pad>"])
    assert (custom.eos, custom.bos, custom.pad, custom.eod) == (1, 2, 3, 1)
    assert custom.vocab_size == 10 + 256 + len(MERGES)
    assert custom.tokenize("hello") == [10 + 259]
    assert custom.inv_vocab[9] == "<SPECIAL_9>"
    # Megatron's argument names; an explicit --vocab-size keeps only the first vocab_size - num_special ranks
    truncated = build_tokenizer("TikTokenizer", str(tiktoken_file), vocab_size=1258, tiktoken_pattern="v1",
                                tiktoken_num_special_tokens=1000, tiktoken_special_tokens=None)
    assert truncated.vocab_size == 1258
    assert truncated.tokenize("hello") == [1256, 1257, 1000 + ord("o")]  # "hell" and "hello" are cut off
    assert truncated.detokenize(truncated.tokenize("hello")) == "hello"


def test_tiktoken_reads_megatron_json(tmp_path, tiktoken_file):
    from megatron.training.tokenizer.tiktoken_tokenizer import load_ranks

    ranks = load_ranks(tiktoken_file)
    vocab = [{"rank": rank, "token_bytes": base64.b64encode(token).decode(), "token_str": None}
             for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
    (tmp_path / "tekken.json").write_text(json.dumps({"vocab": vocab}))
    from_json = build_tokenizer("TikTokenizer", str(tmp_path / "tekken.json"))
    from_tiktoken = build_tokenizer("TikTokenizer", str(tiktoken_file))
    assert from_json.vocab_size == from_tiktoken.vocab_size
    for text in TEXTS:
        assert from_json.tokenize(text) == from_tiktoken.tokenize(text)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("aGVsbG8= 0 extra\n", "line 1"),
        ("!!!! 0\n", "line 1"),
        ("aGk= x\n", "line 1"),
        ("aGk= 0\naGk= 1\n", "appears twice"),
        ("aGk= 0\naGU= 0\n", "share a rank"),
        (None, "single-byte tokens"),
    ],
)
def test_tiktoken_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.tiktoken"
    if content is None:
        _write_tiktoken(path, skip_byte=ord("q"))
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        build_tokenizer("TikTokenizer", str(path))
    _one_line(error)


def test_tiktoken_bad_options(tiktoken_file):
    with pytest.raises(ValueError, match="unknown pattern 'v3'"):
        build_tokenizer("TikTokenizer", str(tiktoken_file), pattern="v3")
    with pytest.raises(ValueError, match="must include <s>"):
        build_tokenizer("TikTokenizer", str(tiktoken_file), special_tokens=["<unk>", "</s>"])
    with pytest.raises(ValueError, match="smaller than"):
        build_tokenizer("TikTokenizer", str(tiktoken_file), num_special_tokens=2)
    with pytest.raises(ValueError, match="must exceed"):
        build_tokenizer("TikTokenizer", str(tiktoken_file), vocab_size=1000)


# ----------------------------------------------------------------------------------------------------------------
# build_tokenizer errors


def test_unknown_type():
    with pytest.raises(ValueError, match="unknown tokenizer type 'GPT3Tokenizer'; choose from") as error:
        build_tokenizer("GPT3Tokenizer")
    message = _one_line(error)
    for name in ("GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "TikTokenizer", "NullTokenizer"):
        assert name in message


@pytest.mark.parametrize("tokenizer_type", ["GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "TikTokenizer"])
def test_model_file_required(tmp_path, tokenizer_type):
    with pytest.raises(ValueError, match="--tokenizer-model") as error:
        build_tokenizer(tokenizer_type)
    _one_line(error)
    missing = tmp_path / "nowhere" / "tok.model"
    with pytest.raises(FileNotFoundError) as error:
        build_tokenizer(tokenizer_type, str(missing))
    assert str(missing) in _one_line(error)


def test_null_tokenizer_needs_vocab_size():
    with pytest.raises(ValueError, match="--vocab-size") as error:
        build_tokenizer("NullTokenizer")
    _one_line(error)
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer", vocab_size=0)


def test_unsupported_option(tiktoken_file):
    with pytest.raises(ValueError, match="unsupported option"):
        build_tokenizer("TikTokenizer", str(tiktoken_file), patern="v2")


def test_tokenizers_pickle(tmp_path, sentencepiece_model, hf_folder, tiktoken_file):
    """Data-loader and preprocessing workers may receive a tokenizer by pickling."""
    import pickle

    tokenizers = [
        build_tokenizer("NullTokenizer", vocab_size=10),
        build_tokenizer("GPTSentencePieceTokenizer", str(sentencepiece_model)),
        build_tokenizer("HuggingFaceTokenizer", str(hf_folder)),
        build_tokenizer("TikTokenizer", str(tiktoken_file)),
    ]
    for tokenizer in tokenizers:
        text = "1 2 3" if tokenizer.vocab_size == 11 else "hello world"
        copy = pickle.loads(pickle.dumps(tokenizer))
        assert copy.tokenize(text) == tokenizer.tokenize(text) and copy.eod == tokenizer.eod


def test_command_line_flags_reach_the_tokenizer(tiktoken_file):
    from megatron.training.arguments import build_parser
    from megatron.training.tokenizer import build_tokenizer_from_args

    args = build_parser().parse_args(["--tokenizer-type", "TikTokenizer", "--tokenizer-model", str(tiktoken_file),
                                      "--tiktoken-num-special-tokens", "10", "--tiktoken-special-tokens", "<unk>",
                                      "</s>", "<s>", "<pad>"])
    tokenizer = build_tokenizer_from_args(args)
    assert (tokenizer.eos, tokenizer.bos, tokenizer.pad) == (1, 2, 3)
    assert tokenizer.tokenize("hello") == [10 + 259]
