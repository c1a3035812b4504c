"""Attention -> Mamba initialisation puts v/k/q/o exactly where DESIGN.md says, tensor by tensor."""

from __future__ import annotations

import torch

from megatron.core.models.hybrid.attention_to_mamba import mamba_config_for_attention, mamba_from_attention
from megatron.core.ssm.mamba1_mixer import Mamba1Mixer
from megatron.core.ssm.mamba_mixer import MambaMixer

from .helpers import tiny_config

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 8, 32


def projections() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    q, k = torch.randn(HEADS * HEAD_DIM, HIDDEN), torch.randn(KV_HEADS * HEAD_DIM, HIDDEN)
    v = torch.randn(KV_HEADS * HEAD_DIM, HIDDEN)
    return q, k, v, torch.randn(HIDDEN, HEADS * HEAD_DIM), torch.rand(HIDDEN)


def test_mamba2_rows_come_from_v_k_q_and_out_proj_from_o():
    q, k, v, o, norm = projections()
    config = mamba_config_for_attention(tiny_config(), HEADS, KV_HEADS, HEAD_DIM)
    tensors = mamba_from_attention(q, k, v, o, norm, config, HEAD_DIM, seed=3)
    _z, x, b, c, _dt = tensors["in_proj.weight"].split([32, 16, 16, 32, HEADS])
    assert torch.equal(x, v) and torch.equal(b, k) and torch.equal(c, q)
    assert torch.equal(tensors["out_proj.weight"], o) and torch.equal(tensors["in_proj.layer_norm_weight"], norm)
    mixer = MambaMixer(config, 1)
    mixer.load_state_dict(tensors)  # every tensor fits the GQA-shared mixer
    again = mamba_from_attention(q, k, v, o, norm, config, HEAD_DIM, seed=3)
    assert all(torch.equal(again[name], tensors[name]) for name in tensors)  # fresh parts are seeded
    other = mamba_from_attention(q, k, v, o, norm, config, HEAD_DIM, seed=4)
    assert not torch.equal(other["dt_bias"], tensors["dt_bias"])
    assert torch.equal(other["in_proj.weight"][32:96], torch.cat([x, b, c]))


def test_mamba1_takes_v_repeated_per_head_and_o():
    q, k, v, o, norm = projections()
    config = mamba_config_for_attention(tiny_config(), HEADS, KV_HEADS, HEAD_DIM, mamba_version=1)
    tensors = mamba_from_attention(q, k, v, o, norm, config, HEAD_DIM, seed=3)
    x = tensors["in_proj.weight"][:32].unflatten(0, (HEADS, HEAD_DIM))
    for head in range(HEADS):  # head h reads key/value head h // (heads / kv_heads)
        assert torch.equal(x[head], v.unflatten(0, (KV_HEADS, HEAD_DIM))[head // 2])
    Mamba1Mixer(config, 1).load_state_dict(tensors)
