"""The GQA-shared Mamba2 variant (``mamba_kv_groups``): x and B stored once per kv group, repeated in forward.

Oracle: the standard mixer whose in_proj rows and conv channels for x and B are those of the shared variant repeated
to every head / C group computes the same function (float64, 1e-10), in a full forward and in decoding."""

from __future__ import annotations

import torch

from megatron.core.inference.generation import greedy_generate
from megatron.core.tensor_parallel.sharding import tp_split_rule

from ..models.helpers import randomize_, tiny_model

SETTINGS = dict(mamba_num_groups=8, mamba_head_dim=8, mamba_state_dim=4)  # 8 heads of 8, C per head


def expand_to_standard(shared: dict[str, torch.Tensor], kv: int, heads: int, head_dim: int, state: int,
                       groups: int) -> dict[str, torch.Tensor]:
    """The shared model's state dict with x and B rows (and conv channels) repeated to the standard layout."""
    out = dict(shared)
    d_inner = heads * head_dim
    for key, value in shared.items():
        if not key.endswith(("in_proj.weight", "conv1d.weight", "conv1d.bias")):
            continue
        if key.endswith("in_proj.weight"):
            z, x, b, c, dt = value.split([d_inner, kv * head_dim, kv * state, groups * state, heads])
        else:
            x, b, c = value.split([kv * head_dim, kv * state, groups * state])
        x = x.unflatten(0, (kv, head_dim)).repeat_interleave(heads // kv, 0).flatten(0, 1)
        b = b.unflatten(0, (kv, state)).repeat_interleave(groups // kv, 0).flatten(0, 1)
        out[key] = torch.cat([z, x, b, c, dt] if key.endswith("in_proj.weight") else [x, b, c])
    return out


def test_shared_x_and_b_equal_the_repeated_standard_mixer():
    torch.manual_seed(0)
    shared = randomize_(tiny_model("M*M", mamba_kv_groups=2, **SETTINGS)).double().eval()
    standard = tiny_model("M*M", **SETTINGS).double().eval()
    standard.load_state_dict(expand_to_standard(shared.state_dict(), 2, 8, 8, 4, 8))
    ids = torch.randint(0, 61, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(shared(ids), standard(ids), rtol=0, atol=1e-10)
    rows = [model.decoder.layers[0].mixer.in_proj.weight.shape[0] for model in (shared, standard)]
    assert rows == [64 + 16 + 8 + 32 + 8, 64 + 64 + 32 + 32 + 8]
    assert torch.equal(greedy_generate(shared, ids[:, :9], 6), greedy_generate(standard, ids[:, :9], 6))


def test_split_rule_follows_the_narrower_components():
    config = tiny_model("M", mamba_kv_groups=2, **SETTINGS).config
    rule = tp_split_rule("decoder.layers.0.mixer.in_proj.weight", config)
    assert rule.parts == (64, 16, 8, 32, 8)
    assert tp_split_rule("decoder.layers.0.mixer.conv1d.weight", config).parts == (16, 8, 32)
