"""Pretrain a hybrid Mamba / attention / MLP language model (Megatron-LM's ``pretrain_mamba.py`` flags).

    python pretrain_hybrid.py --num-layers 4 --hybrid-attention-ratio 0.25 --hidden-size 128 ... (see --help)
    torchrun --nproc_per_node 1 pretrain_hybrid.py ...

A user mistake (bad flag, missing file, incompatible checkpoint) prints one line and exits with status 2.
"""

from __future__ import annotations

import sys

from megatron.training.arguments import ArgumentError, parse_args
from megatron.training.checkpointing import CheckpointError


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and train; returns the process exit status."""
    try:
        args = parse_args(argv)
        from megatron.training.training import pretrain  # after parsing, so --help stays fast

        pretrain(args)
    except (ArgumentError, CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"pretrain_hybrid.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
