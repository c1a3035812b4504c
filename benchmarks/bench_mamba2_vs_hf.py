"""Train-step and greedy-decode throughput of a pure-Mamba2 model against Hugging Face's ``Mamba2ForCausalLM``.

Both models hold the same weights (ours is loaded from the HF one) and run in the same process on the same inputs, so
the printed ratios hold on a noisy machine. Default config: the seed-001 study model (hidden 256, 12 layers, 24 heads
of 32, 8 groups, state 128, vocab 32000), sequence 1024, batch 4, float32, 2 threads.

    python benchmarks/bench_mamba2_vs_hf.py                 # both measurements
    python benchmarks/bench_mamba2_vs_hf.py --skip-train --decode-batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

from megatron.core.inference.generation import greedy_generate
from megatron.core.models.hybrid import HybridModel
from megatron.core.models.hybrid.hf_conversion import mamba_from_hf
from megatron.core.transformer import TransformerConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--state", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=4, help="timed steps per model after one warm-up step")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--decode-batch", type=int, default=1)
    parser.add_argument("--decode-repeats", type=int, default=3, help="timed generations per model after a warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    return parser.parse_args()


def build_models(args: argparse.Namespace) -> tuple[Mamba2ForCausalLM, HybridModel]:
    torch.manual_seed(0)
    hf_config = Mamba2Config(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_heads=args.heads, head_dim=args.head_dim,
        n_groups=args.groups, state_size=args.state, vocab_size=args.vocab,
        expand=args.heads * args.head_dim // args.hidden, chunk_size=128, tie_word_embeddings=True,
        layer_norm_epsilon=1e-5,
    )
    hf = Mamba2ForCausalLM(hf_config)
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, mamba_num_heads=args.heads, mamba_head_dim=args.head_dim,
        mamba_num_groups=args.groups, mamba_state_dim=args.state, normalization="RMSNorm", hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    ours = HybridModel(config, args.vocab, args.seq + args.new_tokens + args.prompt,
                       share_embeddings_and_output_weights=True)
    ours.load_state_dict(mamba_from_hf(hf.state_dict(), args.layers))
    return hf, ours


def interleaved(steps: dict[str, Callable[[], Any]],
                repeats: int) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Seconds of every call of each step and every call's result. Calls alternate between the steps, so that
    drifts in machine speed (common on shared VMs) hit all alike, and each round starts one step later than the
    previous one, so that no step always runs right after the same peer (a call that follows another one's large
    allocations meets colder caches and fresh pages)."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[Any]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            outputs[name].append(steps[name]())
            times[name].append(time.perf_counter() - start)
    return times, outputs


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each step function after one warm-up call each (calls as in :func:`interleaved`)."""
    for step in steps.values():
        step()
    times, _ = interleaved(steps, repeats)
    return {name: statistics.median(values) for name, values in times.items()}


def train_step_fn(model: torch.nn.Module, ids: torch.Tensor, is_hf: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = model(ids, labels=ids).loss if is_hf else model(ids, labels=ids).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    hf, ours = build_models(args)
    results: dict[str, float] = {}

    probe = torch.randint(0, args.vocab, (2, 64))
    with torch.no_grad():
        gap = (hf(probe).logits - ours(probe)).abs().max().item()
    print(f"same weights, same function: max |logit difference| = {gap:.2e}")

    if not args.skip_decode:
        hf.eval()
        ours.eval()
        prompt = torch.randint(0, args.vocab, (args.decode_batch, args.prompt))
        outputs: dict[str, torch.Tensor] = {}

        def hf_decode() -> None:
            outputs["hf"] = hf.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        do_sample=False, pad_token_id=0)[:, args.prompt:]

        with torch.inference_mode():  # the first call of each also builds our fused CPU kernels (once)
            steps = {"hf": hf_decode, "ours": lambda: greedy_generate(ours, prompt, args.new_tokens)}
            seconds = time_interleaved(steps, args.decode_repeats)
        hf_seconds, our_seconds, hf_out = seconds["hf"], seconds["ours"], outputs["hf"]
        new_tokens = args.decode_batch * args.new_tokens
        results["decode_tokens_per_s_hf"] = new_tokens / hf_seconds
        results["decode_tokens_per_s_ours"] = new_tokens / our_seconds
        results["decode_speedup"] = hf_seconds / our_seconds
        # Random weights give near-tied logits, so free-running greedy sequences drift apart after the first flip;
        # teacher forcing on HF's sequence compares next-token choices position by position instead.
        with torch.inference_mode():
            forced = ours(torch.cat([prompt, hf_out], dim=1))[:, args.prompt - 1 : -1].argmax(-1)
        agree = (forced == hf_out).float().mean().item()
        print(f"decode hf   : {new_tokens / hf_seconds:8.1f} tokens/s (batch {args.decode_batch}, prompt "
              f"{args.prompt}, {args.new_tokens} new)")
        print(f"decode ours : {new_tokens / our_seconds:8.1f} tokens/s; same next token as HF (teacher-forced): "
              f"{agree:.1%}")
        print(f"decode speed-up over Hugging Face: {results['decode_speedup']:.2f}x")

    if not args.skip_train:  # after decoding: the optimizer steps change the two models' weights separately
        ids = torch.randint(0, args.vocab, (args.batch, args.seq))
        tokens = args.batch * args.seq
        hf.train()
        ours.train()
        seconds = time_interleaved({"hf": train_step_fn(hf, ids, True), "ours": train_step_fn(ours, ids, False)},
                                   args.train_steps)
        for name in ("hf", "ours"):
            results[f"train_tokens_per_s_{name}"] = tokens / seconds[name]
            print(f"train  {name:5s}: {seconds[name]:7.2f} s/step  {tokens / seconds[name]:8.1f} tokens/s", flush=True)
        results["train_speedup"] = results["train_tokens_per_s_ours"] / results["train_tokens_per_s_hf"]
        print(f"train speed-up over Hugging Face: {results['train_speedup']:.2f}x")

    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results, "torch": torch.__version__}, handle, indent=2)


if __name__ == "__main__":
    main()
