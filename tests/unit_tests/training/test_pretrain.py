"""End-to-end CPU runs of pretrain_hybrid.py on mock data: the loss falls, a resumed run equals an uninterrupted one
bit for bit, SIGTERM saves and stops, and user mistakes exit with status 2 and one line."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron.training.arguments import parse_args
from megatron.training.training import pretrain

ROOT = Path(__file__).resolve().parents[3]
TINY = ["--num-layers", "4", "--hybrid-attention-ratio", "0.25", "--hybrid-mlp-ratio", "0.25", "--hidden-size", "32",
        "--num-attention-heads", "4", "--mamba-head-dim", "8", "--mamba-num-groups", "2", "--mamba-state-dim", "8",
        "--seq-length", "16", "--max-position-embeddings", "16", "--position-embedding-type", "rope",
        "--normalization", "RMSNorm", "--disable-bias-linear", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "50", "--log-interval", "5",
        "--eval-interval", "10", "--eval-iters", "2", "--hidden-dropout", "0.1", "--attention-dropout", "0.0",
        "--distributed-backend", "gloo"]


def run(argv: list[str]) -> dict[str, float]:
    return pretrain(parse_args(TINY + argv))


def test_twenty_iterations_reduce_the_loss(tmp_path, capsys):
    results = run(["--train-iters", "20"])
    out = capsys.readouterr().out
    losses = [float(line.split("lm loss: ")[1].split(" ")[0]) for line in out.splitlines() if "lm loss: " in line]
    assert "iteration       20/      20 | consumed samples:           80 |" in out
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3  # mock tokens are learnable sequences
    assert results["iteration"] == 20


def test_resume_equals_uninterrupted_run(tmp_path):
    uninterrupted = run(["--train-iters", "12", "--save", str(tmp_path / "a"), "--save-interval", "100"])
    run(["--train-iters", "12", "--save", str(tmp_path / "b"), "--exit-interval", "6"])
    resumed = run(["--train-iters", "12", "--load", str(tmp_path / "b"), "--save", str(tmp_path / "b")])
    assert resumed["train_loss"] == uninterrupted["train_loss"]
    a = torch.load(tmp_path / "a" / "iter_0000012" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "iter_0000012" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name


def test_sigterm_saves_and_exits(tmp_path):
    command = [sys.executable, str(ROOT / "pretrain_hybrid.py"), *TINY, "--train-iters", "100000",
               "--exit-signal-handler", "--save", str(tmp_path), "--log-interval", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if "iteration        3/" in line:
            break
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "exiting at iteration" in output
    iteration = int((tmp_path / "latest_checkpointed_iteration.txt").read_text())
    assert (tmp_path / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train-iters", "5", "--tokenizer-type", "NoSuchTokenizer"], "invalid choice: 'NoSuchTokenizer'"),
        (["--train-iters", "5", "--hybrid-override-pattern", "MMXM"], "invalid symbol"),
        (["--train-iters", "5", "--global-batch-size", "3"], "global-batch-size"),
        (["--train-iters", "5", "--load", "/nonexistent/checkpoints"], "not a checkpoint directory"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, extra, message):
    started = time.time()
    result = subprocess.run([sys.executable, str(ROOT / "pretrain_hybrid.py"), *TINY, *extra], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert time.time() - started < 120


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_mixed_precision_runs_train(precision, capsys):
    results = run(["--train-iters", "6", precision, "--initial-loss-scale", "65536", "--log-interval", "3"])
    out = capsys.readouterr().out
    assert torch.isfinite(torch.tensor(results["train_loss"]))
    assert ("loss scale: " in out) == (precision == "--fp16")


def test_data_errors_come_before_anything_is_built(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "1 2 3 40 45 49"}\n{"text": "' + " ".join(str(i) for i in range(5, 30)) + '"}\n')
    subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(corpus),
                    "--output-prefix", str(tmp_path / "d"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "50"],
                   check=True, capture_output=True)
    vocab_at = TINY.index("--vocab-size")
    base = [arg for arg in TINY[:vocab_at] + TINY[vocab_at + 2:] if arg != "--mock-data"]
    base += ["--train-iters", "3", "--split", "100,0,0", "--eval-iters", "0", "--save", str(tmp_path / "ckpt")]
    cases = [
        (["--data-path", str(tmp_path / "missing"), "--vocab-size", "50"], "not found"),
        (["--data-path", str(tmp_path / "d_text_document"), "--vocab-size", "20"], "holds token id 49"),
    ]
    for extra, message in cases:
        argv = base + extra
        result = subprocess.run([sys.executable, str(ROOT / "pretrain_hybrid.py"), *argv], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "ckpt").exists()


def test_unwritable_save_dir_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, str(ROOT / "pretrain_hybrid.py"), *TINY, "--train-iters", "4",
                             "--save", str(blocker / "sub")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--save" in result.stderr and "Traceback" not in result.stderr


def test_tensorboard_scalars_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(["--train-iters", "10", "--tensorboard-dir", str(tmp_path / "tb")])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"lm loss", "learning-rate", "grad-norm", "lm loss validation"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("lm loss")] == [5, 10]


def test_wandb_logs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # our default is offline: no network is touched
    run(["--train-iters", "10", "--wandb-project", "unit-test", "--wandb-save-dir", str(tmp_path)])
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = run_file.read_bytes()  # protobuf records keep metric names as plain bytes
    assert b"lm loss" in records and b"learning-rate" in records and b"lm loss validation" in records


def test_exit_duration_stops_with_a_checkpoint(tmp_path):
    results = run(["--train-iters", "1000", "--exit-duration-in-mins", "0.0001", "--save", str(tmp_path)])
    assert results["iteration"] < 1000
    assert int((tmp_path / "latest_checkpointed_iteration.txt").read_text()) == results["iteration"]
