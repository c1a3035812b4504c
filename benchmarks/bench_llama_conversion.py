"""Time and peak memory of converting a Llama-3.2-1B-sized model (random weights, built here, saved as safetensors).

    python benchmarks/bench_llama_conversion.py [--layers 16] [--dtype bfloat16] [--json OUT]

The Llama is built with ``transformers`` (Llama 3.2 1B's config: hidden 2048, 16 layers, 32 heads, 8 key/value
heads, FFN 8192, vocabulary 128256, tied embeddings, llama3 RoPE scaling), saved in bfloat16, then converted in a
fresh process by ``tools/checkpoint/llama_to_transformer.py`` and by ``tools/checkpoint/llama_to_hybrid.py`` (half the
layers become Mamba2). Each conversion reports its wall time and the peak resident memory of its process
(``ru_maxrss``), which is what decides whether an 8B conversion fits this machine's 24 GiB: the converter holds one
rank file (here the whole model at TP1) plus one tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def build_llama(folder: Path, layers: int) -> int:
    """Save a random Llama-3.2-1B-shaped model (bfloat16) with a tiny tokenizer; returns its parameter count."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                         rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.tie_weights()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 1000)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                            bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


# Runs a tool in this child process and prints the child's own peak RSS (KiB) last.
_MEASURED = ("import resource, runpy, sys\n"
             "script = sys.argv[1]\nsys.argv = sys.argv[1:]\n"
             "try:\n    runpy.run_path(script, run_name='__main__')\nexcept SystemExit as stop:\n"
             "    assert not stop.code, stop.code\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def run_tool(script: str, hf_dir: Path, save_dir: Path, *extra: str) -> dict[str, float]:
    """Run a conversion in a child process; its wall time and its own peak RSS (GiB, file pages the safetensors
    reader maps included)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _MEASURED, str(ROOT / "tools" / "checkpoint" / script),
                             "--hf-dir", str(hf_dir), "--save-dir", str(save_dir), "--no-progress",
                             "--allow-special-token-mismatch", *extra], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_gib": int(result.stdout.split()[-1]) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--json", help="also write the results to this file")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT / "data_cache" if (ROOT / "data_cache").is_dir() else None) as tmp:
        hf_dir = Path(tmp) / "llama"
        start = time.perf_counter()
        params = build_llama(hf_dir, options.layers)
        build_seconds = time.perf_counter() - start
        size = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")) / 2**30
        print(f"random Llama: {params / 1e9:.2f}B parameters, {size:.2f} GiB of safetensors, built in "
              f"{build_seconds:.0f} s")
        results = {"parameters": params, "safetensors_gib": size}
        results["llama_to_transformer"] = run_tool("llama_to_transformer.py", hf_dir, Path(tmp) / "transformer")
        print(f"llama_to_transformer: {results['llama_to_transformer']['seconds']:.1f} s, peak "
              f"{results['llama_to_transformer']['peak_rss_gib']:.2f} GiB")
        results["llama_to_transformer_tp2"] = run_tool("llama_to_transformer.py", hf_dir, Path(tmp) / "tp2",
                                                       "--target-tp-size", "2")
        results["llama_to_hybrid"] = run_tool("llama_to_hybrid.py", hf_dir, Path(tmp) / "hybrid",
                                              "--attention-fraction", "0.5")
        for name in ("llama_to_transformer_tp2", "llama_to_hybrid"):
            print(f"{name}: {results[name]['seconds']:.1f} s, peak {results[name]['peak_rss_gib']:.2f} GiB")
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
