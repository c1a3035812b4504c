"""tools/checkpoint/hybrid_conversion.py and megatron.training.checkpoint_reshard: bit-exact round trips between
layouts, splits that match the sharding rules and the stage models, legacy keys, vocabulary re-padding, and clear
errors that leave nothing behind.

Source checkpoints are written by ``save_checkpoint`` from a tiny model built from parsed arguments, after one real
optimizer step (non-zero moments). The command line is run as a subprocess where process behaviour matters (imports,
exit code, output); the error cases call the script's ``main`` in-process to keep the suite fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from megatron.core.models.hybrid import HybridModel
from megatron.core.optimizer import get_megatron_optimizer, get_param_groups
from megatron.core.tensor_parallel.sharding import shard_tensor, tp_split_rule
from megatron.training.arguments import core_transformer_config_from_args, parse_args
from megatron.training.checkpoint_reshard import (
    ReshardError,
    convert_checkpoint,
    gather_checkpoint,
    split_checkpoint,
)
from megatron.training.checkpointing import checkpoint_name, load_state, read_tracker, save_checkpoint
from megatron.training.tokenizer import padded_vocab_size

from ..models.helpers import randomize_

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "tools" / "checkpoint" / "hybrid_conversion.py"
PATTERN = "M*-M*-M-"
TRUE_VOCAB = 61
ITERATION = 3
FLAGS = ["--hidden-size", "32", "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
         "--mamba-num-groups", "2", "--mamba-head-dim", "8", "--mamba-state-dim", "8", "--ffn-hidden-size", "48",
         "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "3", "--lr", "1e-3", "--mock-data",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", str(TRUE_VOCAB), "--normalization", "RMSNorm",
         "--disable-bias-linear", "--make-vocab-size-divisible-by", "8"]
VARIANTS = {
    "mamba2_swiglu_untied": ["--swiglu", "--untie-embeddings-and-output-weights"],
    "tied": ["--swiglu"],
    "mamba1": ["--mamba-version", "1", "--untie-embeddings-and-output-weights"],
}


# ------------------------------------------------------------------------------------------------------- helpers

def make_args(*extra: str, pattern: str = PATTERN) -> argparse.Namespace:
    """Validated training args for the tiny model, with the vocabulary sizes the training loop would record."""
    args = parse_args([*FLAGS, "--hybrid-layer-pattern", pattern, *extra])
    args.true_vocab_size = TRUE_VOCAB
    args.padded_vocab_size = padded_vocab_size(TRUE_VOCAB, args.make_vocab_size_divisible_by, 1)
    args.consumed_train_samples = 24
    return args


def model_from_args(args: argparse.Namespace, pattern: str | None = None, stage: int = 0,
                    stages: int = 1) -> HybridModel:
    """Stage ``stage`` of ``stages`` of the model ``args`` describe (tensor-parallel size 1)."""
    config = core_transformer_config_from_args(args)
    return HybridModel(
        config, args.padded_vocab_size, args.max_position_embeddings,
        hybrid_layer_pattern=pattern or args.hybrid_layer_pattern,
        position_embedding_type=args.position_embedding_type,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        pre_process=stage == 0, post_process=stage == stages - 1, pipeline_stage=stage, num_pipeline_stages=stages)


def make_checkpoint(directory: Path, *extra: str) -> tuple[HybridModel, argparse.Namespace]:
    """A TP1 x PP1 checkpoint of a randomised tiny model after one AdamW step; returns the model and args."""
    torch.manual_seed(0)
    args = make_args(*extra)
    model = randomize_(model_from_args(args))
    optimizer = get_megatron_optimizer(model, 1e-3, 0.01)
    tokens = torch.randint(0, TRUE_VOCAB, (2, 9))
    model(tokens, labels=torch.roll(tokens, -1, 1)).mean().backward()
    optimizer.step()
    save_checkpoint(directory, ITERATION, model, optimizer, None, args)
    return model, args


def rank_file(directory: Path, tp_rank: int = 0, pp_rank: int = 0) -> dict[str, Any]:
    """One rank's file of the tracked checkpoint (model0/model1 files included)."""
    iteration = read_tracker(directory)
    pipelined = checkpoint_name(directory, iteration, 0, 0, True).exists()
    path = checkpoint_name(directory, iteration, tp_rank, pp_rank, pipelined)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def all_files(directory: Path) -> dict[str, dict[str, Any]]:
    """Every rank file below ``directory``, by relative path."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return {str(p.relative_to(directory)): torch.load(p, map_location="cpu", weights_only=True)
                for p in sorted(directory.rglob("model_optim_rng.pt"))}


def assert_same(x: Any, y: Any, where: str = "") -> None:
    """Bit-exact equality of nested dicts / lists / tensors (dtype and key order included)."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, where
        assert torch.equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and list(x) == list(y), f"{where}: keys {list(x)} vs {list(y)}"
        for key in x:
            assert_same(x[key], y[key], f"{where}/{key}")
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), where
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x!r} vs {y!r}"


def run_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120,
                          cwd=str(REPO))


def load_script(path: Path, name: str) -> ModuleType:
    """A tools/ script imported as a module (its ``main`` runs in-process)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[Path, HybridModel, argparse.Namespace]]:
    """One TP1 x PP1 source checkpoint per model variant."""
    made = {}
    for name, extra in VARIANTS.items():
        directory = tmp_path_factory.mktemp(name)
        model, args = make_checkpoint(directory, *extra)
        made[name] = (directory, model, args)
    return made


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    return load_script(SCRIPT, "hybrid_conversion_tool")


# ---------------------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp1_to_tp2pp2_and_back_is_bit_exact(sources, tmp_path, variant):
    source, _, _ = sources[variant]
    convert_checkpoint(source, tmp_path / "tp2pp2", 2, 2, keep_optimizer=True)
    assert sorted(all_files(tmp_path / "tp2pp2")) == [f"iter_{ITERATION:07d}/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt"
                                                      for t in range(2) for p in range(2)]
    convert_checkpoint(tmp_path / "tp2pp2", tmp_path / "back", 1, 1, keep_optimizer=True)
    original, back = rank_file(source), rank_file(tmp_path / "back")
    assert_same(original["model"], back["model"], "model")
    assert_same(original["optimizer"], back["optimizer"], "optimizer")
    assert back["iteration"] == ITERATION and read_tracker(tmp_path / "back") == ITERATION
    assert back["args"].consumed_train_samples == 24
    exp_avg = original["optimizer"]["state"][0]["exp_avg"]
    assert exp_avg.abs().sum() > 0  # the moments compared are real


def test_tp2pp2_to_tp1_and_back_is_bit_exact_per_file(sources, tmp_path):
    source, _, _ = sources["mamba2_swiglu_untied"]
    convert_checkpoint(source, tmp_path / "a", 2, 2, keep_optimizer=True)
    convert_checkpoint(tmp_path / "a", tmp_path / "b", 1, 1, keep_optimizer=True)
    convert_checkpoint(tmp_path / "b", tmp_path / "c", 2, 2, keep_optimizer=True)
    first, again = all_files(tmp_path / "a"), all_files(tmp_path / "c")
    assert list(first) == list(again) and len(first) == 4
    for path in first:
        assert_same(first[path], again[path], path)


def test_interleaved_pipeline_round_trip(sources, tmp_path):
    source, _, _ = sources["tied"]
    convert_checkpoint(source, tmp_path / "vpp", 1, 2, 2, keep_optimizer=True)
    file = rank_file(tmp_path / "vpp", 0, 1)
    assert "model" not in file and set(file) >= {"model0", "model1"}
    assert file["args"].virtual_pipeline_model_parallel_size == 2
    assert file["args"].hybrid_layer_pattern == "M*|-M|*-|M-"
    # Rank 1 holds virtual stages 1 ("-M") and 3 ("M-", the last: final norm and the tied embedding copy).
    assert "decoder.layers.1.mixer.in_proj.weight" in file["model0"]
    assert "decoder.final_norm.weight" in file["model1"] and "embedding.word_embeddings.weight" in file["model1"]
    names = [n for group in file["optimizer"]["param_groups"] for n in group["param_names"]]
    assert names and all(n.startswith(("model0.", "model1.")) for n in names)
    convert_checkpoint(tmp_path / "vpp", tmp_path / "back", 1, 1, keep_optimizer=True)
    assert_same(rank_file(source)["model"], rank_file(tmp_path / "back")["model"])
    assert_same(rank_file(source)["optimizer"], rank_file(tmp_path / "back")["optimizer"])


# ---------------------------------------------------------------------------------------------- split correctness

def test_tp2_shards_follow_the_sharding_rules(sources):
    source, _, args = sources["mamba2_swiglu_untied"]
    full = gather_checkpoint(source)
    files = split_checkpoint(full, 2, 1)
    config = core_transformer_config_from_args(args)
    for rank in range(2):
        model = files[(rank, 0)]["model"]
        assert list(model) == list(full.tensors)
        for key, tensor in full.tensors.items():
            assert torch.equal(model[key], shard_tensor(tensor, tp_split_rule(key, config), rank, 2)), key
    # By hand: in_proj rows are [z, x, B, C, dt]; rank 1 holds the second half of each component.
    d_inner, groups, heads = 64, 2 * 8, 8
    full_in_proj = full.tensors["decoder.layers.0.mixer.in_proj.weight"]
    shard = files[(1, 0)]["model"]["decoder.layers.0.mixer.in_proj.weight"]
    assert shard.shape == ((2 * d_inner + 2 * groups + heads) // 2, 32)
    assert torch.equal(shard[: d_inner // 2], full_in_proj[d_inner // 2 : d_inner])  # z
    assert torch.equal(shard[d_inner // 2 : d_inner], full_in_proj[d_inner + d_inner // 2 : 2 * d_inner])  # x
    assert torch.equal(shard[-heads // 2 :], full_in_proj[-heads // 2 :])  # dt


def test_uneven_target_pattern_places_layers_on_stages(sources, tmp_path):
    source, _, _ = sources["tied"]
    convert_checkpoint(source, tmp_path / "out", 1, 2, pattern="M*-|M*-M-", keep_optimizer=True)
    full = gather_checkpoint(source)
    stage0, stage1 = rank_file(tmp_path / "out", 0, 0), rank_file(tmp_path / "out", 0, 1)
    assert stage0["args"].hybrid_layer_pattern == "M*-|M*-M-"
    layers0 = {int(k.split(".")[2]) for k in stage0["model"] if k.startswith("decoder.layers.")}
    layers1 = {int(k.split(".")[2]) for k in stage1["model"] if k.startswith("decoder.layers.")}
    assert layers0 == {0, 1, 2} and layers1 == {0, 1, 2, 3, 4}
    assert torch.equal(stage1["model"]["decoder.layers.0.mixer.in_proj.weight"],
                       full.tensors["decoder.layers.3.mixer.in_proj.weight"])
    assert torch.equal(stage1["model"]["decoder.layers.4.mlp.linear_fc2.weight"],
                       full.tensors["decoder.layers.7.mlp.linear_fc2.weight"])
    assert "decoder.final_norm.weight" in stage1["model"] and "decoder.final_norm.weight" not in stage0["model"]
    assert "output_layer.weight" not in stage1["model"]  # tied: the last stage holds a copy of the embedding
    assert torch.equal(stage1["model"]["embedding.word_embeddings.weight"],
                       stage0["model"]["embedding.word_embeddings.weight"])
    # Independent oracle: each stage model built by HybridModel accepts its file strictly, optimizer included.
    for stage, file in enumerate((stage0, stage1)):
        model = model_from_args(file["args"], stage=stage, stages=2)
        model.load_state_dict(file["model"])
        expected_names = [group["param_names"] for group in get_param_groups(model)]
        assert [group["param_names"] for group in file["optimizer"]["param_groups"]] == expected_names
        get_megatron_optimizer(model, 1e-3, 0.01).load_state_dict(file["optimizer"])


def test_resharded_checkpoint_gives_identical_logits(sources, tmp_path):
    source, original, args = sources["mamba2_swiglu_untied"]
    convert_checkpoint(source, tmp_path / "tp2pp2", 2, 2)
    convert_checkpoint(tmp_path / "tp2pp2", tmp_path / "tp1", 1, 1)
    torch.manual_seed(99)  # a different initialisation, overwritten by the checkpoint
    fresh = model_from_args(args)
    fresh.load_state_dict(rank_file(tmp_path / "tp1")["model"])
    tokens = torch.randint(0, TRUE_VOCAB, (2, 11))
    original.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(original(tokens), fresh(tokens))


def test_legacy_key_spellings_are_accepted_and_renamed(sources, tmp_path):
    source, _, _ = sources["mamba2_swiglu_untied"]
    legacy = tmp_path / "legacy"
    shutil.copytree(source, legacy)
    path = checkpoint_name(legacy, ITERATION)
    state = load_state(path)
    renames = {"decoder.layers.0.mixer.in_proj.layer_norm_weight": "decoder.layers.0.norm.weight",
               "decoder.layers.3.mixer.conv1d.weight": "decoder.layers.3.mixer.conv1d_weight",
               "decoder.layers.3.mixer.conv1d.bias": "decoder.layers.3.mixer.conv1d_bias"}
    model = {}
    for key, value in state["model"].items():
        if key == "decoder.layers.3.mixer.conv1d.weight":
            value = value.squeeze(1)  # newer Megatron stores the depthwise conv weight 2-D
        model[renames.get(key, key)] = value
    state["model"], state["optimizer"] = model, None
    torch.save(state, path)

    convert_checkpoint(legacy, tmp_path / "tp2", 2, 1)
    file = rank_file(tmp_path / "tp2", 1)
    assert "decoder.layers.0.norm.weight" not in file["model"]
    assert file["model"]["decoder.layers.3.mixer.conv1d.weight"].shape == (48, 1, 4)
    convert_checkpoint(tmp_path / "tp2", tmp_path / "back", 1, 1)
    assert_same(rank_file(source)["model"], rank_file(tmp_path / "back")["model"])


def test_megatron_tied_output_layer_copy_is_accepted(sources, tmp_path):
    """Megatron's last stage of a tied model stores its copy of the word embeddings as ``output_layer.weight``."""
    source, _, _ = sources["tied"]
    convert_checkpoint(source, tmp_path / "pp2", 1, 2)
    path = checkpoint_name(tmp_path / "pp2", ITERATION, 0, 1, True)
    state = load_state(path)
    copy = state["model"].pop("embedding.word_embeddings.weight")
    state["model"]["output_layer.weight"] = copy
    torch.save(state, path)
    convert_checkpoint(tmp_path / "pp2", tmp_path / "back", 1, 1)
    assert_same(rank_file(source)["model"], rank_file(tmp_path / "back")["model"])


# ---------------------------------------------------------------------------------------------- vocabulary padding

def test_vocab_repadding(sources, tmp_path):
    source, _, _ = sources["mamba2_swiglu_untied"]
    original = rank_file(source)
    keys = ("embedding.word_embeddings.weight", "output_layer.weight")
    assert original["model"][keys[0]].shape[0] == 64

    wide = tmp_path / "wide"  # four query groups and Mamba groups, so that tensor-parallel size 4 fits
    make_checkpoint(wide, *VARIANTS["mamba2_swiglu_untied"], "--num-query-groups", "4", "--mamba-num-groups", "4")
    convert_checkpoint(wide, tmp_path / "tp4", 4, 1)
    expected = padded_vocab_size(TRUE_VOCAB, 8, 4)
    file = rank_file(tmp_path / "tp4", 3)
    assert file["args"].padded_vocab_size == expected
    for key in keys:
        assert file["model"][key].shape == (expected // 4, 32)

    def first_rows(directory: Path, key: str, rows: int, name: str | None = None) -> torch.Tensor:
        state = rank_file(directory)
        if name is None:
            return state["model"][key][:rows]
        index = next(i for g in state["optimizer"]["param_groups"] for i, n in zip(g["params"], g["param_names"],
                                                                                  strict=True) if n == key)
        return state["optimizer"]["state"][index][name][:rows]

    convert_checkpoint(source, tmp_path / "cut", 1, 1, true_vocab_size=40, keep_optimizer=True)  # truncation
    convert_checkpoint(source, tmp_path / "grown", 2, 1, true_vocab_size=70, keep_optimizer=True)  # extension
    convert_checkpoint(tmp_path / "grown", tmp_path / "grown1", 1, 1, keep_optimizer=True)
    cut, grown = rank_file(tmp_path / "cut"), rank_file(tmp_path / "grown1")
    assert cut["args"].padded_vocab_size == 40 and cut["args"].true_vocab_size == 40
    assert rank_file(tmp_path / "grown", 1)["args"].padded_vocab_size == padded_vocab_size(70, 8, 2) == 80
    assert rank_file(tmp_path / "grown", 1)["model"][keys[0]].shape == (40, 32)
    assert grown["args"].padded_vocab_size == padded_vocab_size(70, 8, 1) == 72
    for key in keys:
        assert cut["model"][key].shape == (40, 32) and grown["model"][key].shape == (72, 32)
        for name in (None, "exp_avg", "exp_avg_sq"):
            assert torch.equal(first_rows(tmp_path / "cut", key, 40, name), first_rows(source, key, 40, name))
            assert torch.equal(first_rows(tmp_path / "grown1", key, 64, name), first_rows(source, key, 64, name))
        assert not grown["model"][key][64:].any()


# --------------------------------------------------------------------------------------------- command line, errors

def test_command_line_conversion_with_reset(sources, tmp_path):
    source, _, _ = sources["mamba2_swiglu_untied"]
    result = run_script("--load-dir", str(source), "--save-dir", str(tmp_path / "out"), "--target-tp-size", "2",
                        "--target-pp-size", "2", "--reset-iterations", "--keep-optimizer")
    assert result.returncode == 0, result.stderr
    assert "optimizer state: kept (gathered and resharded)" in result.stdout
    assert "tp 1 x pp 1" in result.stdout.splitlines()[-1] and "tp 2 x pp 2" in result.stdout.splitlines()[-1]
    assert read_tracker(tmp_path / "out") == "release"
    file = rank_file(tmp_path / "out", 1, 1)
    assert (tmp_path / "out" / "release" / "mp_rank_01_001" / "model_optim_rng.pt").exists()
    assert file["iteration"] == 0 and file["args"].consumed_train_samples == 0
    assert file["args"].tensor_model_parallel_size == 2 and file["args"].pipeline_model_parallel_size == 2
    assert file["optimizer"] is not None
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_without_keep_optimizer_states_are_dropped(sources, tmp_path, tool, capsys):
    source, _, _ = sources["mamba2_swiglu_untied"]
    assert tool.main(["--load-dir", str(source), "--save-dir", str(tmp_path / "out"), "--target-tp-size", "2",
                      "--target-pp-size", "1"]) == 0
    assert "optimizer state: dropped" in capsys.readouterr().out
    file = rank_file(tmp_path / "out", 1)
    assert all(file[k] is None for k in ("optimizer", "opt_param_scheduler", "grad_scaler", "rng_state"))


def _plant_unknown_tensor(directory: Path) -> None:
    path = checkpoint_name(directory, ITERATION)
    state = load_state(path)
    state["model"]["decoder.layers.0.mixer.bogus_tensor"] = torch.zeros(3)
    torch.save(state, path)


def _remove_rank_file(directory: Path) -> None:
    checkpoint_name(directory, ITERATION, 1, 0).unlink()


ERRORS = {
    "tp_does_not_divide_heads": ([], None, ["--target-tp-size", "3"], "does not divide num_attention_heads 4"),
    "unknown_tensor": ([], _plant_unknown_tensor, [], "'decoder.layers.0.mixer.bogus_tensor'"),
    "missing_rank_file": (["tp2"], _remove_rank_file, [], "missing rank file"),
    "pattern_layers_differ": ([], None, ["--target-layer-pattern", "M*-M*|-MM"], "has layers 'M*-M*-MM'"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_exit_2_and_write_nothing(sources, tmp_path, tool, capsys, case):
    prepare, damage, flags, expected = ERRORS[case]
    source = tmp_path / "source"
    if prepare:
        convert_checkpoint(sources["mamba2_swiglu_untied"][0], source, 2, 1)
    else:
        shutil.copytree(sources["mamba2_swiglu_untied"][0], source)
    if damage is not None:
        damage(source)
    before = sorted(p for p in source.rglob("*"))
    argv = ["--load-dir", str(source), "--save-dir", str(tmp_path / "out"), "--target-tp-size", "1",
            "--target-pp-size", "2", *flags]
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    if case == "missing_rank_file":
        assert "mp_rank_01_000" in err or "mp_rank_01" in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # no staging folder either
    assert sorted(p for p in source.rglob("*")) == before


def test_save_dir_equal_to_load_dir_is_refused(sources, tmp_path, tool, capsys):
    source = tmp_path / "source"
    shutil.copytree(sources["mamba2_swiglu_untied"][0], source)
    before = {p: p.stat().st_mtime_ns for p in source.rglob("*")}
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--load-dir", str(source), "--save-dir", str(source) + "/", "--target-tp-size", "2",
                   "--target-pp-size", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "is the --load-dir" in err
    assert {p: p.stat().st_mtime_ns for p in source.rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_failed_write_leaves_nothing(sources, tmp_path, monkeypatch):
    source, _, _ = sources["mamba2_swiglu_untied"]
    calls = []

    def flaky_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_save(obj, path, *args, **kwargs)

    real_save = torch.save
    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(source, tmp_path / "out", 2, 2)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_overrides_must_agree_with_saved_args(sources, tmp_path):
    source, _, _ = sources["mamba2_swiglu_untied"]
    with pytest.raises(ReshardError, match="--hidden-size 64 disagrees with the checkpoint's hidden_size 32"):
        convert_checkpoint(source, tmp_path / "out", 2, 1, overrides={"hidden_size": 64})
    convert_checkpoint(source, tmp_path / "ok", 2, 1, overrides={"hidden_size": 32, "mamba_num_groups": 2})
    assert not (tmp_path / "out").exists() and (tmp_path / "ok").exists()


def test_checkpoints_of_older_code_without_newer_args_gather(sources, tmp_path):
    """Args saved before --mamba-expand, --mamba-kv-groups and RoPE scaling existed take those flags' defaults."""
    source, _, _ = sources["mamba2_swiglu_untied"]
    old = tmp_path / "old"
    shutil.copytree(source, old)
    path = checkpoint_name(old, ITERATION)
    state = load_state(path)
    for name in ("mamba_expand", "mamba_kv_groups", "use_rope_scaling", "rope_scaling_factor"):
        delattr(state["args"], name)
    torch.save(state, path)
    full = gather_checkpoint(old, load_optimizer=False)
    assert full.config.mamba_kv_groups is None and full.config.mamba_expand == 2
    saved = load_state(path)["args"]  # the loader fills them in for every reader (build_model, the server, ...)
    assert saved.mamba_expand == 2 and saved.mamba_kv_groups is None and saved.use_rope_scaling is False
