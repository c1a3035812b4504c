"""Step time of tensor- and pipeline-parallel training against one process, and the share spent communicating.

    python benchmarks/bench_parallel_step.py [--iters 20] [--json benchmarks/results_parallel_cpu.json]

Runs the tiny recipe model (4 layers ``M*-M``-style, hidden 128, sequence 128, global batch 16 in micro-batches of 4)
on mock data with gloo, one layout after the other: 1 process, TP2, TP2 + SP, PP2 (1F1B, 4 micro-batches), DP2. Each
layout runs under torchrun with this same script as the worker: rank 0 times the training loop and every
``torch.distributed`` call (collectives, point-to-point sends/receives and their waits). "Communication" is time
blocked in those calls: the transfers plus waiting for slower peers (pipeline bubbles, load imbalance), measured on
rank 0 over the whole loop (the first step includes the pipeline's shape exchange).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--num-layers", "4", "--hybrid-attention-ratio", "0.25", "--hybrid-mlp-ratio", "0.25", "--hidden-size", "128",
         "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--mamba-head-dim", "32",
         "--mamba-num-groups", "2", "--mamba-state-dim", "32", "--seq-length", "128", "--micro-batch-size", "4",
         "--global-batch-size", "16", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "2047",
         "--normalization", "RMSNorm", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
         "--lr", "1e-3", "--eval-iters", "0", "--hidden-dropout", "0", "--attention-dropout", "0",
         "--num-workers", "0", "--distributed-backend", "gloo"]
LAYOUTS = {
    "1 process": (1, []),
    "TP2": (2, ["--tensor-model-parallel-size", "2"]),
    "TP2 + SP": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "PP2 (1F1B)": (2, ["--pipeline-model-parallel-size", "2"]),
    "DP2": (2, []),
}
# Pipelining sends through batch_isend_irecv (isend / irecv themselves must stay unwrapped: P2POp checks them).
TIMED_CALLS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier", "all_gather_object", "send",
               "recv", "batch_isend_irecv")
_blocked = [0.0]


class _TimedWork:
    """A pending request whose ``wait`` is timed."""

    def __init__(self, work: Any) -> None:
        self._work = work

    def wait(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._work.wait(*args)
        finally:
            _blocked[0] += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _timed(function: Any) -> Any:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            result = function(*args, **kwargs)
        finally:
            _blocked[0] += time.perf_counter() - start
        if isinstance(result, list):
            return [_TimedWork(work) if hasattr(work, "wait") else work for work in result]
        return _TimedWork(result) if hasattr(result, "wait") else result
    return wrapper


def worker(iters: int, out: str) -> None:
    """Train under torchrun with every distributed call timed; rank 0 writes its figures to ``out``."""
    for name in TIMED_CALLS:
        setattr(dist, name, _timed(getattr(dist, name)))
    from megatron.training.arguments import parse_args
    from megatron.training.training import pretrain

    extra = json.loads(os.environ["BENCH_FLAGS"])
    args = parse_args(MODEL + extra + ["--train-iters", str(iters), "--log-interval", str(iters)])
    rank = int(os.environ.get("RANK", 0))
    results = pretrain(args)
    loop = sum(results[key] for key in ("seconds_data", "seconds_forward-backward", "seconds_optimizer"))
    if rank == 0:
        Path(out).write_text(json.dumps({
            "step_ms": 1000 * loop / iters,
            "communication_share": _blocked[0] / loop, "tokens_per_second": results["tokens_per_second"],
        }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker_out:
        worker(options.iters, options.worker_out)
        return
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (nproc, flags) in LAYOUTS.items():
            out = Path(scratch) / "result.json"
            env = {**os.environ, "BENCH_FLAGS": json.dumps(flags), "OMP_NUM_THREADS": str(max(2 // nproc, 1))}
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(nproc), __file__, "--iters", str(options.iters), "--worker-out", str(out)],
                           cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[name] = json.loads(out.read_text())
    base = results["1 process"]["step_ms"]
    print(f"\n{'layout':12s} {'step (ms)':>10s} {'vs 1 process':>13s} {'communication':>14s}")
    for name, row in results.items():
        print(f"{name:12s} {row['step_ms']:10.1f} {row['step_ms'] / base:12.2f}x {row['communication_share']:13.1%}")
    if options.json:
        Path(options.json).write_text(json.dumps({"iters": options.iters, "cpu_count": os.cpu_count(),
                                                  "layouts": results}, indent=2))


if __name__ == "__main__":
    main()
