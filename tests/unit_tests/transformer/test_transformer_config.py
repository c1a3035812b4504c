import pytest
import torch

from megatron.core.models.hybrid import HybridModel
from megatron.core.transformer import TransformerConfig


def test_defaults_are_megatrons():
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    assert (config.kv_channels, config.num_query_groups, config.ffn_hidden_size) == (16, 4, 256)
    assert (config.normalization, config.layernorm_epsilon, config.add_bias_linear) == ("LayerNorm", 1e-5, True)
    assert (config.mamba_state_dim, config.mamba_head_dim, config.mamba_num_groups) == (128, 64, 8)
    assert (config.mamba_d_conv, config.mamba_chunk_size, config.mamba_d_inner) == (4, 128, 128)
    assert config.init_method_std == 0.02 and config.params_dtype == torch.float32


def test_mamba_num_heads_sets_inner_width():
    config = TransformerConfig(hidden_size=256, mamba_num_heads=24, mamba_head_dim=32)
    assert (config.mamba_d_inner, config.mamba_nheads) == (768, 24)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(hidden_size=0), "hidden_size must be positive"),
        (dict(hidden_size=64, num_attention_heads=5), "hidden_size 64 is not divisible by num_attention_heads 5"),
        (dict(hidden_size=64, num_attention_heads=4, num_query_groups=3), "not divisible by num_query_groups 3"),
        (dict(hidden_size=64, normalization="BatchNorm"), "normalization must be one of"),
        (dict(hidden_size=64, hidden_dropout=1.0), r"hidden_dropout must be in \[0, 1\)"),
        (dict(hidden_size=64, mamba_version=3), "mamba_version must be 1 or 2"),
        (dict(hidden_size=64, mamba_dt_min=0.5, mamba_dt_max=0.1), "mamba_dt_min <= mamba_dt_max"),
        (dict(hidden_size=64, mamba_state_dim=0), "mamba_state_dim must be positive"),
    ],
)
def test_invalid_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**kwargs)


def test_mamba_shape_checks_apply_only_to_models_with_mamba_layers():
    config = TransformerConfig(hidden_size=64, num_attention_heads=4, mamba_head_dim=48)
    HybridModel(config, 10, 8, hybrid_layer_pattern="*-")  # no Mamba layer: fine
    with pytest.raises(ValueError, match="inner width 128 is not divisible by mamba_head_dim 48"):
        HybridModel(TransformerConfig(hidden_size=64, mamba_head_dim=48), 10, 8, hybrid_layer_pattern="M")
    with pytest.raises(ValueError, match="head count 2 is not divisible by mamba_num_groups 8"):
        HybridModel(TransformerConfig(hidden_size=64), 10, 8, hybrid_layer_pattern="M")


def test_model_argument_errors():
    config = TransformerConfig(hidden_size=64, mamba_num_groups=2)
    with pytest.raises(ValueError, match="num_attention_heads is 0"):
        HybridModel(config, 10, 8, hybrid_layer_pattern="M*")
    with pytest.raises(ValueError, match="position_embedding_type must be one of"):
        HybridModel(config, 10, 8, hybrid_layer_pattern="M", position_embedding_type="alibi")
    with pytest.raises(ValueError, match="num_layers is required"):
        HybridModel(config, 10, 8)
