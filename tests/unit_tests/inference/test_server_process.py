"""The server end to end: a tiny checkpoint with a Hugging Face BPE tokenizer, built in the test, served by
``tools/run_hybrid_text_generation_server.py`` as a real process (one process, and two tensor-parallel processes
under torchrun with gloo), queried over HTTP with ``requests``.

Oracles: the same model loaded in this process and run by ``TextGenerator`` directly, and the single-process server
for the tensor-parallel one (greedy answers identical token for token). The loading paths (same layout, a pipelined
checkpoint re-split on load, a tensor-parallel re-padding of the vocabulary, a draft model for speculative decoding)
and the one-line errors are checked in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
import torch

from megatron.core.inference.sampling import GREEDY
from megatron.core.inference.text_generation import TextGenerator, TextRequest
from megatron.inference.model_loading import (
    VocabularyMask,
    load_draft_model,
    load_model_for_serving,
    parse_serving_args,
)
from megatron.training.arguments import ArgumentError, parse_args
from megatron.training.checkpoint_reshard import convert_checkpoint
from megatron.training.checkpointing import CheckpointError, save_checkpoint
from megatron.training.tokenizer import build_tokenizer_from_args, padded_vocab_size
from megatron.training.training import build_model

from ..models.helpers import randomize_

REPO = Path(__file__).resolve().parents[3]
SERVER = REPO / "tools" / "run_hybrid_text_generation_server.py"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A hybrid model mixes Mamba layers, attention layers and MLP layers.",
    "def add(a, b):\n    return a + b\n",
    "Tensor parallelism splits every matrix over the ranks of a group.",
    "Checkpoints are saved in Megatron's legacy layout, one file per rank.",
] * 4
MODEL_FLAGS = [
    "--hybrid-layer-pattern", "M*-M", "--hidden-size", "32", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--ffn-hidden-size", "64", "--mamba-head-dim", "8", "--mamba-num-groups", "2",
    "--mamba-state-dim", "8", "--seq-length", "64", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--seed", "3",
]
DRAFT_FLAGS = [
    "--hybrid-layer-pattern", "M-", "--hidden-size", "16", "--ffn-hidden-size", "32", "--mamba-head-dim", "8",
    "--mamba-num-groups", "2", "--mamba-state-dim", "8", "--seq-length", "64", "--normalization", "RMSNorm",
    "--position-embedding-type", "none", "--seed", "4",
]
PROMPTS = ["The quick brown", "def add(a, b):"]
URL_LINE = re.compile(r" at (http://\S+)$")


def write_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer (about 300 tokens, so the vocabulary pads to 384 at TP1 and 512 at TP2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


def save_model(directory: Path, flags: list[str], tokenizer_flags: list[str], true_vocab: int | None = None) -> None:
    """Build the model ``flags`` describe (weights made larger and more varied than at initialisation, so that no
    greedy choice is a near tie) and save it as iteration 5 with its args."""
    args = parse_args([*flags, *tokenizer_flags], training=False)
    vocab = true_vocab or build_tokenizer_from_args(args).vocab_size
    args.true_vocab_size = vocab
    args.padded_vocab_size = padded_vocab_size(vocab, args.make_vocab_size_divisible_by, 1)
    torch.manual_seed(args.seed)
    model = randomize_(build_model(args))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("word_embeddings.weight", "output_layer.weight")):
                parameter.mul_(20.0)
    save_checkpoint(directory, 5, model, None, None, args)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    tokenizer = write_tokenizer(root / "tokenizer")
    tokenizer_flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer)]
    save_model(root / "model", MODEL_FLAGS, tokenizer_flags)
    save_model(root / "draft", DRAFT_FLAGS, tokenizer_flags)
    save_model(root / "other_vocab", DRAFT_FLAGS, ["--tokenizer-type", "NullTokenizer", "--vocab-size", "200"])
    return {"root": root, "model": root / "model", "draft": root / "draft", "other_vocab": root / "other_vocab",
            "tokenizer": tokenizer}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def in_process_generator(load: Path, *extra: str) -> TextGenerator:
    args = parse_serving_args(["--load", str(load), "--use-checkpoint-args", *extra])
    model, tokenizer, max_length = load_model_for_serving(args)
    return TextGenerator(model, tokenizer, max_length)


# ---------------------------------------------------------------------------------------------- in this process

def test_use_checkpoint_args_is_enough(checkpoint):
    args = parse_serving_args(["--load", str(checkpoint["model"]), "--use-checkpoint-args"])
    assert args.hybrid_layer_pattern == "M*-M" and args.hidden_size == 32 and args.num_query_groups == 2
    assert args.tokenizer_type == "HuggingFaceTokenizer" and args.max_position_embeddings == 64
    assert (args.port, args.host, args.num_speculative_tokens, args.model_name) == (5000, "127.0.0.1", 4, "model")
    model, tokenizer, max_length = load_model_for_serving(args)
    assert max_length == 64 and isinstance(model, VocabularyMask) and not model.training
    assert args.true_vocab_size == tokenizer.vocab_size == 300 and args.padded_vocab_size == 384
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.tokenize("The quick")]))
    assert logits.shape[-1] == 384 and torch.isinf(logits[..., 300:]).all() and torch.isfinite(logits[..., :300]).all()


def test_flags_that_contradict_the_checkpoint_are_refused(checkpoint):
    load = ["--load", str(checkpoint["model"]), "--use-checkpoint-args"]
    with pytest.raises(ArgumentError, match="--hidden-size 64 vs the checkpoint's 32"):
        parse_serving_args([*load, "--hidden-size", "64"])
    with pytest.raises(ArgumentError, match="layer pattern 'MM' vs the checkpoint's 'M\\*-M'"):
        parse_serving_args([*load, "--num-layers", "2"])
    assert parse_serving_args([*load, "--hidden-size", "32", "--hybrid-layer-pattern", "M*-M"]).hidden_size == 32
    with pytest.raises(ArgumentError, match="--pipeline-model-parallel-size"):
        parse_serving_args([*load, "--pipeline-model-parallel-size", "2"])
    with pytest.raises(ArgumentError, match="--load is required"):
        parse_serving_args(["--use-checkpoint-args"])
    with pytest.raises(CheckpointError, match="does not exist"):
        parse_serving_args(["--load", str(checkpoint["root"] / "missing"), "--use-checkpoint-args"])


def test_checkpoint_for_another_model_or_tokenizer_is_refused(checkpoint):
    tokenizer = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(checkpoint["tokenizer"])]
    flags = [arg if arg != "32" else "48" for arg in MODEL_FLAGS]  # hidden size 48
    with pytest.raises(CheckpointError, match="different model"):
        load_model_for_serving(parse_serving_args(["--load", str(checkpoint["model"]), *flags, *tokenizer]))
    null = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]
    args = parse_serving_args(["--load", str(checkpoint["model"]), "--use-checkpoint-args", *null])
    with pytest.raises(CheckpointError, match="vocabulary of 300 tokens but the tokenizer has 101"):
        load_model_for_serving(args)


def test_pipelined_checkpoint_is_resplit_on_load(checkpoint):
    pipelined = checkpoint["root"] / "tp1pp2"
    convert_checkpoint(checkpoint["model"], pipelined, 1, 2)
    request = TextRequest(PROMPTS, tokens_to_generate=10, sampling=GREEDY, return_log_probs=True)
    expected = in_process_generator(checkpoint["model"]).generate(request)
    actual = in_process_generator(pipelined).generate(request)
    assert actual.tokens == expected.tokens and actual.logprobs == expected.logprobs


def test_draft_model_for_speculative_decoding(checkpoint):
    args = parse_serving_args(["--load", str(checkpoint["model"]), "--use-checkpoint-args",
                               "--draft-load", str(checkpoint["draft"]), "--num-speculative-tokens", "3"])
    model, tokenizer, max_length = load_model_for_serving(args)
    draft, draft_limit = load_draft_model(args, tokenizer)
    assert draft.model.hybrid_pattern == "M-" and draft_limit >= max_length
    plain = TextGenerator(model, tokenizer, max_length)
    speculative = TextGenerator(model, tokenizer, max_length, draft_model=draft, num_speculative_tokens=3)
    request = TextRequest(PROMPTS, tokens_to_generate=12, sampling=GREEDY)
    assert speculative.generate(request).tokens == plain.generate(request).tokens
    args.draft_load = str(checkpoint["other_vocab"])
    with pytest.raises(CheckpointError, match="vocabulary of 201 tokens but the tokenizer has 300"):
        load_draft_model(args, tokenizer)


# ------------------------------------------------------------------------------------------------ real processes

class ServerProcess:
    """A server started in its own session; its output is collected by a thread (so that no pipe fills up)."""

    def __init__(self, command: list[str]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            match = URL_LINE.search(line.rstrip("\n"))
            if match and self.url is None:
                self.url = match[1]
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout: float = 90) -> str:
        self.ready.wait(timeout)
        assert self.url is not None, "server did not start:\n" + "\n".join(self.lines[-30:])
        return self.url

    def interrupt(self) -> None:
        """SIGTERM to the launched process (torchrun forwards it to its workers)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self) -> int:
        """The exit status, after a SIGKILL of the whole session if the process does not end in 30 s."""
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def servers(checkpoint):
    """The single-process server and the two-rank tensor-parallel one, started together."""
    flags = ["--load", str(checkpoint["model"]), "--use-checkpoint-args", "--port", "0"]
    single = ServerProcess([sys.executable, str(SERVER), *flags])
    tensor_parallel = ServerProcess([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node", "2", str(SERVER), *flags,
                                     "--tensor-model-parallel-size", "2", "--distributed-backend", "gloo"])
    try:
        yield single, tensor_parallel
    finally:
        for server in (single, tensor_parallel):
            server.interrupt()
        codes = [server.wait() for server in (single, tensor_parallel)]
        assert codes[0] == 0 and "server stopped" in single.lines, "\n".join(single.lines[-20:])


def test_single_process_server(servers, checkpoint):
    url = servers[0].wait_ready()
    expected = in_process_generator(checkpoint["model"]).generate(
        TextRequest(PROMPTS, tokens_to_generate=10, sampling=GREEDY, return_log_probs=True))
    health = requests.get(f"{url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["max_sequence_length"] == 64 and health["model"] == "model"
    answer = requests.put(f"{url}/api", json={"prompts": PROMPTS, "tokens_to_generate": 10, "top_k": 1,
                                              "logprobs": True}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["tokens"] == expected.tokens and body["text"] == expected.text
    assert body["segments"] == expected.segments
    for row, expected_row in zip(body["logprobs"], expected.logprobs, strict=True):
        assert row == pytest.approx(expected_row, rel=1e-4, abs=1e-5)
    completion = requests.post(f"{url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 10,
                                                              "temperature": 0}, timeout=60).json()
    assert completion["choices"][0]["text"] == expected.completions[0]
    assert completion["usage"]["prompt_tokens"] == expected.prompt_tokens[0]
    bad = requests.put(f"{url}/api", json={"prompts": PROMPTS, "tokens_to_generate": 60}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"].startswith("prompts:")


def test_tensor_parallel_server_gives_the_single_process_answers(servers):
    single_url, url = servers[0].wait_ready(), servers[1].wait_ready()
    request = {"prompts": PROMPTS, "tokens_to_generate": 12, "top_k": 1, "logprobs": True}
    single = requests.put(f"{single_url}/api", json=request, timeout=60).json()
    answer = requests.put(f"{url}/api", json=request, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["tokens"] == single["tokens"] and body["text"] == single["text"]
    for row, expected_row in zip(body["logprobs"], single["logprobs"], strict=True):
        assert row == pytest.approx(expected_row, rel=1e-4, abs=1e-4)
    completion = {"prompt": PROMPTS, "max_tokens": 8, "temperature": 0, "echo": True}
    assert (requests.post(f"{url}/v1/completions", json=completion, timeout=60).json()["choices"]
            == requests.post(f"{single_url}/v1/completions", json=completion, timeout=60).json()["choices"])
    # Refused requests never reach the other rank, which keeps following: sampled requests (seeded or not) work.
    assert requests.put(f"{url}/api", json={"prompts": ["x"] * 129}, timeout=30).status_code == 400
    assert requests.put(f"{url}/api", json={"prompts": PROMPTS, "tokens_to_generate": 60}, timeout=30).status_code \
        == 400
    seeded = {"prompts": PROMPTS, "tokens_to_generate": 8, "temperature": 1.5, "random_seed": 11}
    first = requests.put(f"{url}/api", json=seeded, timeout=60)
    assert first.status_code == 200 and requests.put(f"{url}/api", json=seeded, timeout=60).json() == first.json()
    unseeded = requests.put(f"{url}/api", json={"prompts": PROMPTS, "tokens_to_generate": 8, "top_p": 0.9},
                            timeout=60)
    assert unseeded.status_code == 200
    assert requests.get(f"{url}/health", timeout=30).json()["tensor_model_parallel_size"] == 2


@pytest.mark.parametrize(("extra", "message"), [
    (["--use-checkpoint-args", "--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["--use-checkpoint-args", "--hidden-size", "8"], "--hidden-size 8 vs the checkpoint's 32"),
    (["--use-checkpoint-args", "--draft-load", "MISSING"], "checkpoint directory MISSING does not exist"),
])
def test_user_errors_exit_2_with_one_line(checkpoint, capsys, extra, message):
    spec = importlib.util.spec_from_file_location("run_hybrid_text_generation_server", SERVER)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    extra = [str(checkpoint["root"] / "missing") if arg == "MISSING" else arg for arg in extra]
    assert tool.main(["--load", str(checkpoint["model"]), *extra]) == 2
    error = capsys.readouterr().err
    assert error.startswith("run_hybrid_text_generation_server.py: error: ") and len(error.splitlines()) == 1
    assert message.replace("MISSING", str(checkpoint["root"] / "missing")) in error
