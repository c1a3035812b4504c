"""Throughput of the CPU training loop and the share of it spent outside forward/backward (data loading, optimizer,
scheduler, logging), for the tiny recipe model and the seed-001 40M pure-Mamba2 model, on mock data.

    python benchmarks/bench_training_loop.py [--iters-tiny 40] [--iters-40m 4]

Target (issue 3): under 5% of the loop outside forward/backward.
"""

from __future__ import annotations

import argparse
import json

import torch

from megatron.training.arguments import parse_args
from megatron.training.training import pretrain

COMMON = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--normalization", "RMSNorm", "--disable-bias-linear",
          "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--eval-iters", "0",
          "--hidden-dropout", "0.0", "--attention-dropout", "0.0", "--position-embedding-type", "none",
          # Samples cost ~0.1 ms: worker processes would only compete with compute for 2 cores.
          "--num-workers", "0", "--distributed-backend", "gloo"]
CONFIGS = {
    "tiny": ["--num-layers", "4", "--hybrid-attention-ratio", "0.25", "--hybrid-mlp-ratio", "0.25",
             "--hidden-size", "128", "--num-attention-heads", "4", "--mamba-head-dim", "32", "--mamba-num-groups", "2",
             "--mamba-state-dim", "32", "--seq-length", "128", "--max-position-embeddings", "128",
             "--micro-batch-size", "8", "--global-batch-size", "16", "--vocab-size", "2047"],
    "seed-001 40M": ["--num-layers", "12", "--hidden-size", "256", "--mamba-num-heads", "24", "--mamba-head-dim", "32",
                     "--mamba-num-groups", "8", "--mamba-state-dim", "128", "--num-attention-heads", "4",
                     "--seq-length", "1024", "--max-position-embeddings", "1024", "--micro-batch-size", "4",
                     "--global-batch-size", "4", "--vocab-size", "31999"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters-tiny", type=int, default=40)
    parser.add_argument("--iters-40m", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    results = {}
    for name, flags in CONFIGS.items():
        iters = options.iters_tiny if name == "tiny" else options.iters_40m
        args = parse_args(COMMON + flags + ["--train-iters", str(iters), "--log-interval", str(iters)])
        outcome = pretrain(args)
        results[name] = {key: outcome[key] for key in ("tokens_per_second", "fraction_outside_forward_backward",
                                                       "seconds_data", "seconds_forward-backward",
                                                       "seconds_optimizer")}
    print("\nconfig          tokens/s   outside forward/backward (data + optimizer + logging)")
    for name, row in results.items():
        print(f"{name:14s} {row['tokens_per_second']:9.1f}   {row['fraction_outside_forward_backward']:6.1%}  "
              f"(data {row['seconds_data']:.2f} s, optimizer {row['seconds_optimizer']:.2f} s, "
              f"forward-backward {row['seconds_forward-backward']:.2f} s)")
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
