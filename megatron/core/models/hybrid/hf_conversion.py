"""State-dict mappings between Hugging Face causal LMs and our hybrid model (Megatron key names).

Each function takes a Hugging Face ``state_dict()`` and returns one our :class:`HybridModel` loads, with the matching
:class:`TransformerConfig` built by the caller. Tensors are not copied.
"""

from __future__ import annotations

import torch

StateDict = dict[str, torch.Tensor]


MAMBA2_MIXER_TENSORS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                         "out_proj.weight")
MAMBA1_MIXER_TENSORS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                        "dt_proj.bias", "A_log", "D", "out_proj.weight")


def mamba_from_hf(hf: StateDict, num_layers: int, mixer_tensors: tuple[str, ...] = MAMBA2_MIXER_TENSORS) -> StateDict:
    """``Mamba2ForCausalLM`` (or, with ``MAMBA1_MIXER_TENSORS``, Mamba1's ``MambaForCausalLM``) -> a pure-``M``
    hybrid. The HF per-layer ``norm`` is our fused ``in_proj`` pre-norm; every mixer tensor keeps its name and
    layout. ``output_layer.weight`` is omitted when HF ties it."""
    out = {
        "embedding.word_embeddings.weight": hf["backbone.embeddings.weight"],
        "decoder.final_norm.weight": hf["backbone.norm_f.weight"],
    }
    for i in range(num_layers):
        src, dst = f"backbone.layers.{i}.", f"decoder.layers.{i}.mixer."
        out[dst + "in_proj.layer_norm_weight"] = hf[src + "norm.weight"]
        for name in mixer_tensors:
            out[dst + name] = hf[src + "mixer." + name]
    _copy_untied_head(hf, out)
    return out


def grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """Stack separate q ``(heads*d, hidden)``, k and v ``(groups*d, hidden)`` projections into Megatron's
    ``linear_qkv`` layout: per query group, its query heads, then its key head, then its value head."""
    hidden = q.shape[-1]
    q = q.reshape(num_query_groups, -1, hidden)
    k = k.reshape(num_query_groups, -1, hidden)
    v = v.reshape(num_query_groups, -1, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def llama_from_hf(hf: StateDict, num_layers: int, num_query_groups: int) -> StateDict:
    """``LlamaForCausalLM`` -> a ``*-`` per Llama layer hybrid (RoPE, SwiGLU, RMSNorm): Llama layer i becomes
    attention layer 2i and MLP layer 2i + 1."""
    out = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_norm.weight": hf["model.norm.weight"],
    }
    for i in range(num_layers):
        src = f"model.layers.{i}."
        attn, mlp = f"decoder.layers.{2 * i}.self_attention.", f"decoder.layers.{2 * i + 1}.mlp."
        out[attn + "linear_qkv.weight"] = grouped_qkv(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
            hf[src + "self_attn.v_proj.weight"], num_query_groups,
        )
        out[attn + "linear_qkv.layer_norm_weight"] = hf[src + "input_layernorm.weight"]
        out[attn + "linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        out[mlp + "linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0)
        out[mlp + "linear_fc1.layer_norm_weight"] = hf[src + "post_attention_layernorm.weight"]
        out[mlp + "linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
    _copy_untied_head(hf, out)
    return out


def _copy_untied_head(hf: StateDict, out: StateDict) -> None:
    head = hf.get("lm_head.weight")
    embedding = out["embedding.word_embeddings.weight"]
    if head is not None and head.data_ptr() != embedding.data_ptr():
        out["output_layer.weight"] = head
