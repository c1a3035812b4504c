"""tools/checkpoint/llama_to_transformer.py, megatron.training.llama_import and megatron.training.hf_folder: a Hugging
Face Llama folder (safetensors, sharded with an index, or pytorch_model.bin; tied or untied; Llama 3.1 RoPE scaling)
converted to an all-attention hybrid checkpoint gives the same float32 logits as ``LlamaForCausalLM`` at TP1 and TP2;
the validation report accounts for every tensor and catches planted problems; the RoPE scaling equals transformers'.

Tiny random Llama models and a word-level tokenizer are built here and saved with ``save_pretrained`` (offline).
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: nothing may come from a hub

import argparse
import functools
import importlib.util
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.hybrid.hf_conversion import llama_from_hf
from megatron.training.arguments import ArgumentError, parse_args, rope_scaling_from_args
from megatron.training.checkpointing import checkpoint_name, load_state, read_tracker
from megatron.training.hf_folder import HFFolder, HFFolderError
from megatron.training.llama_import import (
    choose_vocab_layout,
    conversion_plan,
    convert_tensor,
    llama_spec,
)
from megatron.training.training import build_model

from ..models.helpers import randomize_

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "tools" / "checkpoint" / "llama_to_transformer.py"
TOL = 1e-5
SEQ = 40
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
# name: (tied, rope scaling, vocabulary, how the weights are saved)
VARIANTS = {
    "untied_safetensors": (False, None, 100, "safetensors"),
    "tied_bin": (True, None, 100, "bin"),
    "llama31_sharded": (False, LLAMA3, 100, "sharded"),
}


# ------------------------------------------------------------------------------------------------------- helpers

def load_script(path: Path, name: str) -> ModuleType:
    """A tools/ script imported as a module (its ``main`` runs in-process)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def tool() -> ModuleType:
    """The conversion script, imported once."""
    return load_script(SCRIPT, "llama_to_transformer")


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer ``<unk> <s> </s> w3 ... w{vocab-1}`` saved as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def make_llama(folder: Path, tied: bool, rope_scaling: dict | None, vocab: int, how: str) -> LlamaForCausalLM:
    """A randomised tiny Llama saved to ``folder`` (with a tokenizer); returned in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM  # here: the spawned TP2 workers need no transformers

    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
                         max_position_embeddings=256, tie_word_embeddings=tied, attention_bias=False, mlp_bias=False,
                         rope_scaling=dict(rope_scaling) if rope_scaling else None, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(len(str(folder)))
    model = randomize_(LlamaForCausalLM(config)).eval()
    if how == "bin":  # transformers 5 only writes safetensors: this is the layout older versions wrote
        folder.mkdir(parents=True)
        config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, **({"max_shard_size": "60KB"} if how == "sharded" else {}))
    save_tokenizer(folder, vocab)
    return model


def convert(hf_dir: Path, save_dir: Path, *extra: str) -> int:
    """The tool's exit code for ``--hf-dir hf_dir --save-dir save_dir extra...`` run in-process."""
    try:
        return tool().main(["--hf-dir", str(hf_dir), "--save-dir", str(save_dir), "--no-progress", *extra])
    except SystemExit as stop:
        return stop.code


def hf_logits(model: LlamaForCausalLM, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, position_ids=positions).logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[Path, Path, LlamaForCausalLM]]:
    """Per variant: the Hugging Face folder, the TP1 checkpoint converted from it, and the HF model."""
    root = tmp_path_factory.mktemp("llama")
    out = {}
    for name, (tied, scaling, vocab, how) in VARIANTS.items():
        hf_dir, save_dir = root / f"hf_{name}", root / f"ckpt_{name}"
        model = make_llama(hf_dir, tied, scaling, vocab, how)
        assert convert(hf_dir, save_dir) == 0
        out[name] = (hf_dir, save_dir, model)
    return out


# ------------------------------------------------------------------------------------------------------- RoPE

@pytest.mark.parametrize(("head_dim", "theta", "scaling"), [
    (16, 500.0, LLAMA3),
    (128, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}),  # Llama 3.1 8B
    (64, 500000.0, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}),  # Llama 3.2 1B
])
def test_llama3_rope_scaling_equals_transformers(head_dim, theta, scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_theta=theta,
                         rope_scaling=dict(scaling), max_position_embeddings=131072)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, None)
    ours = RotaryEmbedding(head_dim, rotary_base=theta, rope_scaling=scaling).inv_freq
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, RotaryEmbedding(head_dim, rotary_base=theta).inv_freq)


def test_rope_scaling_flags_and_validation():
    base = ["--hybrid-layer-pattern", "*-", "--hidden-size", "64", "--num-attention-heads", "4",
            "--position-embedding-type", "rope", "--seq-length", "32", "--vocab-size", "10"]
    args = parse_args(base, training=False)
    assert rope_scaling_from_args(args) is None
    args = parse_args([*base, "--use-rope-scaling", "--rope-scaling-factor", "32"], training=False)
    assert rope_scaling_from_args(args) == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    with pytest.raises(ArgumentError, match="high-freq-factor"):
        parse_args([*base, "--use-rope-scaling", "--rope-scaling-high-freq-factor", "1"], training=False)
    with pytest.raises(ArgumentError, match="rope-scaling-factor"):
        parse_args([*base, "--use-rope-scaling", "--rope-scaling-factor", "0"], training=False)
    with pytest.raises(ArgumentError, match="position-embedding-type rope"):
        parse_args([*base[:6], "--seq-length", "32", "--vocab-size", "10", "--use-rope-scaling"], training=False)
    with pytest.raises(ValueError, match="only 'llama3'"):
        RotaryEmbedding(16, rope_scaling={**LLAMA3, "rope_type": "yarn"})


# ----------------------------------------------------------------------------------------------- conversion

def load_converted(save_dir: Path, tp_rank: int = 0) -> tuple[torch.nn.Module, argparse.Namespace]:
    """This rank's model built with ``build_model`` from the checkpoint's args, its weights loaded."""
    state = load_state(checkpoint_name(save_dir, read_tracker(save_dir), tp_rank, 0))
    model = build_model(state["args"])
    model.load_state_dict(state["model"])
    return model.eval(), state["args"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp1_conversion_matches_hf_llama(converted, variant):
    hf_dir, save_dir, hf = converted[variant]
    tied, scaling, vocab, _ = VARIANTS[variant]
    assert read_tracker(save_dir) == "release"
    model, args = load_converted(save_dir)
    assert args.hybrid_layer_pattern == "*-*-" and args.padded_vocab_size == vocab
    assert args.untie_embeddings_and_output_weights == (not tied) and args.use_rope_scaling == bool(scaling)
    assert Path(args.tokenizer_model) == (save_dir / "tokenizer").resolve()
    assert (save_dir / "tokenizer" / "tokenizer.json").is_file()
    assert torch.load(checkpoint_name(save_dir, "release"), weights_only=False)["iteration"] == 0

    tokens = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_logits(hf, tokens), atol=TOL, rtol=TOL)
        if scaling:  # positions far beyond original_max_position_embeddings (32)
            positions = torch.arange(200, 200 + SEQ).expand(2, SEQ)
            torch.testing.assert_close(model(tokens, position_ids=positions), hf_logits(hf, tokens, positions),
                                       atol=TOL, rtol=TOL)

    report = json.loads((save_dir / "conversion_report.json").read_text())
    assert report["ok"] and not report["errors"]
    with HFFolder(hf_dir) as folder:
        assert set(report["source_tensors"]) == set(folder.names())
    unused = {k: v for k, v in report["source_tensors"].items() if v["status"] != "consumed"}
    assert set(unused) == ({"lm_head.weight"} if variant == "tied_bin" else set())  # torch.save kept the tied copy
    assert set(report["target_tensors"]) == set(model.state_dict())
    assert report["counts"]["initialised"] == 0
    assert report["target_tensors"]["decoder.layers.0.self_attention.linear_qkv.weight"]["from"] == [
        f"model.layers.0.self_attn.{n}_proj.weight" for n in "qkv"]
    assert report["special_tokens"]["bos"] == {"config": 1, "generation_config": 1, "tokenizer": 1, "agree": True}


def test_streaming_mapping_equals_llama_from_hf(converted):
    hf_dir, _, hf = converted["llama31_sharded"]
    expected = llama_from_hf(hf.state_dict(), 2, 2)
    with HFFolder(hf_dir) as folder:
        spec = llama_spec(folder.config)
        assert folder.weights_format == "safetensors (sharded, with index)"
        plan = conversion_plan(spec)
        assert sorted(t.key for t in plan) == sorted(expected)
        for target in plan:
            assert torch.equal(convert_tensor(target, folder, spec), expected[target.key]), target.key


def _tp2_worker(rank: int, port: int, save_dir: str, data: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        parallel_state.initialize_model_parallel(2, 1)
        model, args = load_converted(Path(save_dir), rank)
        assert args.tensor_model_parallel_size == 2
        saved = torch.load(data, weights_only=True)
        with torch.no_grad():
            for tokens, positions, expected in saved:
                logits = model(tokens, position_ids=positions)  # gathered over the vocabulary shards
                vocab = expected.shape[-1]
                torch.testing.assert_close(logits[..., :vocab], expected, atol=TOL, rtol=TOL)
                assert torch.all(logits[..., vocab:] == 0)  # the zero padding row
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_tp2_conversion_matches_hf_llama(tmp_path):
    vocab = 101  # odd: TP2 needs one zero row of padding, recorded with true_vocab_size
    hf = make_llama(tmp_path / "hf", False, LLAMA3, vocab, "safetensors")
    save_dir = tmp_path / "ckpt"
    assert convert(tmp_path / "hf", save_dir, "--target-tp-size", "2") == 0
    assert sorted(p.name for p in (save_dir / "release").iterdir()) == ["mp_rank_00", "mp_rank_01"]
    args = load_state(checkpoint_name(save_dir, "release", 1, 0))["args"]
    assert (args.padded_vocab_size, args.true_vocab_size, args.tensor_model_parallel_size) == (102, 101, 2)
    tokens = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(150, 150 + SEQ).expand(2, SEQ)
    cases = [(tokens, None, hf_logits(hf, tokens)), (tokens, positions, hf_logits(hf, tokens, positions))]
    torch.save(cases, tmp_path / "expected.pt")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_tp2_worker, args=(port, str(save_dir), str(tmp_path / "expected.pt")), nprocs=2)


# ---------------------------------------------------------------------------------------------- validation

def plant(hf_dir: Path, change) -> None:
    """Rewrite the folder's model.safetensors with ``change`` applied to its tensors."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(hf_dir / "model.safetensors")
    change(tensors)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("problem", ["extra_tensor", "wrong_k_proj_shape", "special_token"])
def test_report_catches_planted_problems(converted, tmp_path, problem):
    hf_dir = tmp_path / "hf"
    shutil.copytree(converted["untied_safetensors"][0], hf_dir)
    if problem == "extra_tensor":
        plant(hf_dir, lambda t: t.__setitem__("model.layers.1.self_attn.rope_bias", torch.ones(16)))
        bad = "model.layers.1.self_attn.rope_bias"
    elif problem == "wrong_k_proj_shape":
        plant(hf_dir, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.ones(48, 64)))
        bad = "model.layers.0.self_attn.k_proj.weight"
    else:
        config = json.loads((hf_dir / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps({**config, "eos_token_id": 7}))
        bad = "eos id 2 of the tokenizer"
    save_dir, report_path = tmp_path / "ckpt", tmp_path / "report.json"
    assert convert(hf_dir, save_dir, "--report", str(report_path)) == 2
    assert not save_dir.exists() and not any(p.name.startswith(".ckpt") for p in tmp_path.iterdir())
    report = json.loads(report_path.read_text())
    assert not report["ok"] and not report["target"]["checkpoint_written"]
    assert any(bad in error for error in report["errors"]), report["errors"]
    if problem == "extra_tensor":
        assert report["source_tensors"][bad]["status"] == "unused"
        assert "unknown tensor" in report["source_tensors"][bad]["reason"]
        assert len(report["errors"]) == 1
    elif problem == "wrong_k_proj_shape":
        assert report["source_tensors"][bad]["expected_shape"] == [32, 64]
        qkv = report["target_tensors"]["decoder.layers.0.self_attention.linear_qkv.weight"]
        assert qkv["status"] == "derived" and bad in qkv["from"]
    else:
        assert not report["special_tokens"]["eos"]["agree"]
        assert convert(hf_dir, save_dir, "--allow-special-token-mismatch") == 0
        assert json.loads((save_dir / "conversion_report.json").read_text())["warnings"]


def test_failed_validation_from_the_command_line(converted, tmp_path):
    source = converted["untied_safetensors"][0]
    hf_dir = tmp_path / "hf"
    shutil.copytree(source, hf_dir)
    plant(hf_dir, lambda t: t.__setitem__("model.extra.weight", torch.ones(2, 2)))
    save_dir = tmp_path / "ckpt"
    result = subprocess.run([sys.executable, str(SCRIPT), "--hf-dir", str(hf_dir), "--save-dir", str(save_dir)],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""},
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: validation failed; no checkpoint written"
    assert "problem: source tensor model.extra.weight [2, 2] is unaccounted for" in result.stdout
    # The default report lands in the save directory, which holds nothing else; a fixed rerun may use it.
    assert [p.name for p in save_dir.iterdir()] == ["conversion_report.json"]
    assert not json.loads((save_dir / "conversion_report.json").read_text())["ok"]
    shutil.copy(source / "model.safetensors", hf_dir / "model.safetensors")
    assert convert(hf_dir, save_dir) == 0
    assert read_tracker(save_dir) == "release" and json.loads((save_dir / "conversion_report.json").read_text())["ok"]


def test_user_errors_are_one_line(converted, tmp_path, capsys):
    source = converted["untied_safetensors"][0]

    def error_of(hf_dir: Path, *extra: str) -> str:
        capsys.readouterr()
        assert convert(hf_dir, tmp_path / "out", *extra) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert not (tmp_path / "out" / "release").exists()
        return lines[0]

    assert "does not exist" in error_of(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in error_of(empty)
    shutil.copy(source / "config.json", empty / "config.json")
    assert "holds no weights" in error_of(empty)
    biased = tmp_path / "biased"
    shutil.copytree(source, biased)
    config = json.loads((biased / "config.json").read_text())
    (biased / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    assert "attention_bias is true" in error_of(biased)
    (biased / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn",
                                                                                  "factor": 4.0}}))
    assert "'yarn' is not supported" in error_of(biased)
    sharded = tmp_path / "sharded"
    shutil.copytree(converted["llama31_sharded"][0], sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = index["weight_map"]["model.norm.weight"]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    shard = index["weight_map"]["model.norm.weight"]
    assert error_of(sharded) == ("error: tensor 'model.layers.0.mlp.extra.weight' is listed in "
                                 f"model.safetensors.index.json but missing from {shard}")
    assert "--target-tp-size 3 does not divide" in error_of(source, "--target-tp-size", "3")
    assert "--dtype" in error_of(source, "--dtype", "int8")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert "not empty" in error_of(source)


def test_hf_folder_lists_and_reads_one_tensor_at_a_time(converted, tmp_path):
    hf_dir, _, hf = converted["tied_bin"]
    with HFFolder(hf_dir) as folder:
        assert folder.weights_format == "pytorch_model.bin"
        state = hf.state_dict()
        assert folder.names() == list(state)
        info = folder.info("model.layers.1.mlp.down_proj.weight")
        assert info.shape == (64, 128) and info.dtype == torch.float32
        assert torch.equal(folder.get("model.layers.1.mlp.down_proj.weight"), state[info.name])
        assert folder.generation_config["eos_token_id"] == 2
        copied = folder.copy_tokenizer(tmp_path / "tok")
        assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(copied)
        with pytest.raises(HFFolderError, match="no tensor 'nope'"):
            folder.get("nope")


def test_vocab_layout_keeps_rows_and_megatron_padding():
    from megatron.training.tokenizer import padded_vocab_size

    for hf_vocab, true_vocab, tp, expected in [(128256, 128256, 1, (128256, 128)), (128256, 128256, 8, (128256, 32)),
                                               (32000, 32000, 8, (32000, 32)), (101, 101, 2, (102, 1)),
                                               (100, 90, 1, (100, 100))]:
        rows, divisor = choose_vocab_layout(hf_vocab, true_vocab, tp)
        assert (rows, divisor) == expected
        assert padded_vocab_size(true_vocab, divisor, tp) == rows
