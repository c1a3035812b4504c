"""Oracle parity with Hugging Face ``transformers`` models built offline from tiny random configs.

Float32 logits must agree within 1e-5: both sides compute the same function in a different order (chunked scan vs
HF's own chunking, fused vs separate qkv), so only float32 rounding separates them.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from megatron.core.models.hybrid import HybridModel
from megatron.core.models.hybrid.hf_conversion import MAMBA1_MIXER_TENSORS, llama_from_hf, mamba_from_hf
from megatron.core.transformer import TransformerConfig

from .helpers import randomize_

TOL = 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_pure_mamba2_equals_hf_mamba2(tied):
    hf_config = Mamba2Config(hidden_size=64, num_hidden_layers=3, num_heads=8, head_dim=16, n_groups=2, state_size=16,
                             vocab_size=101, expand=2, chunk_size=16, layer_norm_epsilon=1e-5,
                             tie_word_embeddings=tied)
    hf = randomize_(Mamba2ForCausalLM(hf_config)).eval()
    config = TransformerConfig(num_layers=3, hidden_size=64, mamba_head_dim=16, mamba_num_groups=2,
                               mamba_state_dim=16, mamba_chunk_size=16, normalization="RMSNorm",
                               layernorm_epsilon=1e-5, hidden_dropout=0.0, attention_dropout=0.0)
    ours = HybridModel(config, 101, 128, share_embeddings_and_output_weights=tied).eval()
    ours.load_state_dict(mamba_from_hf(hf.state_dict(), 3))
    tokens = torch.randint(0, 101, (2, 45))  # not a multiple of the chunk
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=TOL, rtol=TOL)


def test_pure_mamba1_equals_hf_mamba():
    hf_config = MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
                            vocab_size=77, time_step_rank=4, layer_norm_epsilon=1e-5, tie_word_embeddings=False)
    hf = randomize_(MambaForCausalLM(hf_config)).eval()
    config = TransformerConfig(num_layers=2, hidden_size=32, mamba_version=1, mamba_state_dim=8, mamba_expand=2,
                               mamba1_dt_rank=4, normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0)
    ours = HybridModel(config, 77, 64).eval()
    ours.load_state_dict(mamba_from_hf(hf.state_dict(), 2, MAMBA1_MIXER_TENSORS))
    tokens = torch.randint(0, 77, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_attention_mlp_stack_equals_hf_llama(kv_heads):
    hf_config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                            rope_theta=500.0, max_position_embeddings=128, tie_word_embeddings=False,
                            attention_bias=False, mlp_bias=False)
    hf = randomize_(LlamaForCausalLM(hf_config)).eval()
    config = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=kv_heads,
                               ffn_hidden_size=96, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                               add_bias_linear=False, normalization="RMSNorm", layernorm_epsilon=1e-5,
                               hidden_dropout=0.0, attention_dropout=0.0)
    ours = HybridModel(config, 97, 128, hybrid_layer_pattern="*-*-", position_embedding_type="rope",
                       rotary_base=500.0).eval()
    ours.load_state_dict(llama_from_hf(hf.state_dict(), 2, kv_heads))
    tokens = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=TOL, rtol=TOL)
