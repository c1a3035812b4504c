"""Export a checkpoint of ours (any tensor / pipeline layout) to a Hugging Face folder that
``AutoModelForCausalLM.from_pretrained`` loads offline.

The checkpoint is gathered to full-size tensors with :func:`~megatron.training.checkpoint_reshard.gather_checkpoint`,
its model is described from the saved args and the tensors themselves (:class:`ModelFacts`), and one of three
``transformers`` formats is written:

* ``llama`` (``LlamaForCausalLM``): an all-attention model whose pattern is ``*-`` pairs, RMSNorm, SwiGLU, RoPE over
  whole heads (Llama 3.1 frequency scaling kept). Attention / MLP biases are written as Llama's ``attention_bias`` /
  ``mlp_bias`` (a missing half, e.g. the output projection under ``--add-qkv-bias``, becomes zeros).
* ``nemotron_h`` (``NemotronHForCausalLM``): any hybrid of Mamba2 ``M``, attention ``*`` and ungated MLP ``-``
  layers (squared ReLU -> ``relu2``, GELU -> ``gelu``), RMSNorm, attention without position embeddings and without
  biases. The output layer is always written (``lm_head``; the format does not tie it).
* ``mamba2`` (``Mamba2ForCausalLM``): a pure-Mamba2 model whose inner width is an integer multiple of the hidden size.

``auto`` picks ``mamba2`` for a pure ``M`` pattern, ``llama`` for ``*-`` pairs and ``nemotron_h`` otherwise (falling
back to ``nemotron_h`` where the first choice cannot hold the model). Whatever a format cannot hold is refused with
an :class:`ExportError` naming it; nothing is approximated silently. Mamba2 layers of the GQA-shared variant
(``mamba_kv_groups``) are written in the standard layout, their shared x / B rows and conv channels repeated to
every head / group, which computes the same function.

Numerics: the three formats compute what our model computes (only float rounding differs), given two deliberate
settings: NemotronH clamps ``dt`` from below at ``time_step_min``, so that is written as
:data:`NEMOTRON_H_TIME_STEP_MIN` (ours does not clamp; it only affects a fresh initialisation there), and every
format normalises the Mamba gated norm with the model's ``layer_norm_epsilon`` while ours uses 1e-5 (as Megatron
does): a model whose ``--norm-epsilon`` differs gets a warning line.

The vocabulary is cut to the true size (the padded rows are never produced by the tokenizer), so the Hugging Face
logits equal ours on the true vocabulary. The folder receives ``config.json``, ``model.safetensors`` (or shards with
an index), ``generation_config.json`` when the end-of-sequence id is known, and the tokenizer files named by the
saved ``--tokenizer-model``; it is written into a temporary sibling and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megatron.core.models.hybrid.hybrid_layer_allocation import ATTENTION, MAMBA, MLP, strip_stage_boundaries
from megatron.core.transformer.transformer_config import squared_relu
from megatron.training.checkpoint_reshard import FullCheckpoint, gather_checkpoint
from megatron.training.staging import staged_directory

__all__ = [
    "DTYPES", "NEMOTRON_H_TIME_STEP_MIN", "TARGETS", "ExportError", "ExportResult", "ModelFacts", "build_export",
    "choose_target", "copy_tokenizer", "expand_shared_mamba", "export_checkpoint", "model_facts", "refusals",
    "split_grouped_qkv", "tokenizer_ids", "write_safetensors",
]

TARGETS = ("auto", "llama", "nemotron_h", "mamba2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "nemotron_h": "NemotronHForCausalLM", "mamba2": "Mamba2ForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# NemotronH clamps dt = softplus(dt_raw + dt_bias) from below at ``time_step_min`` (ours and Mamba2 do not clamp):
# the smallest normal float32, so that only values below float32's normal range are touched. (0 would also do for the
# forward pass but breaks NemotronH's fresh initialisation, which takes its logarithm.)
NEMOTRON_H_TIME_STEP_MIN = float(torch.finfo(torch.float32).tiny)
NEMOTRON_H_MLP_ACTIVATIONS = ("relu2", "gelu")  # ours (squared_relu, F.gelu) -> the same names in transformers' ACT2FN
GATED_NORM_EPS = 1e-5  # our (and Megatron's) Mamba gated RMSNorm epsilon, whatever --norm-epsilon is
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Tokenizer files copied from a --tokenizer-model folder (file names, or suffixes starting with '.').
_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
                    "chat_template.json", "spiece.model")
_TOKENIZER_SUFFIXES = (".model", ".tiktoken")


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked (one-line message)."""


@dataclass(frozen=True)
class ModelFacts:
    """What the checkpoint's model computes, from its saved args checked against its tensors."""

    pattern: str  # layer symbols, no '|'
    hidden: int
    normalization: str
    eps: float
    position: str  # none | rope | learned_absolute
    rotary_base: float
    rotary_percent: float
    rope_scaling: dict[str, Any] | None
    tied: bool
    heads: int
    groups: int
    head_dim: int
    ffn: int
    mlp: str  # swiglu | relu2 | gelu | gated-<name> | <name>
    mamba_version: int
    mamba_heads: int
    mamba_head_dim: int
    mamba_groups: int
    mamba_state: int
    mamba_d_inner: int
    mamba_kv_groups: int | None
    d_conv: int
    chunk_size: int
    biases: frozenset[str]  # sublayer tensors with a bias: linear_qkv, linear_proj, linear_fc1, linear_fc2
    true_vocab: int
    padded_vocab: int
    max_positions: int | None
    extra_refusals: tuple[str, ...] = ()  # settings no target can hold


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote."""

    target: str
    architecture: str
    save_dir: Path
    parameters: int
    true_vocab: int
    padded_vocab: int
    dtype: str
    files: list[str]
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        """A one-line description."""
        return (f"exported {self.architecture} ({self.target}, {self.parameters:,} parameters, {self.dtype}, "
                f"vocabulary {self.true_vocab} of {self.padded_vocab} padded rows) to {self.save_dir}: "
                f"{', '.join(self.files)}")


# ------------------------------------------------------------------------------------------------------ model facts

def _activation_name(config: Any) -> str:
    act = config.activation_func
    name = {F.silu: "silu", squared_relu: "relu2", F.gelu: "gelu"}.get(act, getattr(act, "__name__", repr(act)))
    if config.gated_linear_unit:
        return "swiglu" if name == "silu" else f"gated-{name}"
    return name


def _rope_scaling(args: argparse.Namespace) -> dict[str, Any] | None:
    if not getattr(args, "use_rope_scaling", False):
        return None
    return {"rope_type": "llama3", "factor": float(args.rope_scaling_factor),
            "low_freq_factor": float(args.rope_scaling_low_freq_factor),
            "high_freq_factor": float(args.rope_scaling_high_freq_factor),
            "original_max_position_embeddings": int(args.rope_scaling_original_max_position_embeddings)}


def model_facts(full: FullCheckpoint) -> tuple[ModelFacts, list[str]]:
    """The model a gathered checkpoint holds, and warning lines about what the saved args leave unsaid."""
    args, config, tensors = full.args, full.config, full.tensors
    warnings: list[str] = []
    pattern = strip_stage_boundaries(full.layout.pattern)
    has_position_table = "embedding.position_embeddings.weight" in tensors
    position = getattr(args, "position_embedding_type", None)
    if position is None:
        position = "learned_absolute" if has_position_table else "none"
        warnings.append(f"the checkpoint's args do not say the position embedding type: taken as {position!r}")
    elif (position == "learned_absolute") != has_position_table:
        raise ExportError(f"the checkpoint's args say position embeddings {position!r} but it "
                          f"{'holds' if has_position_table else 'lacks'} embedding.position_embeddings.weight")
    biases = set()
    for key in tensors:
        for name in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"):
            if key.endswith(f".{name}.bias"):
                biases.add(name)
    normalization = config.normalization
    if any(key.endswith("layer_norm_bias") or key == "decoder.final_norm.bias" for key in tensors):
        normalization = "LayerNorm"
    padded = full.padded_vocab
    true_vocab = full.true_vocab_size
    if true_vocab is None:
        true_vocab = padded
        warnings.append(f"the checkpoint's args do not record the true vocabulary size: all {padded} rows exported")
    elif not 0 < true_vocab <= padded:
        raise ExportError(f"the checkpoint's true_vocab_size {true_vocab} does not fit its {padded} embedding rows")
    d_conv, extra = config.mamba_d_conv, []
    conv = next((t for k, t in tensors.items() if k.endswith("mixer.conv1d.weight")), None)
    if conv is not None:
        d_conv = int(conv.shape[-1])
    if getattr(args, "mamba_repeat_kv", False) and config.mamba_kv_groups is None:
        extra.append("its Mamba layers repeat x / B across heads (mamba_repeat_kv) in a way these args do not size "
                     "(no mamba_kv_groups)")
    facts = ModelFacts(
        pattern=pattern, hidden=config.hidden_size, normalization=normalization, eps=float(config.layernorm_epsilon),
        position=position, rotary_base=float(getattr(args, "rotary_base", 10000)),
        rotary_percent=float(getattr(args, "rotary_percent", 1.0)), rope_scaling=_rope_scaling(args),
        tied=full.tied, heads=config.num_attention_heads or 0, groups=config.num_query_groups or 0,
        head_dim=config.kv_channels or 0, ffn=config.ffn_hidden_size, mlp=_activation_name(config),
        mamba_version=config.mamba_version, mamba_heads=config.mamba_nheads, mamba_head_dim=config.mamba_head_dim,
        mamba_groups=config.mamba_num_groups, mamba_state=config.mamba_state_dim,
        mamba_d_inner=config.mamba_d_inner, mamba_kv_groups=config.mamba_kv_groups, d_conv=d_conv,
        chunk_size=int(getattr(args, "mamba_chunk_size", None) or config.mamba_chunk_size),
        biases=frozenset(biases), true_vocab=int(true_vocab), padded_vocab=padded,
        max_positions=getattr(args, "max_position_embeddings", None) or getattr(args, "seq_length", None),
        extra_refusals=tuple(extra),
    )
    if MAMBA in pattern and facts.mamba_version == 2 and not math.isclose(facts.eps, GATED_NORM_EPS):
        warnings.append(f"--norm-epsilon {facts.eps:g} differs from the Mamba gated norm's fixed {GATED_NORM_EPS:g}: "
                        f"the exported Mamba layers normalise their gated output with {facts.eps:g} (a tiny change)")
    return facts, warnings


def _is_llama_pattern(pattern: str) -> bool:
    return len(pattern) % 2 == 0 and len(pattern) > 0 and all(
        pattern[i:i + 2] == ATTENTION + MLP for i in range(0, len(pattern), 2))


def _common_refusals(facts: ModelFacts, name: str) -> list[str]:
    reasons = list(facts.extra_refusals)
    if facts.normalization != "RMSNorm":
        reasons.append(f"it uses {facts.normalization} (--normalization {facts.normalization}) but {name} has RMSNorm "
                       "only")
    if facts.position == "learned_absolute":
        reasons.append(f"it has learned absolute position embeddings (--position-embedding-type learned_absolute), "
                       f"which {name} does not have")
    return reasons


def _mamba_refusals(facts: ModelFacts, name: str) -> list[str]:
    if MAMBA not in facts.pattern or facts.mamba_version == 2:
        return []
    return [f"its Mamba layers are Mamba1 (--mamba-version 1) but {name} holds Mamba2 layers only"]


def refusals(facts: ModelFacts, target: str) -> list[str]:
    """Why ``target`` cannot hold the model (empty when it can)."""
    if target not in ARCHITECTURES:
        raise ExportError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    name = ARCHITECTURES[target]
    reasons = _common_refusals(facts, name)
    pattern = facts.pattern
    if target == "llama":
        if not _is_llama_pattern(pattern):
            reasons.append(f"its layer pattern {pattern!r} is not attention + MLP pairs ('*-' per Llama layer)")
        if facts.position != "rope":
            reasons.append(f"{name} needs RoPE but the model has position embedding type {facts.position!r}")
        elif facts.rotary_percent != 1.0:
            reasons.append(f"it rotates only part of each head (--rotary-percent {facts.rotary_percent:g}); {name} "
                           "rotates whole heads")
        if MLP in pattern and facts.mlp != "swiglu":
            reasons.append(f"{name}'s MLP is SwiGLU but the model's MLP is {facts.mlp}")
        if ATTENTION in pattern and facts.hidden % facts.heads:
            reasons.append(f"LlamaConfig needs hidden_size {facts.hidden} divisible by num_attention_heads "
                           f"{facts.heads}")
    elif target == "nemotron_h":
        reasons += _mamba_refusals(facts, name)
        if ATTENTION in pattern and facts.position != "none":
            flag = f"--position-embedding-type {facts.position}"
            if facts.position == "rope":
                reasons.append(f"NemotronH attention has no position embeddings but the model uses RoPE ({flag})")
            elif facts.position != "learned_absolute":  # learned absolute is reported above
                reasons.append(f"NemotronH has no position embeddings but the model uses {flag}")
        if MLP in pattern and (facts.mlp.startswith("gated-") or facts.mlp == "swiglu"):
            what = "SwiGLU (--swiglu)" if facts.mlp == "swiglu" else f"a gated {facts.mlp[6:]} MLP"
            reasons.append(f"NemotronH MLP layers are ungated (up_proj, activation, down_proj) but the model uses "
                           f"{what}")
        elif MLP in pattern and facts.mlp not in NEMOTRON_H_MLP_ACTIVATIONS:
            reasons.append(f"its MLP activation {facts.mlp!r} has no NemotronH mlp_hidden_act (it maps squared ReLU "
                           "and GELU)")
        attention_biases = sorted(facts.biases & {"linear_qkv", "linear_proj"})
        if ATTENTION in pattern and attention_biases:
            reasons.append(f"its attention has biases ({', '.join(attention_biases)}; --add-bias-linear / "
                           "--add-qkv-bias) but NemotronH attention has none")
    elif target == "mamba2":
        if set(pattern) != {MAMBA}:
            reasons.append(f"its layer pattern {pattern!r} is not Mamba layers only ({name} has no attention or MLP "
                           "layers)")
        reasons += _mamba_refusals(facts, name)  # (RoPE acts in attention layers only: nothing to refuse here)
        if set(pattern) == {MAMBA} and facts.mamba_version == 2 and facts.mamba_d_inner % facts.hidden:
            reasons.append(f"Mamba2Config needs the inner width (mamba heads x head dim = {facts.mamba_d_inner}) to be "
                           f"an integer multiple of hidden_size {facts.hidden} (--target nemotron_h can hold it)")
    return reasons


def choose_target(facts: ModelFacts, target: str = "auto") -> str:
    """The format to write: ``target``, or for ``auto`` the first of the natural candidates that can hold the model
    (pure ``M``: mamba2 then nemotron_h; ``*-`` pairs: llama then nemotron_h; else nemotron_h). Raises
    :class:`ExportError` with every reason the chosen (or first) candidate cannot hold the model."""
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if target == "auto":
        if set(facts.pattern) == {MAMBA}:
            candidates = ["mamba2", "nemotron_h"]
        elif _is_llama_pattern(facts.pattern):
            candidates = ["llama", "nemotron_h"]
        else:
            candidates = ["nemotron_h"]
    else:
        candidates = [target]
    found = [(candidate, refusals(facts, candidate)) for candidate in candidates]
    for candidate, reasons in found:
        if not reasons:
            return candidate
    first, reasons = found[0]
    chosen = f"{first} ({ARCHITECTURES[first]})" + (" chosen by --target auto" if target == "auto" else "")
    raise ExportError(f"cannot export to {chosen}: " + "; ".join(reasons))


# ------------------------------------------------------------------------------------------------------ tensor maps

def split_grouped_qkv(qkv: torch.Tensor, num_query_groups: int, head_dim: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's grouped ``linear_qkv`` weight ``(rows, hidden)`` or bias ``(rows,)`` -> separate q ``(heads*d, ...)``,
    k and v ``(groups*d, ...)``: the inverse of ``hf_conversion.grouped_qkv``."""
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_query_groups, -1, head_dim, *rest)  # (groups, heads_per_group + 2, d, ...)
    q = grouped[:, :-2].reshape(-1, *rest)
    k = grouped[:, -2].reshape(-1, *rest)
    v = grouped[:, -1].reshape(-1, *rest)
    return q, k, v


def expand_shared_mamba(tensor: torch.Tensor, kind: str, facts: ModelFacts) -> torch.Tensor:
    """A Mamba ``in_proj.weight`` (``kind`` "in_proj") or ``conv1d.weight`` / ``conv1d.bias`` ("conv") of the
    GQA-shared variant with its x and B parts repeated to the standard layout (x per head, B per group)."""
    kv = facts.mamba_kv_groups
    heads, head_dim, groups, state = facts.mamba_heads, facts.mamba_head_dim, facts.mamba_groups, facts.mamba_state
    xbc = [kv * head_dim, kv * state, groups * state]
    if kind == "in_proj":
        z, x, b, c, dt = tensor.split([facts.mamba_d_inner, *xbc, heads])
    else:
        x, b, c = tensor.split(xbc)
    x = x.unflatten(0, (kv, head_dim)).repeat_interleave(heads // kv, 0).flatten(0, 1)
    b = b.unflatten(0, (kv, state)).repeat_interleave(groups // kv, 0).flatten(0, 1)
    return torch.cat([z, x, b, c, dt] if kind == "in_proj" else [x, b, c])


class _Source:
    """The gathered tensors, handed out once each (and dropped from the checkpoint to bound memory)."""

    def __init__(self, full: FullCheckpoint, facts: ModelFacts) -> None:
        self.tensors = full.tensors
        self.facts = facts
        self._embedding: torch.Tensor | None = None

    def take(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ExportError(f"the checkpoint has no {key!r}")
        return self.tensors.pop(key)

    def maybe(self, key: str) -> torch.Tensor | None:
        return self.take(key) if key in self.tensors else None

    def vocab(self, key: str) -> torch.Tensor:
        return self.take(key)[: self.facts.true_vocab]

    def embedding(self) -> torch.Tensor:
        """The word embeddings cut to the true vocabulary (kept for a tied output layer)."""
        if self._embedding is None:
            self._embedding = self.vocab("embedding.word_embeddings.weight")
        return self._embedding

    def output_weight(self) -> torch.Tensor:
        """The output layer (the word embeddings when tied), cut to the true vocabulary."""
        return self.embedding() if self.facts.tied else self.vocab("output_layer.weight")

    def leftovers(self) -> list[str]:
        return list(self.tensors)


def _mamba_mixer(src: _Source, i: int, out: dict[str, torch.Tensor], prefix: str) -> None:
    """Our Mamba2 mixer tensors of layer i -> ``prefix`` + the HF names (the same names, standard x / B layout)."""
    ours = f"decoder.layers.{i}.mixer."
    for name in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                 "out_proj.weight"):
        tensor = src.take(ours + name)
        if src.facts.mamba_kv_groups is not None and name in ("in_proj.weight", "conv1d.weight", "conv1d.bias"):
            tensor = expand_shared_mamba(tensor, "in_proj" if name == "in_proj.weight" else "conv", src.facts)
        out[prefix + name] = tensor


def _zeros_like_rows(weight: torch.Tensor) -> torch.Tensor:
    return weight.new_zeros(weight.shape[0])


def _llama_tensors(src: _Source, progress: bool) -> dict[str, torch.Tensor]:
    facts = src.facts
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": src.embedding()}
    attention_bias = bool(facts.biases & {"linear_qkv", "linear_proj"})
    mlp_bias = bool(facts.biases & {"linear_fc1", "linear_fc2"})
    for layer in tqdm(range(len(facts.pattern) // 2), desc="converting", unit="layer", disable=not progress):
        attn, mlp, dst = f"decoder.layers.{2 * layer}.self_attention.", f"decoder.layers.{2 * layer + 1}.mlp.", \
            f"model.layers.{layer}."
        q, k, v = split_grouped_qkv(src.take(attn + "linear_qkv.weight"), facts.groups, facts.head_dim)
        out.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                    dst + "self_attn.v_proj.weight": v})
        o_proj = src.take(attn + "linear_proj.weight")
        out[dst + "self_attn.o_proj.weight"] = o_proj
        if attention_bias:
            qkv_bias = src.maybe(attn + "linear_qkv.bias")
            if qkv_bias is None:
                q_bias, k_bias, v_bias = _zeros_like_rows(q), _zeros_like_rows(k), _zeros_like_rows(v)
            else:
                q_bias, k_bias, v_bias = split_grouped_qkv(qkv_bias, facts.groups, facts.head_dim)
            proj_bias = src.maybe(attn + "linear_proj.bias")
            out.update({dst + "self_attn.q_proj.bias": q_bias, dst + "self_attn.k_proj.bias": k_bias,
                        dst + "self_attn.v_proj.bias": v_bias,
                        dst + "self_attn.o_proj.bias": proj_bias if proj_bias is not None else
                        _zeros_like_rows(o_proj)})
        out[dst + "input_layernorm.weight"] = src.take(attn + "linear_qkv.layer_norm_weight")
        gate, up = src.take(mlp + "linear_fc1.weight").chunk(2, dim=0)
        down = src.take(mlp + "linear_fc2.weight")
        out.update({dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
                    dst + "mlp.down_proj.weight": down})
        if mlp_bias:
            fc1_bias = src.maybe(mlp + "linear_fc1.bias")
            gate_bias, up_bias = ((_zeros_like_rows(gate), _zeros_like_rows(up)) if fc1_bias is None
                                  else fc1_bias.chunk(2, dim=0))
            fc2_bias = src.maybe(mlp + "linear_fc2.bias")
            out.update({dst + "mlp.gate_proj.bias": gate_bias, dst + "mlp.up_proj.bias": up_bias,
                        dst + "mlp.down_proj.bias": fc2_bias if fc2_bias is not None else _zeros_like_rows(down)})
        out[dst + "post_attention_layernorm.weight"] = src.take(mlp + "linear_fc1.layer_norm_weight")
    out["model.norm.weight"] = src.take("decoder.final_norm.weight")
    if not facts.tied:
        out["lm_head.weight"] = src.output_weight()
    return out


def _nemotron_h_tensors(src: _Source, progress: bool) -> dict[str, torch.Tensor]:
    facts = src.facts
    out: dict[str, torch.Tensor] = {"model.embeddings.weight": src.embedding()}
    for i, symbol in enumerate(tqdm(facts.pattern, desc="converting", unit="layer", disable=not progress)):
        dst, ours = f"model.layers.{i}.", f"decoder.layers.{i}."
        if symbol == MAMBA:
            out[dst + "norm.weight"] = src.take(ours + "mixer.in_proj.layer_norm_weight")
            _mamba_mixer(src, i, out, dst + "mixer.")
        elif symbol == ATTENTION:
            attn = ours + "self_attention."
            out[dst + "norm.weight"] = src.take(attn + "linear_qkv.layer_norm_weight")
            q, k, v = split_grouped_qkv(src.take(attn + "linear_qkv.weight"), facts.groups, facts.head_dim)
            out.update({dst + "mixer.q_proj.weight": q, dst + "mixer.k_proj.weight": k, dst + "mixer.v_proj.weight": v,
                        dst + "mixer.o_proj.weight": src.take(attn + "linear_proj.weight")})
        else:
            mlp = ours + "mlp."
            out[dst + "norm.weight"] = src.take(mlp + "linear_fc1.layer_norm_weight")
            up, down = src.take(mlp + "linear_fc1.weight"), src.take(mlp + "linear_fc2.weight")
            out.update({dst + "mixer.up_proj.weight": up, dst + "mixer.down_proj.weight": down})
            if facts.biases & {"linear_fc1", "linear_fc2"}:  # mlp_bias covers both: a missing one is zeros
                for ours_name, name, weight in (("linear_fc1.bias", "up_proj.bias", up),
                                                ("linear_fc2.bias", "down_proj.bias", down)):
                    bias = src.maybe(mlp + ours_name)
                    out[dst + "mixer." + name] = bias if bias is not None else _zeros_like_rows(weight)
    out["model.norm_f.weight"] = src.take("decoder.final_norm.weight")
    out["lm_head.weight"] = src.output_weight()  # NemotronH never ties: always written (a copy when tied)
    return out


def _mamba2_tensors(src: _Source, progress: bool) -> dict[str, torch.Tensor]:
    facts = src.facts
    out: dict[str, torch.Tensor] = {"backbone.embeddings.weight": src.embedding()}
    for i in tqdm(range(len(facts.pattern)), desc="converting", unit="layer", disable=not progress):
        dst = f"backbone.layers.{i}."
        out[dst + "norm.weight"] = src.take(f"decoder.layers.{i}.mixer.in_proj.layer_norm_weight")
        _mamba_mixer(src, i, out, dst + "mixer.")
    out["backbone.norm_f.weight"] = src.take("decoder.final_norm.weight")
    if not facts.tied:
        out["lm_head.weight"] = src.output_weight()
    return out


# ------------------------------------------------------------------------------------------------------ configs

def _token_kwargs(token_ids: dict[str, int | None]) -> dict[str, Any]:
    return {"bos_token_id": token_ids.get("bos"), "eos_token_id": token_ids.get("eos"),
            "pad_token_id": token_ids.get("pad")}


def _llama_config(facts: ModelFacts, token_ids: dict[str, int | None], dtype: str) -> Any:
    from transformers import LlamaConfig

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": facts.rotary_base}
    if facts.rope_scaling is not None:
        rope = {**facts.rope_scaling, "rope_theta": facts.rotary_base}
    optional = {"max_position_embeddings": facts.max_positions} if facts.max_positions else {}
    return LlamaConfig(
        vocab_size=facts.true_vocab, hidden_size=facts.hidden, intermediate_size=facts.ffn,
        num_hidden_layers=len(facts.pattern) // 2, num_attention_heads=facts.heads,
        num_key_value_heads=facts.groups, head_dim=facts.head_dim, hidden_act="silu", rms_norm_eps=facts.eps,
        rope_parameters=rope, tie_word_embeddings=facts.tied,
        attention_bias=bool(facts.biases & {"linear_qkv", "linear_proj"}),
        mlp_bias=bool(facts.biases & {"linear_fc1", "linear_fc2"}), attention_dropout=0.0,
        architectures=[ARCHITECTURES["llama"]], dtype=dtype, **optional, **_token_kwargs(token_ids),
    )


def _mamba_settings(facts: ModelFacts) -> dict[str, Any]:
    return {"conv_kernel": facts.d_conv, "chunk_size": facts.chunk_size, "use_conv_bias": True, "use_bias": False,
            "layer_norm_epsilon": facts.eps, "time_step_max": 0.1, "time_step_floor": 1e-4,
            "time_step_limit": (0.0, float("inf")), "rescale_prenorm_residual": False}


def _nemotron_h_config(facts: ModelFacts, token_ids: dict[str, int | None], dtype: str) -> Any:
    from transformers import NemotronHConfig

    block = {MAMBA: "linear_attention", ATTENTION: "full_attention", MLP: "mlp"}
    sizes: dict[str, Any] = {}
    if ATTENTION in facts.pattern:
        sizes.update(num_attention_heads=facts.heads, num_key_value_heads=facts.groups, head_dim=facts.head_dim)
    if MAMBA in facts.pattern:
        sizes.update(mamba_num_heads=facts.mamba_heads, mamba_head_dim=facts.mamba_head_dim,
                     n_groups=facts.mamba_groups, ssm_state_size=facts.mamba_state,
                     # NemotronH sizes its mixers by mamba_num_heads x mamba_head_dim; expand is only recorded.
                     expand=facts.mamba_d_inner // facts.hidden if facts.mamba_d_inner % facts.hidden == 0 else 2)
    if MLP in facts.pattern:
        sizes.update(intermediate_size=facts.ffn, mlp_hidden_act=facts.mlp,
                     mlp_bias=bool(facts.biases & {"linear_fc1", "linear_fc2"}))
    if facts.max_positions:
        sizes["max_position_embeddings"] = facts.max_positions
    return NemotronHConfig(
        vocab_size=facts.true_vocab, hidden_size=facts.hidden,
        layers_block_type=[block[symbol] for symbol in facts.pattern], tie_word_embeddings=False,
        attention_bias=False, attention_dropout=0.0, hidden_dropout=0.0, mamba_hidden_act="silu",
        mamba_proj_bias=False, time_step_min=NEMOTRON_H_TIME_STEP_MIN, residual_in_fp32=False,
        num_nextn_predict_layers=0, architectures=[ARCHITECTURES["nemotron_h"]], dtype=dtype,
        **_mamba_settings(facts), **sizes, **_token_kwargs(token_ids),
    )


def _mamba2_config(facts: ModelFacts, token_ids: dict[str, int | None], dtype: str) -> Any:
    from transformers import Mamba2Config

    return Mamba2Config(
        vocab_size=facts.true_vocab, hidden_size=facts.hidden, num_hidden_layers=len(facts.pattern),
        num_heads=facts.mamba_heads, head_dim=facts.mamba_head_dim, n_groups=facts.mamba_groups,
        state_size=facts.mamba_state, expand=facts.mamba_d_inner // facts.hidden, hidden_act="silu",
        residual_in_fp32=True, time_step_min=0.001, tie_word_embeddings=facts.tied,
        architectures=[ARCHITECTURES["mamba2"]], dtype=dtype, **_mamba_settings(facts), **_token_kwargs(token_ids),
    )


_BUILDERS: dict[str, tuple[Callable[..., dict[str, torch.Tensor]], Callable[..., Any]]] = {
    "llama": (_llama_tensors, _llama_config),
    "nemotron_h": (_nemotron_h_tensors, _nemotron_h_config),
    "mamba2": (_mamba2_tensors, _mamba2_config),
}


def build_export(full: FullCheckpoint, target: str = "auto", dtype: str = "float32",
                 token_ids: dict[str, int | None] | None = None, progress: bool = False
                 ) -> tuple[str, Any, dict[str, torch.Tensor], list[str]]:
    """(target, ``transformers`` config, HF state dict in ``dtype``, warnings) for a gathered checkpoint. Consumes
    ``full.tensors``. Raises :class:`ExportError` for what the target cannot hold."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    facts, warnings = model_facts(full)
    chosen = choose_target(facts, target)
    tensor_map, config_builder = _BUILDERS[chosen]
    config = config_builder(facts, dict(token_ids or {}), dtype)
    src = _Source(full, facts)
    tensors = tensor_map(src, progress)
    leftovers = src.leftovers()
    if leftovers:
        raise ExportError(f"the checkpoint holds {leftovers[0]!r}, which the {ARCHITECTURES[chosen]} export has no "
                          "place for")
    torch_dtype = DTYPES[dtype]
    for key in list(tensors):  # one fresh, contiguous tensor each (safetensors refuses shared storage)
        tensors[key] = tensors[key].detach().to(dtype=torch_dtype, memory_format=torch.contiguous_format, copy=True)
    return chosen, config, tensors, warnings


# ------------------------------------------------------------------------------------------------------ tokenizer

def tokenizer_ids(args: argparse.Namespace, true_vocab: int) -> tuple[dict[str, int | None], list[str]]:
    """The bos / eos / pad ids of the checkpoint's tokenizer (eos falls back to the end-of-document id), and
    warnings. Ids at or beyond the true vocabulary are dropped."""
    from megatron.training.tokenizer.build import TIKTOKEN_ARGS, build_tokenizer

    tokenizer_type = getattr(args, "tokenizer_type", None)
    if tokenizer_type is None:
        return {}, ["the checkpoint's args name no tokenizer: no special-token ids in config.json"]
    options = {}
    if tokenizer_type == "TikTokenizer":
        options = {name: getattr(args, name) for name in TIKTOKEN_ARGS if getattr(args, name, None) is not None}
    try:
        tokenizer = build_tokenizer(tokenizer_type, getattr(args, "tokenizer_model", None),
                                    getattr(args, "vocab_size", None), **options)
        ids = {"bos": tokenizer.bos, "eos": tokenizer.eos if tokenizer.eos is not None else tokenizer.eod,
               "pad": tokenizer.pad}
    except Exception as error:  # any tokenizer problem only costs the special-token ids
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return {}, [f"cannot load the tokenizer ({tokenizer_type}) to read its special-token ids: {text}"]
    return {role: value for role, value in ids.items() if value is not None and 0 <= value < true_vocab}, []


def _tokenizer_file_name(path: Path) -> str:
    if path.suffix == ".json":
        return "tokenizer.json"
    if path.suffix == ".model":
        return "tokenizer.model"
    return path.name


def copy_tokenizer(args: argparse.Namespace, destination: Path, token_ids: dict[str, int | None],
                   shown_as: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Copy the tokenizer files that ``args.tokenizer_model`` names into ``destination`` (called ``shown_as`` in
    messages); returns (file names, warnings). A bare ``tokenizer.json`` gets a ``tokenizer_config.json`` naming
    ``PreTrainedTokenizerFast`` and its special tokens, so that ``AutoTokenizer`` loads it."""
    tokenizer_type = getattr(args, "tokenizer_type", None)
    model = getattr(args, "tokenizer_model", None)
    shown_as = shown_as if shown_as is not None else destination
    if not model:
        what = "NullTokenizer has no tokenizer files (its text is the ids)" if tokenizer_type == "NullTokenizer" \
            else f"the checkpoint's args name no tokenizer files (tokenizer type {tokenizer_type})"
        return [], [f"{what}: no tokenizer written; copy one into {shown_as} to use AutoTokenizer"]
    source = Path(model).expanduser()
    if not source.exists():
        return [], [f"the checkpoint's tokenizer {source} does not exist here: tokenizer files not copied"]
    copied: list[str] = []
    warnings: list[str] = []
    if source.is_dir():
        for path in sorted(source.iterdir()):
            if path.is_file() and (path.name in _TOKENIZER_NAMES or path.suffix in _TOKENIZER_SUFFIXES):
                shutil.copy2(path, destination / path.name)
                copied.append(path.name)
        if not copied:
            warnings.append(f"the checkpoint's tokenizer folder {source} holds no tokenizer files: none copied")
    else:
        name = _tokenizer_file_name(source)
        shutil.copy2(source, destination / name)
        copied.append(name)
    if "tokenizer.json" in copied and "tokenizer_config.json" not in copied:
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        vocab = _tokenizer_json_vocab(destination / "tokenizer.json")
        for role, token_id in token_ids.items():
            token = vocab.get(token_id) if token_id is not None else None
            if token is not None:
                config[f"{role}_token"] = token
        (destination / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied.append("tokenizer_config.json")
    elif "tokenizer.json" not in copied and "tokenizer_config.json" not in copied and copied:
        warnings.append(f"copied {', '.join(copied)} without a tokenizer_config.json: AutoTokenizer needs one naming "
                        "the tokenizer class")
    return copied, warnings


def _tokenizer_json_vocab(path: Path) -> dict[int, str]:
    """Id -> token of a ``tokenizer.json`` (empty when it cannot be read)."""
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
        return {token_id: token for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items()}
    except Exception:  # the library raises bare Exceptions; the special tokens are optional
        return {}


# ------------------------------------------------------------------------------------------------------ writing

def _check_save_dir(save_dir: Path) -> None:
    if save_dir.exists() and (not save_dir.is_dir() or any(save_dir.iterdir())):
        raise ExportError(f"--save-dir {save_dir} already exists and is not an empty directory")


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: bool = False) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``
    when the tensors exceed ``max_shard_bytes``; returns the file names."""
    from safetensors.torch import save_file

    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for index, keys in enumerate(tqdm(shards, desc="writing", unit="shard", disable=not progress), start=1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file({key: tensors[key] for key in keys}, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in keys})
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


def export_checkpoint(load_dir: str | Path, save_dir: str | Path, target: str = "auto", dtype: str = "float32", *,
                      progress: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportResult:
    """Gather the checkpoint of ``load_dir`` and write it as a Hugging Face folder ``save_dir`` (which must not
    exist or be empty) in the ``target`` format, with tensors in ``dtype``. Everything is checked before anything
    is written; the folder appears only once complete. Raises :class:`ExportError` (or the gather's
    ``CheckpointError`` / ``ReshardError`` / ``UnknownTensorError``), each with a one-line message."""
    from transformers import GenerationConfig

    save_dir = Path(save_dir)
    _check_save_dir(save_dir)
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    full = gather_checkpoint(load_dir, load_optimizer=False, progress=progress)
    facts, _ = model_facts(full)
    choose_target(facts, target)  # refuse before loading the tokenizer
    token_ids, warnings = tokenizer_ids(full.args, facts.true_vocab)
    padded = full.padded_vocab
    chosen, config, tensors, export_warnings = build_export(full, target, dtype, token_ids, progress)
    warnings = export_warnings + warnings
    parameters = sum(t.numel() for t in tensors.values())
    with staged_directory(save_dir) as staging:
        files = write_safetensors(staging, tensors, max_shard_bytes, progress)
        del tensors
        config.save_pretrained(staging)
        files.insert(0, "config.json")
        if token_ids.get("eos") is not None:
            GenerationConfig(**_token_kwargs(token_ids)).save_pretrained(staging)
            files.append("generation_config.json")
        copied, tokenizer_warnings = copy_tokenizer(full.args, staging, token_ids, save_dir)
        files += copied
        warnings += tokenizer_warnings
    return ExportResult(chosen, ARCHITECTURES[chosen], save_dir, parameters, facts.true_vocab, padded, dtype, files,
                        warnings)
