"""Learning-rate and weight-decay schedules with Megatron-LM's ``OptimizerParamScheduler`` semantics.

Steps are whatever the caller counts: iterations, or (as Megatron's training loop does) consumed samples. The learning
rate warms up linearly from ``init_lr`` to ``max_lr`` over ``lr_warmup_steps``, then follows ``lr_decay_style`` down
to ``min_lr`` at ``lr_decay_steps`` and stays there. Weight decay moves from ``start_wd`` to ``end_wd`` over
``wd_incr_steps``. Every optimizer parameter group gets ``lr`` and ``weight_decay * group["wd_mult"]`` (so groups
with ``wd_mult`` 0 are never decayed); groups may override ``max_lr`` / ``min_lr`` / ``start_wd`` / ``end_wd``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")


class OptimizerParamScheduler:
    """Sets the learning rate and weight decay of every parameter group of ``optimizer`` at each :meth:`step`.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (its groups may carry ``wd_mult``, ``max_lr``, ``min_lr``,
            ``start_wd``, ``end_wd``).
        init_lr: learning rate at step 0 (the warmup starts here).
        max_lr: learning rate at the end of warmup.
        min_lr: learning rate from ``lr_decay_steps`` on.
        lr_warmup_steps: length of the linear warmup (0 for none).
        lr_decay_steps: step at which the decay reaches ``min_lr``; ``None`` is read as 0 (no decay horizon, as for
            an evaluation-only run).
        lr_decay_style: one of ``constant``, ``linear``, ``cosine``, ``inverse-square-root``, ``WSD``.
        start_wd, end_wd: weight decay at step 0 and from ``wd_incr_steps`` on.
        wd_incr_steps: length of the weight-decay ramp.
        wd_incr_style: ``constant`` (needs ``start_wd == end_wd``), ``linear`` or ``cosine``.
        wsd_decay_steps: for ``WSD``: the last ``wsd_decay_steps`` steps before ``lr_decay_steps`` anneal; the
            steps between warmup and them stay at ``max_lr``.
        lr_wsd_decay_style: for ``WSD``: ``exponential`` (default), ``linear``, ``cosine`` or ``minus_sqrt``.

    Raises ``ValueError`` for inconsistent settings.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: int,
        lr_decay_steps: int | None,
        lr_decay_style: str,
        start_wd: float,
        end_wd: float,
        wd_incr_steps: int,
        wd_incr_style: str,
        wsd_decay_steps: int | None = None,
        lr_wsd_decay_style: str | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.init_lr = float(init_lr)
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.lr_warmup_steps = int(lr_warmup_steps or 0)
        self.lr_decay_steps = int(lr_decay_steps or 0)
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps = None if wsd_decay_steps is None else int(wsd_decay_steps)
        self.lr_wsd_decay_style = lr_wsd_decay_style or "exponential"
        self.start_wd = float(start_wd)
        self.end_wd = float(end_wd)
        self.wd_incr_steps = int(wd_incr_steps or 0)
        self.wd_incr_style = wd_incr_style
        self.num_steps = 0
        self._check()
        self.step(0)

    def _check(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"OptimizerParamScheduler: {message}")

        require(0.0 <= self.min_lr <= self.max_lr, f"need 0 <= min_lr <= max_lr, got {self.min_lr}, {self.max_lr}")
        require(0.0 <= self.init_lr <= self.max_lr,
                f"need 0 <= init_lr <= max_lr, got {self.init_lr}, {self.max_lr}")
        require(self.lr_decay_style in LR_DECAY_STYLES,
                f"lr_decay_style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")
        require(self.lr_warmup_steps >= 0 and self.lr_decay_steps >= 0,
                f"warmup and decay steps must be >= 0, got {self.lr_warmup_steps}, {self.lr_decay_steps}")
        if self.lr_decay_steps > 0:
            require(self.lr_warmup_steps < self.lr_decay_steps,
                    f"lr_warmup_steps ({self.lr_warmup_steps}) must be < lr_decay_steps ({self.lr_decay_steps})")
        if self.lr_decay_style == "WSD":
            require(self.wsd_decay_steps is not None and self.wsd_decay_steps > 0,
                    f"the WSD style needs wsd_decay_steps > 0, got {self.wsd_decay_steps}")
            require(self.lr_wsd_decay_style in WSD_DECAY_STYLES,
                    f"lr_wsd_decay_style must be one of {WSD_DECAY_STYLES}, got {self.lr_wsd_decay_style!r}")
        require(0.0 <= self.start_wd <= self.end_wd, f"need 0 <= start_wd <= end_wd, got {self.start_wd}, "
                f"{self.end_wd}")
        require(self.wd_incr_style in WD_INCR_STYLES,
                f"wd_incr_style must be one of {WD_INCR_STYLES}, got {self.wd_incr_style!r}")
        if self.wd_incr_style == "constant":
            require(self.start_wd == self.end_wd,
                    f"the constant weight-decay style needs start_wd == end_wd, got {self.start_wd}, {self.end_wd}")

    def get_wd(self, param_group: dict | None = None) -> float:
        """Weight decay at the current step (before the group's ``wd_mult``)."""
        group = param_group or {}
        start_wd = group.get("start_wd", self.start_wd)
        end_wd = group.get("end_wd", self.end_wd)
        if self.wd_incr_style == "constant" or self.num_steps > self.wd_incr_steps or self.wd_incr_steps <= 0:
            return end_wd
        ratio = self.num_steps / self.wd_incr_steps
        if self.wd_incr_style == "linear":
            coeff = ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)
        return start_wd + coeff * (end_wd - start_wd)

    def get_lr(self, param_group: dict | None = None) -> float:
        """Learning rate at the current step (a group's ``max_lr`` / ``min_lr`` override the scheduler's)."""
        group = param_group or {}
        max_lr = group.get("max_lr", self.max_lr)
        min_lr = group.get("min_lr", self.min_lr)
        steps = self.num_steps

        if self.lr_warmup_steps > 0 and steps <= self.lr_warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * steps / self.lr_warmup_steps
        if self.lr_decay_style == "constant":
            return max_lr
        if steps > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            lr = max_lr * math.sqrt(max(self.lr_warmup_steps, 1)) / math.sqrt(max(steps, 1))
            return max(min_lr, lr)

        decay_span = self.lr_decay_steps - self.lr_warmup_steps
        # decay_span is 0 only for a run without a decay horizon at step 0: it starts at max_lr.
        ratio = (steps - self.lr_warmup_steps) / decay_span if decay_span > 0 else 0.0
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD: stable at max_lr, then anneal over the last wsd_decay_steps
            assert self.wsd_decay_steps is not None
            anneal_start = self.lr_decay_steps - self.wsd_decay_steps
            if steps <= anneal_start:
                coeff = 1.0
            else:
                wsd_ratio = (steps - anneal_start) / self.wsd_decay_steps
                style = self.lr_wsd_decay_style
                if style == "linear":
                    coeff = 1.0 - wsd_ratio
                elif style == "cosine":
                    coeff = 0.5 * (math.cos(math.pi * wsd_ratio) + 1.0)
                elif style == "exponential":
                    coeff = 2.0 * math.pow(0.5, wsd_ratio) - 1.0
                else:  # minus_sqrt
                    coeff = 1.0 - math.sqrt(wsd_ratio)
        return min_lr + coeff * (max_lr - min_lr)

    def step(self, increment: int) -> None:
        """Advance by ``increment`` steps (iterations or samples) and set ``lr`` / ``weight_decay`` on every group."""
        self.num_steps += int(increment)
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group)
            group["weight_decay"] = self.get_wd(group) * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's settings and position (Megatron's keys), for checkpoints."""
        return {
            "max_lr": self.max_lr,
            "lr_warmup_steps": self.lr_warmup_steps,
            "num_steps": self.num_steps,
            "lr_decay_style": self.lr_decay_style,
            "lr_decay_steps": self.lr_decay_steps,
            "min_lr": self.min_lr,
            "start_wd": self.start_wd,
            "end_wd": self.end_wd,
            "wd_incr_style": self.wd_incr_style,
            "wd_incr_steps": self.wd_incr_steps,
            "init_lr": self.init_lr,
            "wsd_decay_steps": self.wsd_decay_steps,
            "lr_wsd_decay_style": self.lr_wsd_decay_style,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, including Megatron's older key names (``start_lr``, ``warmup_iter``,
        ``end_iter``, ``decay_style``, ``num_iters``, ...). As in Megatron, the checkpoint's settings win over the
        constructor's, so a resumed run follows the schedule it started with."""

        def first(*keys: str) -> Any:
            for key in keys:
                if key in state:
                    return state[key]
            raise KeyError(f"scheduler state has none of the keys {keys}")

        self.max_lr = float(first("max_lr", "start_lr"))
        self.min_lr = float(first("min_lr"))
        self.lr_warmup_steps = int(first("lr_warmup_steps", "warmup_steps", "warmup_iter"))
        self.lr_decay_steps = int(first("lr_decay_steps", "decay_steps", "end_iter"))
        self.lr_decay_style = first("lr_decay_style", "decay_style")
        if "start_wd" in state:
            self.start_wd = float(state["start_wd"])
            self.end_wd = float(state["end_wd"])
            self.wd_incr_steps = int(state["wd_incr_steps"])
            self.wd_incr_style = state["wd_incr_style"]
        if "init_lr" in state:
            self.init_lr = float(state["init_lr"])
        if state.get("wsd_decay_steps") is not None:
            self.wsd_decay_steps = int(state["wsd_decay_steps"])
        if state.get("lr_wsd_decay_style") is not None:
            self.lr_wsd_decay_style = state["lr_wsd_decay_style"]
        self._check()
        self.num_steps = 0
        self.step(int(first("num_steps", "num_iters")))
