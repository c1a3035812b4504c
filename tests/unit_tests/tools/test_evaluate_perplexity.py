"""tools/evaluate_perplexity.py and megatron.training.perplexity: the sliding-window NLL against a brute-force
computation, every token scored exactly once, text loading, the command line end to end on a saved checkpoint
(TP1 and a TP2 x PP2 copy) and on a Hugging Face Llama folder against transformers itself, and one-line errors.

Everything is built here, offline: a byte-level BPE tokenizer.json trained on a few sentences, a tiny randomised
hybrid checkpoint saved with ``save_checkpoint`` and a tiny random ``LlamaForCausalLM`` saved with
``save_pretrained``. The tool runs as a subprocess where the process matters (a .txt run, a .jsonl run, an error);
the other cases call its ``main`` in-process to keep the suite fast.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: nothing may come from a hub

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from megatron.training.perplexity import (
    PerplexityInputError,
    documents_nll,
    plan_windows,
    prepare_sequences,
    read_documents,
    sliding_window_nll,
    tokenize_documents,
)

from ..models.helpers import randomize_, tiny_model

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "tools" / "evaluate_perplexity.py"
SEQ_LENGTH = 48
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hybrid models interleave Mamba layers with attention layers.",
    "State space models scan the sequence once; attention looks at every pair of tokens.",
] * 10
LONG_TEXT = ("State space models scan the sequence once, while attention looks at every pair of tokens. "
             "The quick brown fox jumps over the lazy dog; hybrid models interleave both kinds of layers.\n")
SHORT_TEXT = "The quick brown fox jumps over the lazy dog. Hybrid models scan once."
DOCUMENTS = ["The quick brown fox jumps over the lazy dog.", "Hybrid models interleave Mamba layers with attention.",
             "Attention looks at every pair of tokens; state space models scan once."]


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evaluate_perplexity_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120,
                          cwd=str(REPO), env=env)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


# -------------------------------------------------------------------------------------------- the sliding window

@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(tiny_model("M*-M", vocab_size=37, max_sequence_length=64)).double().eval()


def brute_force(model: torch.nn.Module, tokens: torch.Tensor, window: int, stride: int) -> float:
    """Sum over tokens i >= 1 of -log p(t_i | t[b:i]), b the start of the strided scheme's window that scores i:
    windows start at 0, stride, 2 * stride, ...; the first whose inputs reach position i - 1 scores t_i."""
    total = 0.0
    with torch.no_grad():
        for i in range(1, len(tokens)):
            begin = max(0, math.ceil((i - window) / stride)) * stride
            assert 1 <= i - begin <= window  # at least one token of context, never more than a window
            logits = model(tokens[None, begin:i])[0, -1]
            total -= float(torch.log_softmax(logits, -1)[tokens[i]])
    return total


def test_every_token_is_scored_exactly_once():
    for length in range(0, 30):
        for window in range(1, 10):
            for stride in range(1, window + 1):
                windows = plan_windows(length, window, stride)
                scored = [p for w in windows for p in range(w.score_from, w.end)]
                assert scored == list(range(max(length - 1, 0)))  # the predictions of tokens 1 .. length - 1
                for k, w in enumerate(windows):
                    assert w.begin == k * stride and 1 <= w.length <= window and w.begin <= w.score_from < w.end
                    if k:  # past the first window every scored token has at least window - stride tokens before it
                        assert w.score_from - w.begin + 1 >= window - stride + 1
    with pytest.raises(PerplexityInputError, match="larger than --window"):
        plan_windows(10, 4, 5)
    with pytest.raises(PerplexityInputError, match="--stride must be >= 1"):
        plan_windows(10, 4, 0)


@pytest.mark.parametrize(("window", "stride"), [(8, 3), (8, 8), (6, 1), (5, 4), (1, 1)])
def test_sliding_window_matches_brute_force(small_model, window, stride):
    torch.manual_seed(1)
    tokens = torch.randint(0, 37, (23,))
    expected = brute_force(small_model, tokens, window, stride)
    for batch_size in (1, 4):
        total, scored = sliding_window_nll(small_model, tokens, window, stride, batch_size=batch_size)
        assert scored == len(tokens) - 1
        assert total == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("window", [28, 29, 40])
def test_a_window_as_long_as_the_text_is_one_forward(small_model, window):
    torch.manual_seed(2)
    tokens = torch.randint(0, 37, (29,))
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(small_model(tokens[None])[0, :-1], tokens[1:])
    total, scored = sliding_window_nll(small_model, tokens.tolist(), window, max(1, window // 2))
    assert scored == 28 and total / scored == pytest.approx(float(full), rel=1e-10)


def test_documents_of_different_lengths_share_padded_batches(small_model):
    torch.manual_seed(3)
    documents = [torch.randint(0, 37, (n,)).tolist() for n in (1, 2, 7, 19, 11, 30)]
    expected = [sliding_window_nll(small_model, d, 9, 4) for d in documents]
    total, scored = documents_nll(small_model, documents, 9, 4, batch_size=5)
    assert scored == sum(s for _, s in expected) == sum(len(d) - 1 for d in documents)
    assert total == pytest.approx(sum(t for t, _ in expected), rel=1e-10)


def test_reading_and_joining_documents(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("first line\n\n  \nsecond line\n")
    assert read_documents(text) == ["first line\n\n  \nsecond line\n"]
    assert read_documents(text, split_lines=True) == ["first line", "second line"]
    records = tmp_path / "b.jsonl"
    records.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n{"text": "  "}\n{"body": "x", "text": "3"}\n')
    assert read_documents(records) == ["one", "two", "3"]
    records.write_text('{"body": "x"}\n')
    assert read_documents(records, json_key="body") == ["x"]
    text.write_text('{"text": "as jsonl"}\n')
    assert read_documents(text, fmt="jsonl") == ["as jsonl"] and read_documents(text) == ['{"text": "as jsonl"}\n']
    for content, message in (('{"text": "a"}\n[1]\n', "line 2 is not a JSON object"),
                             ('{"text": "a"}\nnot json\n', "line 2 is not JSON"),
                             ('{"other": "a"}\n', "line 1 has no 'text' key"),
                             ('{"text": 5}\n', "is a int, not a string"), ("\n\n", "has no text")):
        records.write_text(content)
        with pytest.raises(PerplexityInputError, match=message) as error:
            read_documents(records)
        assert "\n" not in str(error.value)
    with pytest.raises(PerplexityInputError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")

    def tokenize(document):
        return [len(word) for word in document.split()]

    tokenized = tokenize_documents(["aa b", "", "ccc dddd e"], tokenize, bos=9)
    assert tokenized == [[9, 2, 1], [9, 3, 4, 1]]
    assert prepare_sequences(tokenized, 0) == ([[9, 2, 1, 0, 9, 3, 4, 1]], 2, False)
    assert prepare_sequences(tokenized, 0, max_tokens=3) == ([[9, 2, 1]], 1, True)
    assert prepare_sequences(tokenized, 0, max_tokens=5) == ([[9, 2, 1, 0, 9]], 2, True)
    assert prepare_sequences(tokenized, 0, per_document=True, max_tokens=5) == ([[9, 2, 1], [9, 3]], 2, True)
    assert prepare_sequences(tokenized, None, per_document=True) == (tokenized, 2, False)
    with pytest.raises(PerplexityInputError, match="per-document"):
        prepare_sequences(tokenized, None)
    with pytest.raises(PerplexityInputError, match="no tokens"):
        tokenize_documents(["", " "], tokenize)


# ---------------------------------------------------------------------------------------------- files built here

def _train_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A tokenizer folder, a TP1 checkpoint of a randomised tiny hybrid using it, its model, and input files."""
    from megatron.training.arguments import parse_args
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.tokenizer import build_tokenizer, padded_vocab_size
    from megatron.training.training import build_model

    root = tmp_path_factory.mktemp("perplexity")
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir()
    _train_bpe().save(str(tokenizer_dir / "tokenizer.json"))
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(tokenizer_dir))
    args = parse_args(["--hybrid-layer-pattern", "M*-M", "--hidden-size", "32", "--num-attention-heads", "4",
                       "--group-query-attention", "--num-query-groups", "2", "--mamba-num-groups", "2",
                       "--mamba-head-dim", "8", "--mamba-state-dim", "8", "--ffn-hidden-size", "48",
                       "--seq-length", str(SEQ_LENGTH), "--normalization", "RMSNorm", "--swiglu",
                       "--disable-bias-linear", "--position-embedding-type", "rope", "--tokenizer-type",
                       "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir)], training=False)
    args.true_vocab_size = tokenizer.vocab_size
    args.padded_vocab_size = padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by, 1)
    assert args.padded_vocab_size > args.true_vocab_size  # padding rows whose logits the tool must mask
    torch.manual_seed(0)
    model = randomize_(build_model(args)).eval()
    save_checkpoint(root / "checkpoint", 1, model, None, None, args)
    (root / "long.txt").write_text(LONG_TEXT)
    (root / "short.txt").write_text(SHORT_TEXT)
    (root / "docs.jsonl").write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(DOCUMENTS)))
    vocab = tokenizer.vocab_size
    return {"root": root, "tokenizer_dir": tokenizer_dir, "tokenizer": tokenizer, "model": model,
            "checkpoint": root / "checkpoint", "logits": lambda ids: model(ids)[..., :vocab]}


def _reference(workspace: dict, sequences: list[list[int]], window: int, stride: int) -> float:
    total, scored = documents_nll(workspace["logits"], sequences, window, stride)
    return math.exp(total / scored)


# ------------------------------------------------------------------------------------------- a --load checkpoint

def test_checkpoint_on_text_and_jsonl(workspace, tmp_path):
    tokenizer, root = workspace["tokenizer"], workspace["root"]
    ids = tokenizer.tokenize(LONG_TEXT)
    assert len(ids) > 2 * SEQ_LENGTH  # several windows at the default window

    result = run_tool("--load", str(workspace["checkpoint"]), "--input", str(root / "long.txt"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) >= {"perplexity", "nll", "tokens", "documents", "window", "stride", "model", "input"}
    assert (report["window"], report["stride"]) == (SEQ_LENGTH, SEQ_LENGTH // 2)
    assert report["tokens"] == len(ids) - 1 and report["documents"] == 1
    assert report["perplexity"] == pytest.approx(_reference(workspace, [ids], SEQ_LENGTH, SEQ_LENGTH // 2), rel=1e-5)
    assert report["nll"] == pytest.approx(math.log(report["perplexity"]), rel=1e-9)
    model = report["model"]
    assert model["type"] == "megatron" and model["layer_pattern"] == "M*-M" and model["max_sequence_length"] == 48
    assert (model["vocab_size"], model["padded_vocab_size"]) == (tokenizer.vocab_size, 384)
    assert report["input"]["format"] == "txt" and report["input"]["truncated"] is False
    # the padding rows' logits are masked out: without the mask the number would differ
    unmasked_total, unmasked_scored = documents_nll(workspace["model"], [ids], SEQ_LENGTH, SEQ_LENGTH // 2)
    assert math.exp(unmasked_total / unmasked_scored) != pytest.approx(report["perplexity"], rel=1e-3)

    out = tmp_path / "docs.json"
    result = run_tool("--load", str(workspace["checkpoint"]), "--input", str(root / "docs.jsonl"), "--per-document",
                      "--window", "8", "--stride", "3", "--batch-size", "3", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("perplexity ")
    report = json.loads(out.read_text())
    documents = [tokenizer.tokenize(d) for d in DOCUMENTS]
    assert report["documents"] == 3 and report["tokens"] == sum(len(d) - 1 for d in documents)
    assert (report["window"], report["stride"]) == (8, 3)
    assert report["input"]["format"] == "jsonl" and report["input"]["json_key"] == "text"
    assert report["perplexity"] == pytest.approx(_reference(workspace, documents, 8, 3), rel=1e-5)
    assert f"perplexity {report['perplexity']:.4f}" in result.stdout


def test_checkpoint_joined_documents_and_cap(workspace, tmp_path, capsys):
    tool, tokenizer, root = load_tool(), workspace["tokenizer"], workspace["root"]
    out = tmp_path / "joined.json"
    assert tool.main(["--load", str(workspace["checkpoint"]), "--input", str(root / "docs.jsonl"), "--window", "16",
                      "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    joined = tokenizer.tokenize(DOCUMENTS[0])
    for document in DOCUMENTS[1:]:
        joined += [tokenizer.eod, *tokenizer.tokenize(document)]
    assert report["documents"] == 3 and report["tokens"] == len(joined) - 1 and report["stride"] == 8
    assert report["perplexity"] == pytest.approx(_reference(workspace, [joined], 16, 8), rel=1e-5)

    assert tool.main(["--load", str(workspace["checkpoint"]), "--input", str(root / "docs.jsonl"), "--window", "16",
                      "--max-tokens", "12", "--add-bos", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    capped = [tokenizer.bos, *tokenizer.tokenize(DOCUMENTS[0]), tokenizer.eod, tokenizer.bos][:12]
    assert report["tokens"] == 11 and report["input"]["truncated"] is True and report["input"]["add_bos"] is True
    assert report["perplexity"] == pytest.approx(_reference(workspace, [capped], 16, 8), rel=1e-5)
    capsys.readouterr()


def test_partitioned_checkpoint_is_gathered(workspace, tmp_path, capsys):
    from megatron.training.checkpoint_reshard import convert_checkpoint

    convert_checkpoint(workspace["checkpoint"], tmp_path / "tp2pp2", 2, 2)
    tool, results = load_tool(), []
    for directory in (workspace["checkpoint"], tmp_path / "tp2pp2"):
        out = tmp_path / f"{directory.name}.json"
        assert tool.main(["--load", str(directory), "--input", str(workspace["root"] / "long.txt"), "--window", "20",
                          "--stride", "7", "--max-tokens", "80", "--batch-size", "4", "--json", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[1]["model"]["saved_layout"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}
    assert results[1]["tokens"] == results[0]["tokens"]
    assert results[1]["perplexity"] == pytest.approx(results[0]["perplexity"], rel=1e-6)
    capsys.readouterr()


# ------------------------------------------------------------------------------------------ a Hugging Face folder

@pytest.fixture(scope="module")
def llama_dir(workspace) -> Path:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    folder = workspace["root"] / "llama"
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(workspace["tokenizer_dir"] / "tokenizer.json")),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=SEQ_LENGTH, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_hf_dir_matches_transformers(llama_dir, workspace, tmp_path, capsys):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir), local_files_only=True,
                                                              dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(llama_dir), local_files_only=True)
    short = workspace["root"] / "short.txt"
    ids = torch.tensor([tokenizer(SHORT_TEXT, add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] <= SEQ_LENGTH + 1  # one window holds the whole text

    tool = load_tool()
    assert tool.main(["--hf-dir", str(llama_dir), "--input", str(short)]) == 0
    report = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss  # transformers' own mean next-token loss
    assert report["tokens"] == ids.shape[1] - 1 and report["window"] == SEQ_LENGTH
    assert report["model"]["type"] == "huggingface" and report["model"]["architecture"] == "LlamaForCausalLM"
    assert report["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)

    # strided: each window scores the tokens the previous one did not, the rest of the window as context
    window, stride, long_ids = 10, 4, tokenizer(LONG_TEXT, add_special_tokens=False)["input_ids"]
    total, count, scored_until = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(long_ids) - 1, stride):
            end = min(begin + window, len(long_ids) - 1)
            logits = model(input_ids=torch.tensor([long_ids[begin:end]])).logits[0]
            targets = torch.tensor(long_ids[scored_until + 1:end + 1])
            total += float(torch.nn.functional.cross_entropy(logits[scored_until - begin:], targets, reduction="sum"))
            count, scored_until = count + len(targets), end
            if end == len(long_ids) - 1:
                break
    out = tmp_path / "llama.json"
    assert tool.main(["--hf-dir", str(llama_dir), "--input", str(workspace["root"] / "long.txt"), "--window",
                             str(window), "--stride", str(stride), "--batch-size", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["tokens"] == count == len(long_ids) - 1
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    capsys.readouterr()


# ------------------------------------------------------------------------------------------------------- errors

def test_user_errors_are_one_line(workspace, tmp_path, capsys):
    tool, root, checkpoint = load_tool(), workspace["root"], str(workspace["checkpoint"])
    (tmp_path / "blank.txt").write_text(" \n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{broken\n')
    (tmp_path / "one.txt").write_text("x")
    cases = [
        (["--load", checkpoint, "--input", str(tmp_path / "missing.txt")], "does not exist"),
        (["--load", checkpoint, "--input", str(tmp_path / "blank.txt")], "has no text"),
        (["--load", checkpoint, "--input", str(tmp_path / "bad.jsonl")], "line 2 is not JSON"),
        (["--load", checkpoint, "--input", str(root / "long.txt"), "--window", "49"],
         "--window 49 is longer than the model's longest sequence (48)"),
        (["--load", checkpoint, "--input", str(root / "long.txt"), "--window", "8", "--stride", "9"],
         "--stride 9 is larger than --window 8"),
        (["--load", checkpoint, "--input", str(root / "long.txt"), "--stride", "60"],
         "--stride 60 is larger than --window 48"),
        (["--load", checkpoint, "--input", str(root / "long.txt"), "--window", "0"], "--window must be >= 1"),
        (["--load", checkpoint, "--input", str(tmp_path / "one.txt")], "nothing to score"),
        (["--load", checkpoint, "--input", str(root / "long.txt"), "--max-tokens", "1"], "nothing to score"),
        (["--load", str(tmp_path / "nowhere"), "--input", str(root / "long.txt")], "does not exist"),
        (["--load", str(tmp_path), "--input", str(root / "long.txt")], "not a checkpoint directory"),
        (["--input", str(root / "long.txt")], "one of the arguments --load --hf-dir is required"),
        (["--hf-dir", str(tmp_path), "--input", str(root / "long.txt"), "--tokenizer-model", "x"],
         "only apply to --load"),
        (["--hf-dir", str(tmp_path / "nowhere"), "--input", str(root / "long.txt")], "is not a folder"),
        (["--load", checkpoint, "--input", str(root / "long.txt"), "--json", str(tmp_path / "no" / "out.json")],
         "does not exist"),
    ]
    for argv, message in cases:
        assert tool.main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
        assert message in captured.err, (message, captured.err)

    result = run_tool("--load", checkpoint, "--input", str(root / "long.txt"), "--window", "8", "--stride", "9")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: --stride 9 is larger than --window 8: tokens between windows would never be "
                             "scored\n")
