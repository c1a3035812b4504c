"""get_param_groups / get_megatron_optimizer: which parameters are decayed, and that AdamW honours it."""

import pytest
import torch

from megatron.core.optimizer import get_megatron_optimizer, get_param_groups
from tests.unit_tests.models.helpers import tiny_model

NO_DECAY_SUFFIXES = ("dt_bias", "A_log", ".D", "conv1d.bias", "layer_norm_weight", "layer_norm_bias", "norm.weight",
                     "final_norm.weight", "final_norm.bias", ".bias")


def expected_no_decay(name: str) -> bool:
    return name.endswith(NO_DECAY_SUFFIXES)


def model_with_biases() -> torch.nn.Module:
    return tiny_model("M*-M", normalization="LayerNorm", add_bias_linear=True)


def groups_by_name(model: torch.nn.Module) -> dict[str, float]:
    ids = {id(p): name for name, p in model.named_parameters()}
    result: dict[str, float] = {}
    for group in get_param_groups(model):
        for param in group["params"]:
            name = ids[id(param)]
            assert name not in result, f"{name} is in two groups"
            result[name] = group["wd_mult"]
    return result


@pytest.mark.parametrize("make", [lambda: tiny_model("M*-M"), model_with_biases])
def test_each_parameter_in_its_group(make):
    model = make()
    groups = get_param_groups(model)
    assert [g["wd_mult"] for g in groups] == [1.0, 0.0]
    by_name = groups_by_name(model)
    assert set(by_name) == {name for name, _ in model.named_parameters()}
    for name, wd_mult in by_name.items():
        assert wd_mult == (0.0 if expected_no_decay(name) else 1.0), name
    # the classes that matter, spelled out
    for name in ("decoder.layers.0.mixer.dt_bias", "decoder.layers.0.mixer.A_log", "decoder.layers.0.mixer.D",
                 "decoder.layers.0.mixer.norm.weight", "decoder.layers.0.mixer.in_proj.layer_norm_weight",
                 "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", "decoder.final_norm.weight"):
        assert by_name[name] == 0.0, name
    for name in ("embedding.word_embeddings.weight", "decoder.layers.0.mixer.in_proj.weight",
                 "decoder.layers.0.mixer.conv1d.weight", "decoder.layers.1.self_attention.linear_qkv.weight",
                 "decoder.layers.2.mlp.linear_fc1.weight", "decoder.layers.3.mixer.out_proj.weight"):
        assert by_name[name] == 1.0, name


def test_marked_parameters_and_frozen_parameters():
    model = torch.nn.Module()
    model.matrix = torch.nn.Parameter(torch.ones(3, 3))
    model.marked = torch.nn.Parameter(torch.ones(3, 3))
    model.marked._no_weight_decay = True
    model.frozen = torch.nn.Parameter(torch.ones(3, 3), requires_grad=False)
    decay, no_decay = get_param_groups(model)
    assert decay["params"] == [model.matrix] and no_decay["params"] == [model.marked]


def test_tied_embedding_appears_once():
    model = tiny_model("M-", share_embeddings_and_output_weights=True)
    params = [p for g in get_param_groups(model) for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))


def test_optimizer_settings():
    model = tiny_model("M*")
    optimizer = get_megatron_optimizer(model, lr=3e-4, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95,
                                       adam_eps=1e-6)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert (decay["lr"], decay["betas"], decay["eps"]) == (3e-4, (0.8, 0.95), 1e-6)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert not decay["fused"]  # CPU parameters: the default implementation


def test_weight_decay_only_shrinks_decayed_parameters():
    torch.manual_seed(0)
    model = model_with_biases()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # every parameter away from zero, so decay would show everywhere
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = get_megatron_optimizer(model, lr=0.1, weight_decay=0.5)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)  # Adam's step is 0: only decoupled weight decay moves a parameter
    optimizer.step()
    for name, param in model.named_parameters():
        if expected_no_decay(name):
            assert torch.equal(param, before[name]), name
        else:
            assert torch.allclose(param, before[name] * (1 - 0.1 * 0.5)), name


def test_rejects_bad_settings():
    model = tiny_model("M")
    with pytest.raises(ValueError, match="adam_beta2"):
        get_megatron_optimizer(model, lr=1e-3, weight_decay=0.0, adam_beta2=1.0)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        get_megatron_optimizer(frozen, lr=1e-3, weight_decay=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_on_cuda():
    model = tiny_model("M*").cuda()
    assert get_megatron_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups[0]["fused"]
