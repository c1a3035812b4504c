"""Megatron's optimizer builder: AdamW over two parameter groups, with and without weight decay.

Weight decay is not applied to biases, norm weights and biases (every 1-D parameter), nor to parameters marked
``_no_weight_decay = True`` (the Mamba mixers mark ``dt_bias``, ``A_log`` and ``D``). Torch's fused AdamW is used when
every parameter lives on a CUDA device; otherwise the default (foreach / for-loop) implementation. The distributed
optimizer (ZeRO-1) is torch's ``ZeroRedundancyOptimizer`` over the data-parallel group: each replica keeps the AdamW
state of its share of the parameters and broadcasts its updated parameters after the step.
"""

from __future__ import annotations

import torch

from megatron.core import parallel_state

__all__ = [
    "NO_DECAY_SUFFIXES", "get_megatron_optimizer", "get_param_groups", "is_no_weight_decay", "optimizer_state_dict",
]

# Norm parameters by name, for norms whose weights might not be 1-D in some layout (they are 1-D in ours).
NO_DECAY_SUFFIXES = ("bias", "layer_norm_weight", "layer_norm_bias", "norm.weight", "norm.bias")


def is_no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Whether parameter ``name`` is excluded from weight decay (bias, norm, 1-D, or marked ``_no_weight_decay``)."""
    if getattr(param, "_no_weight_decay", False):
        return True
    if param.ndim <= 1:
        return True
    if name.endswith(NO_DECAY_SUFFIXES):
        return True
    return name.startswith("final_norm.") or ".final_norm." in name


def get_param_groups(model: torch.nn.Module | list[torch.nn.Module]) -> list[dict]:
    """The trainable parameters of ``model`` in two groups: ``{"params": [...], "param_names": [...],
    "wd_mult": 1.0}`` (decayed) and the same with ``"wd_mult": 0.0`` (not decayed), in ``named_parameters`` order.
    Frozen parameters are left out; shared parameters appear once. Either group may be empty.

    A list of modules (the model chunks of an interleaved pipeline rank) names parameters ``model{i}.<name>``. The
    names travel in the optimizer's state dict, which lets the resharding tool match optimizer state to tensors."""
    chunks = model if isinstance(model, list) else [model]
    groups = [{"params": [], "param_names": [], "wd_mult": 1.0}, {"params": [], "param_names": [], "wd_mult": 0.0}]
    for index, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            group = groups[1] if is_no_weight_decay(name, param) else groups[0]
            group["params"].append(param)
            group["param_names"].append(f"model{index}.{name}" if len(chunks) > 1 else name)
    return groups


def get_megatron_optimizer(
    model: torch.nn.Module | list[torch.nn.Module],
    lr: float,
    weight_decay: float,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_eps: float = 1e-8,
    use_distributed_optimizer: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over :func:`get_param_groups` of ``model`` (``--lr``, ``--weight-decay``, ``--adam-beta1/2``,
    ``--adam-eps``). Each group's ``weight_decay`` is ``weight_decay * wd_mult``; an
    :class:`~megatron.core.optimizer_param_scheduler.OptimizerParamScheduler` keeps it so at every step. With
    ``use_distributed_optimizer`` and more than one data-parallel replica the state is sharded (ZeRO-1); its
    :func:`optimizer_state_dict` is the same gathered AdamW state dict, so checkpoints load at any replica count.

    Raises ``ValueError`` when the model has no trainable parameter or a hyper-parameter is out of range.
    """
    if lr < 0.0:
        raise ValueError(f"learning rate must be >= 0, got {lr}")
    if weight_decay < 0.0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
    for name, beta in (("adam_beta1", adam_beta1), ("adam_beta2", adam_beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    if adam_eps <= 0.0:
        raise ValueError(f"adam_eps must be positive, got {adam_eps}")
    groups = get_param_groups(model)
    params = [p for group in groups for p in group["params"]]
    if not params:
        raise ValueError("the model has no trainable parameters")
    for group in groups:
        group["weight_decay"] = weight_decay * group["wd_mult"]
    fused = all(p.is_cuda and p.is_floating_point() for p in params)
    if use_distributed_optimizer and parallel_state.get_data_parallel_world_size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer  # imported here: it costs ~2 s of start-up

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW,
                                       process_group=parallel_state.get_data_parallel_group(), lr=lr,
                                       betas=(adam_beta1, adam_beta2), eps=adam_eps, weight_decay=weight_decay,
                                       fused=True if fused else None)
    return torch.optim.AdamW(groups, lr=lr, betas=(adam_beta1, adam_beta2), eps=adam_eps,
                             weight_decay=weight_decay, fused=True if fused else None)


def optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer's full AdamW state dict. For the sharded (ZeRO) optimizer every data-parallel rank must call
    this (it gathers the shards); data-parallel rank 0 receives the state, the others get None."""
    if not hasattr(optimizer, "consolidate_state_dict"):  # a plain optimizer, not torch's ZeroRedundancyOptimizer
        return optimizer.state_dict()
    optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if parallel_state.get_data_parallel_rank() == 0 else None
