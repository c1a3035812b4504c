"""Scalar metrics to TensorBoard (``--tensorboard-dir``) and Weights & Biases (``--wandb-project``).

Both are optional packages (``pip install -c constraints.txt -e ".[logging]"``); asking for one that is missing is a
clear one-line error. W&B runs offline unless ``WANDB_MODE`` says otherwise, so it works without a network.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


class MetricsWriter:
    """Writes ``{name: value}`` scalars at an iteration to every backend the arguments enable (on global rank 0
    only: the logged values are the same on every rank)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._tensorboard: Any = None
        self._wandb: Any = None
        if getattr(args, "rank", 0) != 0:
            return
        if getattr(args, "tensorboard_dir", None):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard-dir needs the tensorboard package: "
                                 "python3 -m pip install -c constraints.txt tensorboard") from None
            self._tensorboard = SummaryWriter(log_dir=args.tensorboard_dir)
        if getattr(args, "wandb_project", None):
            try:
                import wandb
            except ImportError:
                raise ValueError("--wandb-project needs the wandb package: "
                                 "python3 -m pip install -c constraints.txt wandb") from None
            save_dir = args.wandb_save_dir or os.path.join(args.save or ".", "wandb")
            os.makedirs(save_dir, exist_ok=True)
            self._wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name, dir=save_dir,
                                     mode=os.environ.get("WANDB_MODE", "offline"),
                                     config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))})

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        """Record each value under its name at ``iteration``."""
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, iteration)
        if self._wandb is not None:
            self._wandb.log(values, step=iteration)

    def close(self) -> None:
        """Flush and close the backends."""
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
