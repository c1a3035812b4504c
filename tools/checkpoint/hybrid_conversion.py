"""Reshard a hybrid Mamba / attention / MLP checkpoint (Megatron's legacy layout) to another parallel layout.

Usage::

    python tools/checkpoint/hybrid_conversion.py --load-dir ckpt/tp1 --save-dir ckpt/tp2pp2 \\
        --target-tp-size 2 --target-pp-size 2 [--target-layer-pattern 'M*-|M*-M-'] \\
        [--target-virtual-pipeline-size V] [--keep-optimizer] [--reset-iterations] [--true-vocab-size N]

The model sizes, the layer pattern and the source layout come from the args saved in the checkpoint; the
``--hidden-size``-style flags (and Megatron's ``--d-model``, ``--mamba-d-state``, ``--mamba2-n-groups``,
``--mamba2-head-dim``) are only needed for checkpoints whose args lack them, and must agree with saved values.
Every key spelling of older and newer Megatron checkpoints is accepted; the output uses the current names.

* The tensor-parallel shards are merged and re-split by the rules of ``megatron.core.tensor_parallel.sharding``.
* ``--target-layer-pattern`` places the pipeline stages with ``|`` (same layers as the checkpoint); without it the
  checkpoint's pattern is kept when its stages fit, else the layers split evenly over the stages.
* The vocabulary is re-padded for the target tensor-parallel size (``--true-vocab-size``, else the saved
  ``true_vocab_size``): rows past the padded size are cut, missing rows are zeros.
* ``--keep-optimizer`` gathers and reshards the AdamW moments (and keeps the scheduler and loss-scaler state);
  otherwise the optimizer, scheduler, scaler and RNG states are dropped.
* ``--reset-iterations`` writes a ``release`` checkpoint at iteration 0 with no consumed samples.

The output is written to a temporary sibling folder and renamed to ``--save-dir`` at the end; on any error nothing
is left there and the source is never modified. Errors print ``error: <one line>`` and exit with code 2.
"""

from __future__ import annotations

import os
import sys

# tools/checkpoint/inspect.py would shadow the standard library's ``inspect`` for every import below; the package
# is importable from a checkout without installing it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import argparse  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from megatron.core.tensor_parallel.sharding import UnknownTensorError  # noqa: E402
from megatron.training.checkpoint_reshard import ReshardError, convert_checkpoint  # noqa: E402
from megatron.training.checkpointing import CheckpointError  # noqa: E402
from megatron.training.cli import OneLineParser as _Parser  # noqa: E402
from megatron.training.cli import fail  # noqa: E402

# Model-size flags for checkpoints whose saved args lack them: (flag, Megatron alias or None, args field, type).
OVERRIDES = (
    ("--hidden-size", "--d-model", "hidden_size", int),
    ("--num-layers", None, "num_layers", int),
    ("--hybrid-layer-pattern", None, "hybrid_layer_pattern", str),
    ("--num-attention-heads", None, "num_attention_heads", int),
    ("--num-query-groups", None, "num_query_groups", int),
    ("--kv-channels", None, "kv_channels", int),
    ("--ffn-hidden-size", None, "ffn_hidden_size", int),
    ("--mamba-version", None, "mamba_version", int),
    ("--mamba-state-dim", "--mamba-d-state", "mamba_state_dim", int),
    ("--mamba-head-dim", "--mamba2-head-dim", "mamba_head_dim", int),
    ("--mamba-num-groups", "--mamba2-n-groups", "mamba_num_groups", int),
    ("--mamba-num-heads", None, "mamba_num_heads", int),
)




def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = _Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--load-dir", required=True, help="Checkpoint directory to read (with its tracker file).")
    parser.add_argument("--save-dir", required=True, help="New directory to write; must not exist or be empty.")
    parser.add_argument("--target-tp-size", type=int, required=True, help="Target tensor-parallel size.")
    parser.add_argument("--target-pp-size", type=int, required=True, help="Target pipeline-parallel size.")
    parser.add_argument("--target-virtual-pipeline-size", type=int, default=None,
                        help="Model chunks per pipeline rank (interleaved schedule). Default: inferred from the "
                             "'|' segments of the target pattern, or the checkpoint's when the pipeline size is "
                             "unchanged.")
    parser.add_argument("--target-layer-pattern", default=None,
                        help="The layer pattern with '|' stage boundaries for the target (same layers as the "
                             "checkpoint).")
    parser.add_argument("--keep-optimizer", action="store_true",
                        help="Gather and reshard the optimizer state (and keep scheduler and loss-scaler state).")
    parser.add_argument("--reset-iterations", action="store_true",
                        help="Write a 'release' checkpoint at iteration 0 with consumed_train_samples 0.")
    parser.add_argument("--true-vocab-size", type=int, default=None,
                        help="Unpadded vocabulary size (default: the saved true_vocab_size, else the saved padded "
                             "size).")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")
    parser.add_argument("--megatron-path", default=None, help="Accepted for Megatron-LM compatibility; unused.")
    sizes = parser.add_argument_group("model sizes (only for checkpoints whose saved args lack them)")
    for flag, alias, dest, kind in OVERRIDES:
        names = [flag] + ([alias] if alias else [])
        sizes.add_argument(*names, dest=dest, type=kind, default=None, help=f"The model's {dest}.")
    return parser.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The model-size overrides given on the command line."""
    return {dest: getattr(args, dest) for _, _, dest, _ in OVERRIDES if getattr(args, dest) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conversion; returns the exit code."""
    args = get_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        summary = convert_checkpoint(
            args.load_dir, args.save_dir, args.target_tp_size, args.target_pp_size,
            args.target_virtual_pipeline_size, args.target_layer_pattern, keep_optimizer=args.keep_optimizer,
            reset_iterations=args.reset_iterations, true_vocab_size=args.true_vocab_size,
            overrides=overrides_from(args), progress=progress)
    except (ReshardError, CheckpointError, UnknownTensorError, ValueError) as error:
        fail(str(error))
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"source: {args.load_dir} ({summary.source.describe()}, pattern {summary.source.pattern!r})")
    print(f"target: {args.save_dir} ({summary.target.describe()}, pattern {summary.target.pattern!r})")
    print("optimizer state: kept (gathered and resharded)" if summary.optimizer_kept else "optimizer state: dropped")
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
