"""Llama -> hybrid ("Mamba in the Llama"): v/k/q/o land where DESIGN.md says, norms and MLPs are kept, and with
every layer kept as attention the hybrid is the Llama (against ``LlamaForCausalLM``, float32, 1e-5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron.core.inference.generation import generate
from megatron.training.llama_import import LlamaImportError, hybrid_pattern

from .test_llama_import import hf_logits, load_converted, load_script, make_llama

REPO = Path(__file__).resolve().parents[3]


def run(hf_dir, save_dir, *extra: str) -> int:
    tool = load_script(REPO / "tools" / "checkpoint" / "llama_to_hybrid.py", "llama_to_hybrid")
    try:
        return tool.main(["--hf-dir", str(hf_dir), "--save-dir", str(save_dir), "--no-progress", *extra],
                         hybrid=True)
    except SystemExit as stop:
        return stop.code


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hybrid") / "hf"
    return folder, make_llama(folder, tied=False, rope_scaling=None, vocab=100, how="safetensors")


def test_attention_fraction_one_reproduces_the_llama(llama, tmp_path):
    hf_dir, hf = llama
    assert run(hf_dir, tmp_path / "all", "--attention-fraction", "1.0") == 0
    model, args = load_converted(tmp_path / "all")
    assert args.hybrid_layer_pattern == "*-*-"
    tokens = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_logits(hf, tokens), rtol=0, atol=1e-5)


def test_converted_layers_take_v_k_q_o_and_keep_norms_and_mlps(llama, tmp_path):
    hf_dir, hf = llama
    assert run(hf_dir, tmp_path / "mil", "--attention-layers", "1", "--seed", "7") == 0
    model, args = load_converted(tmp_path / "mil")
    assert args.hybrid_layer_pattern == "M-*-" and args.mamba_kv_groups == 2 and args.mamba_num_groups == 4
    source = hf.state_dict()
    mixer = model.decoder.layers[0].mixer
    _z, x, b, c, _dt = mixer.in_proj.weight.split([64, 32, 32, 64, 4])
    layer = "model.layers.0."
    assert torch.equal(x, source[layer + "self_attn.v_proj.weight"])
    assert torch.equal(b, source[layer + "self_attn.k_proj.weight"])
    assert torch.equal(c, source[layer + "self_attn.q_proj.weight"])
    assert torch.equal(mixer.out_proj.weight, source[layer + "self_attn.o_proj.weight"])
    assert torch.equal(mixer.in_proj.layer_norm_weight, source[layer + "input_layernorm.weight"])
    mlp = model.decoder.layers[1].mlp
    assert torch.equal(mlp.linear_fc1.weight, torch.cat([source[layer + "mlp.gate_proj.weight"],
                                                         source[layer + "mlp.up_proj.weight"]]))
    assert torch.equal(mlp.linear_fc1.layer_norm_weight, source[layer + "post_attention_layernorm.weight"])
    assert torch.equal(mlp.linear_fc2.weight, source[layer + "mlp.down_proj.weight"])
    attention = model.decoder.layers[2].self_attention  # Llama layer 1 stayed attention
    assert torch.equal(attention.linear_proj.weight, source["model.layers.1.self_attn.o_proj.weight"])
    report = json.loads((tmp_path / "mil" / "conversion_report.json").read_text())
    assert report["ok"] and report["counts"]["unused"] == 0
    kinds = {key: entry["status"] for key, entry in report["target_tensors"].items()}
    assert kinds["decoder.layers.0.mixer.in_proj.weight"] == "derived"
    assert kinds["decoder.layers.0.mixer.A_log"] == "initialised"
    assert kinds["decoder.layers.0.mixer.out_proj.weight"] == "copied"
    # The converted model runs, prefill + decode agreeing with recomputation.
    prompt = [[5, 6, 7, 8, 9]]
    output = generate(model, prompt, 5, args.max_position_embeddings)
    with torch.no_grad():
        logits = model(torch.tensor([output.tokens[0][:-1]]))
    assert logits.isfinite().all()
    assert output.tokens[0][5:] == logits[0, 4:].argmax(-1).tolist()


def test_fresh_parameters_follow_the_seed(llama, tmp_path):
    hf_dir, _ = llama
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert run(hf_dir, tmp_path / name, "--attention-fraction", "0", "--seed", seed) == 0
    dt = [load_converted(tmp_path / name)[0].decoder.layers[0].mixer.dt_bias for name in "abc"]
    assert torch.equal(dt[0], dt[1]) and not torch.equal(dt[0], dt[2])


def test_layer_choice_rules_and_errors(llama, tmp_path, capsys):
    assert hybrid_pattern(8, attention_fraction=0.25) == "M-M-M-*-M-M-M-*-"
    assert hybrid_pattern(4, attention_fraction=0.5) == "M-*-M-*-"
    assert hybrid_pattern(3, attention_fraction=0.0) == "M-M-M-"
    assert hybrid_pattern(3, attention_layers=[0, 2]) == "*-M-*-"
    with pytest.raises(LlamaImportError, match="out of range"):
        hybrid_pattern(3, attention_layers=[3])
    hf_dir, _ = llama
    assert run(hf_dir, tmp_path / "bad", "--hybrid-layer-pattern", "MM*-") == 2
    assert "must be 'M-' or '*-' for each of the 2 Llama layers" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_mamba1_conversion_takes_v_and_o_and_reports_q_k_unused(llama, tmp_path):
    hf_dir, hf = llama
    assert run(hf_dir, tmp_path / "m1", "--attention-layers", "1", "--mamba-version", "1") == 0
    model, args = load_converted(tmp_path / "m1")
    assert args.mamba_version == 1 and args.mamba_expand == 1
    source, mixer = hf.state_dict(), model.decoder.layers[0].mixer
    v = source["model.layers.0.self_attn.v_proj.weight"].unflatten(0, (2, 16))  # 2 key/value heads of 16
    x = mixer.in_proj.weight[:64].unflatten(0, (4, 16))
    for head in range(4):
        assert torch.equal(x[head], v[head // 2])
    assert torch.equal(mixer.out_proj.weight, source["model.layers.0.self_attn.o_proj.weight"])
    report = json.loads((tmp_path / "m1" / "conversion_report.json").read_text())
    unused = {name for name, entry in report["source_tensors"].items() if entry["status"] == "unused"}
    assert report["ok"] and unused == {"model.layers.0.self_attn.q_proj.weight",
                                       "model.layers.0.self_attn.k_proj.weight"}
    with torch.no_grad():
        assert model(torch.randint(0, 100, (1, 12))).isfinite().all()


def test_converted_all_attention_model_has_the_llamas_perplexity(llama, tmp_path):
    """tools/evaluate_perplexity.py on the Hugging Face Llama and on its conversion, same text, strided windows."""
    hf_dir, _ = llama
    assert run(hf_dir, tmp_path / "all", "--attention-fraction", "1.0") == 0
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(7 * i) % 97 + 3}" for i in range(90)))
    evaluate = load_script(REPO / "tools" / "evaluate_perplexity.py", "evaluate_perplexity")
    results = []
    for source in (["--hf-dir", str(hf_dir)], ["--load", str(tmp_path / "all")]):
        out = tmp_path / f"ppl{len(results)}.json"
        assert evaluate.main([*source, "--input", str(text), "--window", "32", "--stride", "16", "--json", str(out),
                              "--no-progress"]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["tokens"] == results[1]["tokens"] == 89
    assert results[1]["perplexity"] == pytest.approx(results[0]["perplexity"], rel=1e-5)


def test_pretraining_continues_from_the_conversion_with_checkpoint_args(llama, tmp_path):
    """``pretrain_hybrid.py --load CONVERTED --use-checkpoint-args`` needs no model flags (they are in the
    checkpoint) and trains; a contradicting model flag is refused with one line."""
    import subprocess
    import sys

    hf_dir, _ = llama
    assert run(hf_dir, tmp_path / "mil", "--attention-fraction", "0.5") == 0
    command = [sys.executable, str(REPO / "pretrain_hybrid.py"), "--load", str(tmp_path / "mil"),
               "--use-checkpoint-args", "--mock-data", "--micro-batch-size", "1", "--train-iters", "2", "--lr", "1e-4",
               "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", "--distributed-backend", "gloo"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hybrid layer pattern: M-*-" in result.stdout and result.stdout.count("lm loss:") == 2
    refused = subprocess.run([*command, "--hidden-size", "32"], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and "--hidden-size 32 vs the checkpoint's 64" in refused.stderr
