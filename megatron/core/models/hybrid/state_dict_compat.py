"""Older and alternative spellings of hybrid-model state-dict keys, renamed to the current Megatron names on load."""

from __future__ import annotations

import re

import torch

_LAYER_NORM = re.compile(r"^(?P<prefix>.*decoder\.layers\.\d+\.)(?:norm|input_layernorm|pre_mlp_layernorm)\."
                         r"(?P<kind>weight|bias)$")
_FUSED_NORM_HOST = {"mixer": "mixer.in_proj", "self_attention": "self_attention.linear_qkv",
                    "mlp": "mlp.linear_fc1"}


def upgrade_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Rename legacy keys under ``prefix`` in place.

    * ``decoder.layers.i.norm.*`` (older Megatron Mamba layers), ``input_layernorm.*`` / ``pre_mlp_layernorm.*``
      (unfused local specs) -> the layer's fused ``*.layer_norm_weight`` / ``*.layer_norm_bias``;
    * ``mixer.conv1d_weight`` / ``mixer.conv1d_bias`` (newer Megatron) -> ``mixer.conv1d.weight`` / ``.bias``
      (a 2-D conv weight gains its middle axis);
    * Transformer Engine's ``*._extra_state`` entries are dropped.
    """
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key.endswith("._extra_state"):
            del state_dict[key]
            continue
        if key.endswith(("mixer.conv1d_weight", "mixer.conv1d_bias")):
            tensor = state_dict.pop(key)
            if key.endswith("weight") and tensor.dim() == 2:
                tensor = tensor.unsqueeze(1)
            state_dict[key.replace("conv1d_", "conv1d.")] = tensor
            continue
        match = _LAYER_NORM.match(key)
        if match is None:
            continue
        layer_prefix = match["prefix"]
        host = next((h for owner, h in _FUSED_NORM_HOST.items()
                     if any(k.startswith(f"{layer_prefix}{owner}.") for k in state_dict)), None)
        if host is None:
            raise KeyError(f"cannot tell which sublayer the legacy norm {key!r} belongs to")
        state_dict[f"{layer_prefix}{host}.layer_norm_{match['kind']}"] = state_dict.pop(key)
