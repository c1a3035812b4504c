"""tools/checkpoint/export_hf.py and megatron.training.hf_export: our checkpoints (TP1 and resharded TP2 x PP2) ->
Hugging Face folders that ``AutoModelForCausalLM.from_pretrained`` loads offline and that compute our logits.

Oracle: the model that wrote the checkpoint. Its logits on the true vocabulary must equal the Hugging Face model's
within 1e-5 (float32): both compute the same function, in a different order only (chunked scans with different chunk
sizes, fused vs separate q/k/v and MLP projections), so float32 rounding is all that separates them (measured near
1e-6; the Llama export is usually bit-identical). The padded vocabulary rows (a --make-vocab-size-divisible-by that
pads 61 to 64) are cut, so the logits are compared on the 61 true rows. Greedy decoding through Hugging Face's caches
must reproduce ours token for token.

The source checkpoints are written by ``save_checkpoint`` from tiny randomised models built from parsed arguments;
the resharding and one export run as real subprocesses (the script's folder holds an ``inspect.py`` that must not
shadow the standard library); the error cases call the script's ``main`` in-process to keep the suite fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron.core.models.hybrid import HybridModel
from megatron.training.arguments import build_parser, parse_args
from megatron.training.checkpointing import save_checkpoint
from megatron.training.hf_export import NEMOTRON_H_TIME_STEP_MIN, export_checkpoint, split_grouped_qkv
from megatron.training.tokenizer import padded_vocab_size
from megatron.training.training import build_model

from ..models.helpers import randomize_

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "tools" / "checkpoint" / "export_hf.py"
RESHARD = REPO / "tools" / "checkpoint" / "hybrid_conversion.py"
TRUE_VOCAB = 61  # NullTokenizer --vocab-size 60 plus its eod id 60
TOL = 1e-5
BASE = ["--hidden-size", "32", "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
        "--mamba-num-groups", "2", "--mamba-head-dim", "8", "--mamba-state-dim", "8", "--ffn-hidden-size", "48",
        "--seq-length", "64", "--normalization", "RMSNorm", "--disable-bias-linear",
        "--make-vocab-size-divisible-by", "8", "--hidden-dropout", "0", "--attention-dropout", "0"]
NULL_TOKENIZER = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(TRUE_VOCAB - 1)]
LLAMA = ["--hybrid-layer-pattern", "*-*-", "--position-embedding-type", "rope", "--rotary-base", "500", "--swiglu"]
NEMOTRON_H = ["--hybrid-layer-pattern", "M-M*-M", "--position-embedding-type", "none", "--squared-relu",
              "--untie-embeddings-and-output-weights"]
MAMBA2 = ["--hybrid-layer-pattern", "MMM", "--position-embedding-type", "none"]
HAS_ROPE_SCALING = any("--use-rope-scaling" in action.option_strings for action in build_parser()._actions)


# ------------------------------------------------------------------------------------------------------- helpers

def make_checkpoint(directory: Path, *flags: str, true_vocab: int = TRUE_VOCAB,
                    tweak=None) -> tuple[HybridModel, argparse.Namespace]:
    """A TP1 x PP1 checkpoint of a randomised tiny model built from parsed ``flags``; returns the model (eval) and
    args. ``tweak(model)`` may change parameters before saving."""
    args = parse_args([*BASE, *flags], training=False)
    args.true_vocab_size = true_vocab
    args.padded_vocab_size = padded_vocab_size(true_vocab, args.make_vocab_size_divisible_by, 1)
    model = randomize_(build_model(args)).eval()
    if tweak is not None:
        with torch.no_grad():
            tweak(model)
    save_checkpoint(directory, 1, model, None, None, args)
    return model, args


def load_hf(folder: Path) -> torch.nn.Module:
    """The exported folder through the Auto class, with every weight found and used."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def assert_same_logits(ours: HybridModel, hf: torch.nn.Module, vocab: int = TRUE_VOCAB, length: int = 23) -> None:
    ids = torch.randint(0, vocab, (2, length))
    with torch.no_grad():
        expected = ours(ids)
        got = hf(ids).logits
    assert expected.shape[-1] > vocab and got.shape[-1] == vocab  # the padded rows are cut
    torch.testing.assert_close(got, expected[..., :vocab], atol=TOL, rtol=TOL)


def greedy(ours: HybridModel, ids: torch.Tensor, steps: int, vocab: int = TRUE_VOCAB) -> torch.Tensor:
    """Our greedy continuation (full recomputation each step, argmax over the true vocabulary)."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, ours(ids)[:, -1, :vocab].argmax(-1, keepdim=True)], dim=1)
    return ids


def load_script(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    return load_script(SCRIPT, "export_hf_tool")


def run_main(tool: ModuleType, capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the script's ``main`` run in-process."""
    try:
        code = tool.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(tool, capsys, tmp_path: Path, source: Path, *extra: str, expect: tuple[str, ...]) -> str:
    save = tmp_path / "refused"
    code, _, err = run_main(tool, capsys, "--load-dir", source, "--save-dir", save, "--no-progress", *extra)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expect:
        assert text in lines[0], lines[0]
    assert not save.exists() and not list(tmp_path.glob(".refused.partial-*"))  # nothing left behind
    return lines[0]


@pytest.fixture(scope="module")
def nemotron_source(tmp_path_factory) -> tuple[Path, HybridModel]:
    """A Mamba / attention / squared-ReLU MLP hybrid, untied, with some dt far below NemotronH's default clamp."""
    root = tmp_path_factory.mktemp("nemotron")

    def tiny_dt(model: HybridModel) -> None:  # softplus(-10) ~ 4.5e-5 < 1e-3: NemotronH's default would clamp it
        model.decoder.layers[0].mixer.dt_bias[:4] = -10.0

    model, _ = make_checkpoint(root / "tp1", *NEMOTRON_H, *NULL_TOKENIZER, tweak=tiny_dt)
    return root / "tp1", model


# --------------------------------------------------------------------------------------------------- the formats

@pytest.mark.parametrize("variant", ["untied", "tied_qkv_bias_rope_scaling"])
def test_llama_export_computes_our_logits(tmp_path, variant):
    extra = ["--untie-embeddings-and-output-weights"]
    if variant != "untied":
        if not HAS_ROPE_SCALING:
            pytest.skip("this checkout has no --use-rope-scaling")
        extra = ["--add-qkv-bias", "--use-rope-scaling", "--rope-scaling-factor", "4",
                 "--rope-scaling-original-max-position-embeddings", "16"]
    ours, _ = make_checkpoint(tmp_path / "ckpt", *LLAMA, *NULL_TOKENIZER, *extra)
    result = export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    assert (result.target, result.architecture, result.true_vocab, result.padded_vocab) == (
        "llama", "LlamaForCausalLM", TRUE_VOCAB, 64)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == TRUE_VOCAB and config["num_hidden_layers"] == 2
    assert config["tie_word_embeddings"] == (variant != "untied")
    assert config["attention_bias"] == (variant != "untied") and config["eos_token_id"] == TRUE_VOCAB - 1
    if variant != "untied":
        assert config["rope_parameters"]["rope_type"] == "llama3"
        weights = load_file(tmp_path / "hf" / "model.safetensors")
        assert "lm_head.weight" not in weights and not weights["model.layers.0.self_attn.o_proj.bias"].any()
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert_same_logits(ours, hf, length=40)  # longer than the scaling's original 16 positions


def test_nemotron_h_export_computes_our_logits_and_decodes_alike(tmp_path, nemotron_source):
    source, ours = nemotron_source
    result = export_checkpoint(source, tmp_path / "hf")
    assert result.architecture == "NemotronHForCausalLM"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["layers_block_type"] == ["linear_attention", "mlp", "linear_attention", "full_attention", "mlp",
                                           "linear_attention"]
    assert (config["mlp_hidden_act"], config["mamba_num_heads"], config["n_groups"], config["ssm_state_size"]) == (
        "relu2", 8, 2, 8)
    assert config["time_step_min"] == NEMOTRON_H_TIME_STEP_MIN and config["tie_word_embeddings"] is False
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == TRUE_VOCAB - 1
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == "NemotronHForCausalLM"
    assert_same_logits(ours, hf)
    prompt = torch.randint(0, TRUE_VOCAB - 1, (2, 7))
    with torch.no_grad():
        generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                eos_token_id=None, pad_token_id=TRUE_VOCAB - 1)
    assert torch.equal(generated, greedy(ours, prompt, 6))


def test_nemotron_h_export_of_a_tied_gelu_hybrid_with_shared_mamba_groups(tmp_path):
    """GELU maps to mlp_hidden_act 'gelu'; the tied output layer is written as lm_head; x / B of the GQA-shared
    Mamba variant are repeated to the standard layout."""
    flags = ["--hybrid-layer-pattern", "M*-M", "--position-embedding-type", "none", "--mamba-kv-groups", "1"]
    ours, _ = make_checkpoint(tmp_path / "ckpt", *flags, *NULL_TOKENIZER)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf", target="nemotron_h")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["mlp_hidden_act"] == "gelu"
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(weights["lm_head.weight"], weights["model.embeddings.weight"])
    assert weights["model.layers.0.mixer.in_proj.weight"].shape[0] == 64 + 64 + 16 + 16 + 8
    assert_same_logits(ours, load_hf(tmp_path / "hf"))


def test_mamba2_export_with_tokenizer_files(tmp_path):
    """A pure-Mamba2 tied model with a tokenizer.json: the tokenizer is copied with a config naming its special
    tokens, AutoTokenizer reads the same ids as ours, and the logits match."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(TRUE_VOCAB - 3)] + ["<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<s>", "</s>", "<pad>"])
    (tmp_path / "tok").mkdir()
    tokenizer.save(str(tmp_path / "tok" / "tokenizer.json"))
    ours, _ = make_checkpoint(tmp_path / "ckpt", *MAMBA2, "--tokenizer-type", "HuggingFaceTokenizer",
                              "--tokenizer-model", str(tmp_path / "tok" / "tokenizer.json"))
    result = export_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    assert result.architecture == "Mamba2ForCausalLM" and not result.warnings
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(result.files)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (58, 59, 60)
    assert config["tie_word_embeddings"] is True and config["expand"] == 2
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer.encode("w3 w1 </s>", add_special_tokens=False) == [3, 1, 59]
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert_same_logits(ours, load_hf(tmp_path / "hf"))


def test_resharded_tp2_pp2_source_exports_the_same_model(tmp_path, nemotron_source, tool, capsys):
    """TP2 x PP2 (resharded by hybrid_conversion.py) exports the same tensors as TP1, through the command line; the
    bfloat16 export is the float32 one rounded."""
    source, ours = nemotron_source
    reshard = subprocess.run([sys.executable, str(RESHARD), "--load-dir", str(source), "--save-dir",
                              str(tmp_path / "tp2pp2"), "--target-tp-size", "2", "--target-pp-size", "2"],
                             capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert reshard.returncode == 0, reshard.stderr
    assert (tmp_path / "tp2pp2" / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt").exists()
    export = subprocess.run([sys.executable, str(SCRIPT), "--load-dir", str(tmp_path / "tp2pp2"), "--save-dir",
                             str(tmp_path / "hf"), "--target", "nemotron_h"],
                            capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert export.returncode == 0, export.stderr
    assert "exported NemotronHForCausalLM" in export.stdout
    assert "warning: NullTokenizer has no tokenizer files" in export.stderr
    export_checkpoint(source, tmp_path / "hf_tp1")
    resharded, single = (load_file(tmp_path / name / "model.safetensors") for name in ("hf", "hf_tp1"))
    assert list(resharded) == list(single)
    for key in single:
        assert torch.equal(resharded[key], single[key]), key
    assert_same_logits(ours, load_hf(tmp_path / "hf"))

    code, out, _ = run_main(tool, capsys, "--load-dir", tmp_path / "tp2pp2", "--save-dir", tmp_path / "hf_bf16",
                            "--dtype", "bfloat16", "--no-progress")
    assert code == 0 and "bfloat16" in out
    assert json.loads((tmp_path / "hf_bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    for key, value in load_file(tmp_path / "hf_bf16" / "model.safetensors").items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, single[key].to(torch.bfloat16)), key


# ------------------------------------------------------------------------------------------------------ refusals

def test_mamba1_hybrid_is_refused_for_nemotron_h(tmp_path, tool, capsys):
    make_checkpoint(tmp_path / "ckpt", "--hybrid-layer-pattern", "M*-M", "--position-embedding-type", "none",
                    "--squared-relu", "--mamba-version", "1", *NULL_TOKENIZER)
    line = assert_refused(tool, capsys, tmp_path, tmp_path / "ckpt", "--target", "nemotron_h",
                          expect=("NemotronHForCausalLM", "Mamba1", "--mamba-version 1"))
    assert "SwiGLU" not in line


def test_swiglu_rope_hybrid_is_refused_for_nemotron_h(tmp_path, tool, capsys):
    """Every reason is named in the one line; auto picks nemotron_h for a hybrid pattern."""
    make_checkpoint(tmp_path / "ckpt", "--hybrid-layer-pattern", "M*-M", "--position-embedding-type", "rope",
                    "--swiglu", *NULL_TOKENIZER)
    assert_refused(tool, capsys, tmp_path, tmp_path / "ckpt",
                   expect=("nemotron_h (NemotronHForCausalLM) chosen by --target auto", "SwiGLU (--swiglu)",
                           "RoPE"))


def test_other_formats_refuse_what_they_cannot_hold(tmp_path, tool, capsys):
    make_checkpoint(tmp_path / "layernorm", *LLAMA, *NULL_TOKENIZER, "--normalization", "LayerNorm")
    assert_refused(tool, capsys, tmp_path, tmp_path / "layernorm", "--target", "llama",
                   expect=("LlamaForCausalLM", "LayerNorm"))
    # A pure-Mamba model with the flag default (learned absolute positions) fits no format.
    make_checkpoint(tmp_path / "learned", "--hybrid-layer-pattern", "MM", *NULL_TOKENIZER)
    assert_refused(tool, capsys, tmp_path, tmp_path / "learned",
                   expect=("mamba2 (Mamba2ForCausalLM)", "learned absolute position embeddings"))
    make_checkpoint(tmp_path / "hybrid", *NEMOTRON_H, *NULL_TOKENIZER)
    assert_refused(tool, capsys, tmp_path, tmp_path / "hybrid", "--target", "mamba2",
                   expect=("not Mamba layers only",))
    assert_refused(tool, capsys, tmp_path, tmp_path / "hybrid", "--target", "llama",
                   expect=("not attention + MLP pairs", "needs RoPE", "SwiGLU"))


def test_non_empty_save_dir_and_bad_flags_are_refused(tmp_path, tool, capsys, nemotron_source):
    source, _ = nemotron_source
    save = tmp_path / "busy"
    save.mkdir()
    (save / "keep.txt").write_text("mine")
    code, _, err = run_main(tool, capsys, "--load-dir", source, "--save-dir", save)
    assert code == 2 and err.strip() == f"error: --save-dir {save} already exists and is not an empty directory"
    assert [p.name for p in save.iterdir()] == ["keep.txt"]
    for argv in (["--load-dir", source, "--save-dir", tmp_path / "x", "--target", "gpt2"],
                 ["--load-dir", tmp_path / "nowhere", "--save-dir", tmp_path / "x"]):
        code, _, err = run_main(tool, capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        assert not (tmp_path / "x").exists()
    # An existing empty folder is fine.
    (tmp_path / "empty").mkdir()
    code, out, _ = run_main(tool, capsys, "--load-dir", source, "--save-dir", tmp_path / "empty", "--no-progress")
    assert code == 0 and out.startswith("exported NemotronHForCausalLM")
    assert (tmp_path / "empty" / "model.safetensors").exists()


def test_split_grouped_qkv_inverts_the_import_layout():
    from megatron.core.models.hybrid.hf_conversion import grouped_qkv

    q, k, v = torch.randn(6 * 4, 10), torch.randn(2 * 4, 10), torch.randn(2 * 4, 10)
    for got, expected in zip(split_grouped_qkv(grouped_qkv(q, k, v, 2), 2, 4), (q, k, v), strict=True):
        assert torch.equal(got, expected)
    bias = torch.randn(2 * (3 + 2) * 4)  # a bias splits as a one-column weight does
    for got, column in zip(split_grouped_qkv(bias, 2, 4), split_grouped_qkv(bias[:, None], 2, 4), strict=True):
        assert torch.equal(got, column[:, 0])
