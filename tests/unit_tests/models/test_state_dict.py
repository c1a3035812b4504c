"""State-dict keys are exactly Megatron's; legacy spellings load."""

import pytest
import torch

from .helpers import randomize_, tiny_model


def expected_keys(pattern: str, untied: bool) -> set[str]:
    keys = {"embedding.word_embeddings.weight", "decoder.final_norm.weight"}
    for i, symbol in enumerate(pattern):
        layer = f"decoder.layers.{i}."
        if symbol == "M":
            keys |= {layer + "mixer." + name for name in (
                "in_proj.weight", "in_proj.layer_norm_weight", "conv1d.weight", "conv1d.bias", "A_log", "D",
                "dt_bias", "norm.weight", "out_proj.weight")}
        elif symbol == "*":
            keys |= {layer + "self_attention." + name for name in (
                "linear_qkv.weight", "linear_qkv.layer_norm_weight", "linear_proj.weight")}
        else:
            keys |= {layer + "mlp." + name for name in (
                "linear_fc1.weight", "linear_fc1.layer_norm_weight", "linear_fc2.weight")}
    if untied:
        keys.add("output_layer.weight")
    return keys


@pytest.mark.parametrize("tied", [False, True])
def test_keys_are_megatron_names(tied):
    model = tiny_model("M*-M", share_embeddings_and_output_weights=tied)
    assert set(model.state_dict()) == expected_keys("M*-M", untied=not tied)


def test_layernorm_and_bias_keys():
    model = tiny_model("*-", normalization="LayerNorm", add_bias_linear=True,
                       position_embedding_type="learned_absolute")
    keys = set(model.state_dict())
    assert {"decoder.layers.0.self_attention.linear_qkv.layer_norm_bias",
            "decoder.layers.0.self_attention.linear_qkv.bias", "decoder.layers.1.mlp.linear_fc2.bias",
            "decoder.final_norm.bias", "embedding.position_embeddings.weight"} <= keys


def test_conv_shapes_match_megatron():
    model = tiny_model("M")
    mixer = model.decoder.layers[0].mixer
    channels = 2 * 32 + 2 * 2 * 8  # x (d_inner = 2*hidden) + B + C
    assert mixer.conv1d.weight.shape == (channels, 1, 4)
    assert mixer.in_proj.weight.shape == (2 * 64 + 2 * 2 * 8 + 8, 32)  # z, x, B, C, dt (8 heads of 8)


def test_legacy_key_variants_load():
    source = randomize_(tiny_model("M*-M"))
    state = source.state_dict()
    legacy = {}
    for key, value in state.items():
        if key.endswith("mixer.in_proj.layer_norm_weight"):
            key = key.replace("mixer.in_proj.layer_norm_weight", "norm.weight")  # older Megatron Mamba layers
        elif key.endswith("mixer.conv1d.weight"):
            key, value = key.replace("conv1d.weight", "conv1d_weight"), value.squeeze(1)  # newer Megatron
        elif key.endswith("mixer.conv1d.bias"):
            key = key.replace("conv1d.bias", "conv1d_bias")
        elif key.endswith("self_attention.linear_qkv.layer_norm_weight"):
            key = key.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
        elif key.endswith("mlp.linear_fc1.layer_norm_weight"):
            key = key.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
        legacy[key] = value
    legacy["decoder.layers.1.self_attention.linear_qkv._extra_state"] = torch.tensor([])  # Transformer Engine
    target = tiny_model("M*-M")
    target.load_state_dict(legacy)
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key


def test_unknown_keys_are_reported():
    model = tiny_model("M")
    state = model.state_dict()
    state["decoder.layers.0.mixer.surprise"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="surprise"):
        model.load_state_dict(state)
