"""tools/checkpoint/inspect.py: layout, pattern stages, sizes, vocabulary and the tensor table of a converted
checkpoint, as text and as JSON (the JSON run is a real subprocess: the script's name shadows the standard library's
``inspect`` and must still start)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.training.checkpoint_reshard import convert_checkpoint

from .test_hybrid_conversion import TRUE_VOCAB, VARIANTS, load_script, make_checkpoint

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "tools" / "checkpoint" / "inspect.py"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A TP2 x PP2 checkpoint with optimizer state, converted from a TP1 x PP1 one."""
    root = tmp_path_factory.mktemp("inspect")
    make_checkpoint(root / "tp1", *VARIANTS["mamba2_swiglu_untied"])
    convert_checkpoint(root / "tp1", root / "tp2pp2", 2, 2, keep_optimizer=True)
    return root / "tp2pp2"


@pytest.fixture(scope="module")
def tool():
    return load_script(SCRIPT, "inspect_checkpoint_tool")


def test_json_report(converted):
    result = subprocess.run([sys.executable, str(SCRIPT), str(converted), "--json"], capture_output=True, text=True,
                            timeout=120, cwd=str(REPO))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["iteration"] == 3
    assert report["layout"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                                "virtual_pipeline_model_parallel_size": None, "files": 4}
    assert report["pattern"] == "M*-M*-M-" and report["stages"] == ["M*-M", "*-M-"]
    assert report["vocab"] == {"padded_vocab_size": 64, "true_vocab_size": TRUE_VOCAB}
    assert report["optimizer_state"] is True
    assert report["model"]["hidden_size"] == 32 and report["model"]["num_attention_heads"] == 4
    tensors = {entry["key"]: entry for entry in report["tensors"]}
    assert len(tensors) == 46
    assert tensors["embedding.word_embeddings.weight"]["shape"] == [64, 32]
    assert tensors["embedding.word_embeddings.weight"]["shard_shapes"] == [[32, 32], [32, 32]]
    in_proj = tensors["decoder.layers.6.mixer.in_proj.weight"]
    assert in_proj["shape"] == [168, 32] and in_proj["shard_shapes"] == [[84, 32], [84, 32]]
    assert in_proj["stage"] == 1 and in_proj["dtype"] == "float32"
    assert tensors["decoder.final_norm.weight"]["shard_shapes"] == [[32], [32]]


def test_text_report(converted, tool, capsys):
    assert tool.main([str(converted)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "layout: tp 2 x pp 2 (not interleaved), 4 rank files" in lines
    assert "stages: stage 0: M*-M | stage 1: *-M-" in lines
    assert "vocab: padded 64, true 61" in lines and "optimizer state: present" in lines
    row = next(line for line in lines if line.startswith("decoder.layers.4.self_attention.linear_proj.weight"))
    assert row.split() == ["decoder.layers.4.self_attention.linear_proj.weight", "(32,", "32)", "float32", "1",
                           "(32,", "16)"]


def test_without_optimizer_and_errors(converted, tool, tmp_path, capsys):
    convert_checkpoint(converted, tmp_path / "bare", 1, 1)
    assert tool.main([str(tmp_path / "bare")]) == 0
    out = capsys.readouterr().out
    assert "optimizer state: absent" in out and "layout: tp 1 x pp 1" in out
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a checkpoint directory" in err
