"""Every parallel layout trains the same model as one process (CPU, gloo, torchrun on a free port).

Oracle: a single-process run of ``pretrain_hybrid.py`` with the same seed and global batch. Each layout runs three
optimizer steps through ``torchrun`` and must log the same losses and end with the same parameters (gathered from its
per-rank checkpoint). Tolerance: float32 reductions run in a different order when a matrix product or a sum is split
across ranks (about 1e-7 relative per operation), so losses agree to 2e-6 relative and parameters, after three AdamW
steps at lr 1e-2, to 1e-5 absolute.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.training.checkpoint_reshard import gather_checkpoint
from megatron.training.checkpointing import checkpoint_name, load_state

ROOT = Path(__file__).resolve().parents[3]
# A tiny model with Mamba2, attention (GQA) and SwiGLU MLP layers, untied embeddings; vocab 61 pads to 64 at any TP.
FLAGS = [
    "--hybrid-layer-pattern", "M*-M*-M-", "--hidden-size", "32", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "48", "--swiglu",
    "--mamba-head-dim", "8", "--mamba-num-groups", "2", "--mamba-state-dim", "8", "--seq-length", "16",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--lr", "1e-2",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "61", "--make-vocab-size-divisible-by", "16",
    "--normalization", "RMSNorm", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "1", "--eval-iters", "0",
    "--num-workers", "0", "--distributed-backend", "gloo", "--seed", "7",
]
LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2-even": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp2-split": (2, ["--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "M*-|M*-M-"]),
    "pp2-interleaved": (2, ["--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "M*|-M|*-|M-"]),
    "dp2": (2, []),
    "dp2-ddp-overlap": (2, ["--overlap-grad-reduce"]),
    "dp2-distributed-optimizer": (2, ["--use-distributed-optimizer"]),
    "tp2-pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"]),
}
LOSS = re.compile(r"lm loss: ([0-9.E+-]+) \| grad norm: ([0-9.]+)")


def train(save: Path, nproc: int, extra: list[str], flags: list[str] = FLAGS) -> list[tuple[float, float]]:
    """Run pretrain_hybrid.py on ``nproc`` local processes; returns the logged (loss, grad norm) per iteration."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(ROOT / "pretrain_hybrid.py"), *flags, *extra, "--save", str(save)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [(float(loss), float(norm)) for loss, norm in LOSS.findall(result.stdout)]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[float, float]]]:
    save = tmp_path_factory.mktemp("reference")
    return save, train(save, 1, [])


@pytest.fixture(scope="module")
def reference(reference_dir) -> tuple[list[tuple[float, float]], dict[str, torch.Tensor]]:
    save, steps = reference_dir
    return steps, gather_checkpoint(save, load_optimizer=False).tensors


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    nproc, extra = LAYOUTS[layout]
    steps = train(tmp_path / "ckpt", nproc, extra)
    assert_matches(reference, steps, tmp_path / "ckpt")


def test_resume_at_another_data_parallel_size(reference, tmp_path):
    """Interleaved PP2 x DP2 with the distributed optimizer stops after two steps; interleaved PP2 x DP1 resumes from
    that checkpoint (two model chunks per file, optimizer state saved gathered): its third step is the uninterrupted
    run's third step."""
    save = tmp_path / "ckpt"
    interleaved = ["--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "M*|-M|*-|M-"]
    first = train(save, 4, [*interleaved, "--use-distributed-optimizer", "--exit-interval", "2"])
    resumed = train(save, 2, [*interleaved, "--load", str(save)])
    assert_matches(reference, first + resumed, save)


VALID_LOSS = re.compile(r"validation loss at the end \| lm loss value: ([0-9.E+-]+)")


def test_resharded_checkpoint_evaluates_the_same(reference_dir, tmp_path):
    """The single-process checkpoint resharded to TP2 x PP2 (uneven '|' stages) gives the same validation loss."""
    source, _ = reference_dir
    converted = tmp_path / "tp2pp2"
    subprocess.run([sys.executable, str(ROOT / "tools/checkpoint/hybrid_conversion.py"), "--load-dir", str(source),
                    "--save-dir", str(converted), "--target-tp-size", "2", "--target-pp-size", "2",
                    "--target-layer-pattern", "M*-M*|-M-"], check=True, capture_output=True, cwd=ROOT)
    evaluate = ["--skip-train", "--eval-iters", "2"]
    expected = evaluate_loss(source, 1, evaluate)
    actual = evaluate_loss(converted, 4, [*evaluate, "--tensor-model-parallel-size", "2",
                                          "--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "M*-M*|-M-"])
    assert actual == pytest.approx(expected, rel=2e-6)


def evaluate_loss(checkpoint: Path, nproc: int, extra: list[str]) -> float:
    """The end-of-run validation loss of pretrain_hybrid.py loading ``checkpoint``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(ROOT / "pretrain_hybrid.py"), *FLAGS, *extra, "--load", str(checkpoint)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return float(VALID_LOSS.search(result.stdout)[1])


def assert_matches(reference: tuple[list[tuple[float, float]], dict[str, torch.Tensor]],
                   steps: list[tuple[float, float]], checkpoint: Path) -> None:
    """Same logged losses and grad norms as the reference run, and the same final parameters."""
    expected_steps, expected_params = reference
    assert len(steps) == len(expected_steps)
    for (loss, norm), (expected_loss, expected_norm) in zip(steps, expected_steps, strict=True):
        assert loss == pytest.approx(expected_loss, rel=2e-6)
        assert norm == pytest.approx(expected_norm, abs=2e-3)  # logged with 3 decimals
    params = gather_checkpoint(checkpoint, load_optimizer=False).tensors
    assert params.keys() == expected_params.keys()
    # Layouts round differently in float32 (split matmuls, reductions in another order), and Adam divides each
    # gradient by its own running scale, so an element whose gradient is nearly zero can move by much more than
    # its rounding: after 3 steps at lr 1e-2 the largest gaps seen are ~1e-5. A layout bug (a missing reduction, a
    # wrong shard) moves weights by ~lr per step, 200x this tolerance.
    for name, value in params.items():
        torch.testing.assert_close(value, expected_params[name], rtol=0, atol=5e-5, msg=name)


def test_tied_embeddings_stay_in_sync_across_pipeline_stages(tmp_path):
    """With tied embeddings the last stage keeps a copy of the word embeddings; PP2 x DP2 sums both copies'
    gradients every step, so losses and the saved (first-stage) embedding match one process."""
    tied = [flag for flag in FLAGS if flag != "--untie-embeddings-and-output-weights"]
    expected = train(tmp_path / "one", 1, [], flags=tied)
    steps = train(tmp_path / "pp2dp2", 4, ["--pipeline-model-parallel-size", "2"], flags=tied)
    reference = (expected, gather_checkpoint(tmp_path / "one", load_optimizer=False).tensors)
    assert_matches(reference, steps, tmp_path / "pp2dp2")
    last_stage = load_state(checkpoint_name(tmp_path / "pp2dp2", 3, 0, 1, pipeline_parallel=True))["model"]
    torch.testing.assert_close(last_stage["embedding.word_embeddings.weight"],
                               reference[1]["embedding.word_embeddings.weight"], rtol=0, atol=1e-5)
