"""Initialise a Mamba mixer from an attention layer's weights ("Mamba in the Llama").

Mamba2 (DESIGN.md): with ``nheads = n_heads``, ``headdim = d_state = head_dim`` and C per head
(``mamba_num_groups = n_heads``), x and B per key/value head (``mamba_kv_groups = n_kv_heads``, repeated to all heads
as GQA repeats keys and values):

    in_proj rows  [z | x | B | C | dt]  =  [fresh | v_proj | k_proj | q_proj | fresh]
    out_proj      = o_proj;   in_proj.layer_norm_weight = the layer's input norm
    conv1d, dt_bias, A_log, D: fresh (the Mamba initialisation)

Mamba1 computes B and C from x (through ``x_proj``), so only ``v_proj`` (x rows, repeated per head) and ``o_proj``
carry over; q/k are reported unused.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron.core.ssm.mamba1_mixer import Mamba1Mixer
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.transformer.transformer_config import TransformerConfig

# Where each mixer tensor comes from: a source name ("q_proj", ...), or "fresh".
MAMBA2_SOURCES = {
    "in_proj.weight": "z, dt rows fresh; x <- v_proj, B <- k_proj, C <- q_proj",
    "in_proj.layer_norm_weight": "input_layernorm", "out_proj.weight": "o_proj", "conv1d.weight": "fresh",
    "conv1d.bias": "fresh", "dt_bias": "fresh", "A_log": "fresh", "D": "fresh", "norm.weight": "fresh",
}
MAMBA1_SOURCES = {
    "in_proj.weight": "x <- v_proj repeated per head, z rows fresh", "in_proj.layer_norm_weight": "input_layernorm",
    "out_proj.weight": "o_proj", "conv1d.weight": "fresh", "conv1d.bias": "fresh", "x_proj.weight": "fresh",
    "dt_proj.weight": "fresh", "dt_proj.bias": "fresh", "A_log": "fresh", "D": "fresh",
}


def mamba_config_for_attention(config: TransformerConfig, num_heads: int, num_kv_heads: int, head_dim: int,
                               mamba_version: int = 2) -> TransformerConfig:
    """``config`` with the Mamba sizes an attention layer of these head counts converts into."""
    if mamba_version == 1:
        return dataclasses.replace(config, mamba_version=1, mamba_expand=num_heads * head_dim // config.hidden_size)
    return dataclasses.replace(config, mamba_version=2, mamba_num_heads=num_heads, mamba_head_dim=head_dim,
                               mamba_state_dim=head_dim, mamba_num_groups=num_heads, mamba_kv_groups=num_kv_heads)


def mamba_from_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                         input_norm: torch.Tensor, config: TransformerConfig, head_dim: int,
                         seed: int) -> dict[str, torch.Tensor]:
    """Mixer tensors (keys relative to ``mixer.``) for one attention layer: q ``(heads*d, hidden)``, k and v
    ``(kv_heads*d, hidden)``, o ``(hidden, heads*d)``, the input norm weight ``(hidden,)``, ``d = head_dim``.
    ``config`` comes from :func:`mamba_config_for_attention`; the fresh tensors are drawn from ``seed``.
    Raises ``ValueError`` when a projection does not fit the mixer's shapes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = (Mamba1Mixer if config.mamba_version == 1 else MambaMixer)(config, layer_number=1)
    out = {name: tensor.detach().clone() for name, tensor in fresh.state_dict().items()}
    out["in_proj.layer_norm_weight"] = input_norm.clone()
    _check_shape("o_proj", o, out["out_proj.weight"].shape)
    out["out_proj.weight"] = o.clone()
    in_proj = out["in_proj.weight"]
    if config.mamba_version == 1:
        x_rows = in_proj[: in_proj.shape[0] // 2]
        repeated = v.unflatten(0, (-1, head_dim)).repeat_interleave(q.shape[0] // v.shape[0], 0).flatten(0, 1)
        _check_shape("v_proj repeated per head", repeated, x_rows.shape)
        x_rows.copy_(repeated)
        return out
    x_width, b_width, c_width = config.mamba_xbc_widths
    blocks = in_proj.split([config.mamba_d_inner, x_width, b_width, c_width, config.mamba_nheads])
    for name, block, source in zip(("v_proj", "k_proj", "q_proj"), blocks[1:4], (v, k, q), strict=True):
        _check_shape(name, source, block.shape)
        block.copy_(source)
    return out


def _check_shape(name: str, tensor: torch.Tensor, expected: torch.Size) -> None:
    if tensor.shape != expected:
        raise ValueError(f"{name} of shape {tuple(tensor.shape)} does not fit the Mamba mixer's {tuple(expected)}")
