"""Parameter counts of Megatron's 800M and 8B hybrid example configurations, built on the meta device, against the
count derived here by hand from the layer shapes."""

import pytest
import torch

from megatron.core.models.hybrid import HybridModel, pattern_from_ratios
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_config import squared_relu

VOCAB = 256000  # the SentencePiece vocabulary of the released Megatron hybrids (already a multiple of 128)


def analytic_count(pattern: str, hidden: int, heads: int, groups: int, vocab: int) -> int:
    head_dim, ffn = hidden // heads, 4 * hidden
    d_inner, headdim, ngroups, d_state, d_conv = 2 * hidden, 64, 8, 128, 4
    nheads = d_inner // headdim
    conv_channels = d_inner + 2 * ngroups * d_state
    mamba = (hidden  # fused pre-norm
             + hidden * (2 * d_inner + 2 * ngroups * d_state + nheads)  # in_proj: z, x, B, C, dt
             + conv_channels * d_conv + conv_channels  # depthwise conv weight and bias
             + 3 * nheads  # A_log, D, dt_bias
             + d_inner  # gated norm
             + d_inner * hidden)  # out_proj
    attention = hidden + hidden * (heads + 2 * groups) * head_dim + heads * head_dim * hidden
    mlp = hidden + hidden * ffn + ffn * hidden
    per_symbol = {"M": mamba, "*": attention, "-": mlp}
    layers = sum(per_symbol[symbol] for symbol in pattern)
    return layers + hidden + 2 * vocab * hidden  # final norm, untied embedding and output layer


@pytest.mark.parametrize(("num_layers", "hidden", "heads"), [(48, 1024, 16), (56, 4096, 32)])
def test_megatron_example_configs(num_layers, hidden, heads):
    config = TransformerConfig(num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads,
                               num_query_groups=8, normalization="RMSNorm", add_bias_linear=False,
                               activation_func=squared_relu, hidden_dropout=0.0, attention_dropout=0.0)
    with torch.device("meta"):
        model = HybridModel(config, VOCAB, 4096, hybrid_attention_ratio=0.08, hybrid_mlp_ratio=0.5)
    pattern = pattern_from_ratios(num_layers, 0.08, 0.5)
    assert model.hybrid_pattern == pattern
    total = sum(p.numel() for p in model.parameters())
    assert total == analytic_count(pattern, hidden, heads, 8, VOCAB)
    non_embedding = total - 2 * VOCAB * hidden
    expected_scale = {1024: (0.3e9, 0.5e9), 4096: (6.0e9, 8.0e9)}[hidden]  # ~0.4B and ~7B without embeddings
    assert expected_scale[0] < non_embedding < expected_scale[1]
