"""How every parameter of a hybrid model is split over tensor-parallel ranks, by state-dict key.

One table serves model initialisation (draw the full tensor, keep the shard), checkpoint resharding and gathering.
A tensor made of several components (the Mamba2 ``in_proj`` rows ``[z, x, B, C, dt]``, SwiGLU's ``[gate; up]``) is
split per component: rank r holds ``[z_r | x_r | B_r | C_r | dt_r]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass(frozen=True)
class SplitRule:
    """``dim`` None: replicated on every rank. Otherwise split along ``dim``; ``parts`` are the full sizes of the
    components stacked along it (empty: one component)."""

    dim: int | None
    parts: tuple[int, ...] = ()


REPLICATED = SplitRule(None)
ROWS = SplitRule(0)
COLUMNS = SplitRule(1)

_REPLICATED_SUFFIXES = (
    "layer_norm_weight", "layer_norm_bias", "final_norm.weight", "final_norm.bias", "position_embeddings.weight",
    "linear_proj.bias", "linear_fc2.bias", "out_proj.bias", "_extra_state",
)


class UnknownTensorError(KeyError):
    """A state-dict key no split rule knows."""

    def __str__(self) -> str:
        return str(self.args[0])


def tp_split_rule(key: str, config: TransformerConfig) -> SplitRule:
    """The split of the tensor named ``key`` (a state-dict key, any prefix) for a model of ``config``'s full sizes.

    Accepts the legacy key spellings (``layers.i.norm.weight`` as the Mamba pre-norm, ``mixer.conv1d_weight``).
    Raises :class:`UnknownTensorError` naming the key when it belongs to no known parameter.
    """
    if key.endswith(_REPLICATED_SUFFIXES) or (key.endswith(".norm.weight") and ".mixer." not in key):
        return REPLICATED
    tail = ".".join(key.split(".")[-2:])
    if tail in ("word_embeddings.weight", "output_layer.weight"):
        return ROWS
    if ".mixer." in key:
        return _mamba_rule(key, config)
    if tail in ("linear_qkv.weight", "linear_qkv.bias"):
        return ROWS  # rows are grouped per query group, so a contiguous split keeps whole groups
    if tail == "linear_proj.weight" or tail == "linear_fc2.weight":
        return COLUMNS
    if tail in ("linear_fc1.weight", "linear_fc1.bias"):
        ffn = config.ffn_hidden_size
        return SplitRule(0, (ffn, ffn)) if config.gated_linear_unit else ROWS
    raise UnknownTensorError(f"unknown tensor {key!r}: no tensor-parallel split rule for it")


def _mamba_rule(key: str, config: TransformerConfig) -> SplitRule:
    field = key.rsplit(".mixer.", 1)[1]
    if config.mamba_version == 1:
        d_inner = config.mamba_expand * config.hidden_size
        rules = {
            "in_proj.weight": SplitRule(0, (d_inner, d_inner)), "conv1d.weight": ROWS, "conv1d.bias": ROWS,
            "conv1d_weight": ROWS, "conv1d_bias": ROWS, "x_proj.weight": COLUMNS, "dt_proj.weight": ROWS,
            "dt_proj.bias": ROWS, "A_log": ROWS, "D": ROWS, "out_proj.weight": COLUMNS,
        }
    else:
        xbc = config.mamba_xbc_widths
        conv = SplitRule(0, xbc)
        rules = {
            "in_proj.weight": SplitRule(0, (config.mamba_d_inner, *xbc, config.mamba_nheads)),
            "conv1d.weight": conv, "conv1d.bias": conv, "conv1d_weight": conv, "conv1d_bias": conv,
            "A_log": ROWS, "D": ROWS, "dt_bias": ROWS, "norm.weight": ROWS, "out_proj.weight": COLUMNS,
        }
    if field not in rules:
        raise UnknownTensorError(f"unknown tensor {key!r}: no tensor-parallel split rule for it")
    return rules[field]


def _components(tensor: torch.Tensor, rule: SplitRule) -> list[torch.Tensor]:
    if not rule.parts:
        return [tensor]
    if sum(rule.parts) != tensor.shape[rule.dim]:
        raise ValueError(f"tensor of shape {tuple(tensor.shape)} does not hold components {rule.parts} along "
                         f"dim {rule.dim}")
    return list(tensor.split(list(rule.parts), dim=rule.dim))


def shard_tensor(full: torch.Tensor, rule: SplitRule, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s shard (of ``size``) of the full tensor: each component split evenly along ``rule.dim``."""
    if rule.dim is None or size == 1:
        return full.clone()
    shards = []
    for component in _components(full, rule):
        if component.shape[rule.dim] % size:
            raise ValueError(f"a component of size {component.shape[rule.dim]} does not split over {size} ranks")
        shards.append(component.chunk(size, dim=rule.dim)[rank])
    return torch.cat(shards, dim=rule.dim).clone()


def merge_shards(shards: list[torch.Tensor], rule: SplitRule) -> torch.Tensor:
    """The full tensor from every rank's shard, in rank order (the inverse of :func:`shard_tensor`)."""
    if rule.dim is None or len(shards) == 1:
        return shards[0].clone()
    size = len(shards)
    local_parts = tuple(part // size for part in rule.parts)
    per_rank = [_components(shard, SplitRule(rule.dim, local_parts)) for shard in shards]
    components = [torch.cat([ranks[i] for ranks in per_rank], dim=rule.dim) for i in range(len(per_rank[0]))]
    return torch.cat(components, dim=rule.dim)
