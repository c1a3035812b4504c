"""Hugging Face Llama 2 / 3 / 3.1 / 3.2 (``LlamaForCausalLM``) -> an all-attention hybrid checkpoint.

A Llama layer becomes two hybrid layers, attention then MLP (pattern ``*-*-...``): q/k/v are stacked into the grouped
``linear_qkv`` (:func:`~megatron.core.models.hybrid.hf_conversion.grouped_qkv`), ``o_proj`` -> ``linear_proj``,
``[gate; up]`` -> ``linear_fc1``, ``down_proj`` -> ``linear_fc2``, the two RMSNorms -> the fused layer norms, and
RoPE (with Llama 3.1's ``llama3`` frequency scaling) is recomputed from the config.

* :func:`llama_spec` reads and checks ``config.json`` (refusing what the hybrid model cannot compute: biases,
  other activations, other RoPE scalings, quantized weights).
* :func:`llama_model_args` gives the ``argparse.Namespace`` ``pretrain_hybrid.py`` would build for the model.
* :func:`conversion_plan` / :func:`convert_tensor` map the weights one target tensor at a time (the same mapping
  as ``hf_conversion.llama_from_hf``, streaming), so an 8B model is never held in memory twice.
* :func:`validate_conversion` builds the validation report: every source tensor consumed (by which target) or
  unused (why), every target parameter copied / derived (from which sources), shapes against the config and the
  model, vocabulary sizes and the special-token ids of ``config.json`` / ``generation_config.json`` against the
  tokenizer's; ``ok`` is False when anything is unaccounted for or mismatched.
* :func:`convert_llama` does everything and writes a legacy ``release`` checkpoint (iteration 0) at any tensor /
  pipeline layout with :mod:`megatron.training.checkpoint_reshard`, the tokenizer copied to ``SAVE_DIR/tokenizer``,
  atomically: on a failed validation or any error no checkpoint is written.

User errors raise :class:`LlamaImportError` (or ``HFFolderError`` / ``ReshardError``) with one-line messages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron.core.models.common.embeddings.rotary_pos_embedding import validate_rope_scaling
from megatron.core.models.hybrid.attention_to_mamba import mamba_from_attention
from megatron.core.models.hybrid.hf_conversion import grouped_qkv
from megatron.training.arguments import (
    ArgumentError,
    build_parser,
    core_transformer_config_from_args,
    validate_args,
)
from megatron.training.hf_folder import HFFolder

__all__ = [
    "DTYPES", "REPORT_NAME", "TOKENIZER_DIR", "ConversionResult", "LlamaImportError", "LlamaSpec", "TargetTensor",
    "choose_vocab_layout", "conversion_plan", "convert_llama", "convert_tensor", "expected_source_shapes",
    "format_summary", "inspect_tokenizer", "llama_model_args", "llama_spec", "model_shapes", "validate_conversion",
]

REPORT_NAME = "conversion_report.json"
TOKENIZER_DIR = "tokenizer"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "source": None}
_ROLES = ("bos", "eos", "pad")
_DIVISORS = (128, 64, 32, 16, 8, 4, 2, 1)


class LlamaImportError(ValueError):
    """A Llama folder or request the importer cannot handle (one-line message)."""


# --------------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class LlamaSpec:
    """The architecture a Llama ``config.json`` describes (Hugging Face defaults filled in)."""

    hidden_size: int
    num_layers: int  # Llama layers (the hybrid has twice as many)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rotary_percent: float
    rope_scaling: dict[str, Any] | None  # the four llama3 parameters, or None
    tied: bool
    max_position_embeddings: int
    initializer_range: float
    torch_dtype: str | None
    special_ids: dict[str, Any] = field(default_factory=dict)  # bos/eos/pad ids of config.json (int, list or None)


def _positive_int(config: dict[str, Any], key: str, default: Any = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LlamaImportError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def _positive_float(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise LlamaImportError(f"config.json: {key} must be a positive number, got {value!r}")
    return float(value)


def _rope(config: dict[str, Any]) -> tuple[float, float, dict[str, Any] | None]:
    """(rope_theta, partial rotary factor, llama3 scaling or None) from the old (``rope_theta`` + ``rope_scaling``)
    or the transformers 5 (``rope_parameters``) spelling."""
    parameters = config.get("rope_parameters")
    parameters = dict(parameters) if isinstance(parameters, dict) else {}
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        parameters = {**parameters, **scaling}
    elif scaling is not None:
        raise LlamaImportError(f"config.json: rope_scaling must be an object or null, got {scaling!r}")
    theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise LlamaImportError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    partial = parameters.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise LlamaImportError(f"config.json: partial_rotary_factor must be in (0, 1], got {partial!r}")
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), float(partial), None
    if rope_type != "llama3":
        raise LlamaImportError(f"config.json: RoPE scaling {rope_type!r} is not supported (only Llama 3.1's "
                               "'llama3' scaling and none)")
    try:
        return float(theta), float(partial), validate_rope_scaling({**parameters, "rope_type": "llama3"})
    except ValueError as error:
        raise LlamaImportError(f"config.json: {error}") from None


def llama_spec(config: dict[str, Any]) -> LlamaSpec:
    """Check a Llama ``config.json`` and return its architecture. Refuses (``LlamaImportError``) other model types,
    biases (``attention_bias`` / ``mlp_bias``), activations other than SiLU, RoPE scalings other than ``llama3``
    and quantized checkpoints."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type != "llama" and not (model_type is None and "LlamaForCausalLM" in architectures):
        raise LlamaImportError(f"config.json: model_type {model_type!r} is not 'llama' (this tool converts "
                               "LlamaForCausalLM models)")
    if config.get("quantization_config"):
        raise LlamaImportError("config.json: the weights are quantized (quantization_config); convert the "
                               "unquantized model")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise LlamaImportError(f"config.json: {key} is true, but the hybrid model's attention and MLP layers "
                                   "have no biases")
    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        raise LlamaImportError(f"config.json: hidden_act {activation!r} is not supported (Llama uses 'silu')")
    hidden = _positive_int(config, "hidden_size")
    heads = _positive_int(config, "num_attention_heads")
    kv_heads = _positive_int(config, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise LlamaImportError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                               f"{kv_heads}")
    if config.get("head_dim") is not None:
        head_dim = _positive_int(config, "head_dim")
    elif hidden % heads:
        raise LlamaImportError(f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                               "and there is no head_dim")
    else:
        head_dim = hidden // heads
    theta, partial, scaling = _rope(config)
    if int(head_dim * partial) % 2:
        raise LlamaImportError(f"config.json: the rotary dimension {int(head_dim * partial)} is odd")
    return LlamaSpec(
        hidden_size=hidden, num_layers=_positive_int(config, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=_positive_int(config, "intermediate_size"),
        vocab_size=_positive_int(config, "vocab_size"), rms_norm_eps=_positive_float(config, "rms_norm_eps", 1e-6),
        rope_theta=theta, rotary_percent=partial, rope_scaling=scaling,
        tied=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=_positive_int(config, "max_position_embeddings", 2048),
        initializer_range=_positive_float(config, "initializer_range", 0.02),
        torch_dtype=config.get("torch_dtype", config.get("dtype")),
        special_ids={role: config.get(f"{role}_token_id") for role in _ROLES},
    )


# --------------------------------------------------------------------------------------------------- model args

def choose_vocab_layout(hf_vocab: int, true_vocab: int, tp: int) -> tuple[int, int]:
    """(rows, make_vocab_size_divisible_by): the embedding keeps the Hugging Face rows (plus zero rows up to a
    multiple of ``tp`` when needed) and the divisor is the largest of 128, 64, ..., 1 for which Megatron's padding of
    ``true_vocab`` (the tokenizer's size) at ``tp`` gives exactly those rows, so that training and serving with the
    saved args pad nothing."""
    from megatron.training.tokenizer import padded_vocab_size

    if true_vocab > hf_vocab:
        raise LlamaImportError(f"the tokenizer has {true_vocab} tokens but the model only {hf_vocab} embedding rows")
    rows = -(-hf_vocab // tp) * tp
    for divisor in _DIVISORS:
        if padded_vocab_size(true_vocab, divisor, tp) == rows:
            return rows, divisor
    return rows, rows // tp  # a multiple of rows: padding true_vocab (<= rows) gives rows


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def llama_model_args(spec: LlamaSpec, *, tp: int = 1, pp: int = 1, params_dtype: torch.dtype = torch.float32,
                     tokenizer_model: str | None = None, true_vocab_size: int | None = None,
                     pattern: str | None = None, mamba_version: int = 2) -> argparse.Namespace:
    """The validated args ``pretrain_hybrid.py`` would build for the all-attention hybrid of ``spec`` at tensor /
    pipeline size ``tp`` / ``pp``: pattern ``*-`` per Llama layer, SwiGLU, RMSNorm, no biases, RoPE (scaled for
    Llama 3.1), no dropout, ``HuggingFaceTokenizer`` at ``tokenizer_model`` (None: no tokenizer type), the
    vocabulary padding of :func:`choose_vocab_layout` with ``padded_vocab_size`` / ``true_vocab_size`` set.
    ``pattern`` (``M-*-...``, two symbols per Llama layer) makes some attention layers Mamba layers: Mamba2 with
    ``nheads = n_heads``, ``headdim = d_state = head_dim``, C per head and x/B per key/value head, or Mamba1
    (``mamba_version=1``) of inner width ``n_heads * head_dim``."""
    for name, value in (("--target-tp-size", tp), ("--target-pp-size", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LlamaImportError(f"{name} must be a positive integer, got {value!r}")
    true_vocab = true_vocab_size if true_vocab_size is not None else spec.vocab_size
    rows, divisor = choose_vocab_layout(spec.vocab_size, true_vocab, tp)
    flags = [
        "--hybrid-layer-pattern", pattern or "*-" * spec.num_layers, "--hidden-size", str(spec.hidden_size),
        "--ffn-hidden-size", str(spec.intermediate_size), "--num-attention-heads", str(spec.num_heads),
        "--group-query-attention", "--num-query-groups", str(spec.num_kv_heads), "--kv-channels", str(spec.head_dim),
        "--swiglu", "--normalization", "RMSNorm", "--norm-epsilon", repr(spec.rms_norm_eps), "--disable-bias-linear",
        "--position-embedding-type", "rope", "--rotary-percent", repr(spec.rotary_percent),
        "--max-position-embeddings", str(spec.max_position_embeddings),
        "--seq-length", str(spec.max_position_embeddings), "--make-vocab-size-divisible-by", str(divisor),
        "--hidden-dropout", "0", "--attention-dropout", "0", "--init-method-std", repr(spec.initializer_range),
        "--micro-batch-size", "1",
    ]
    if not spec.tied:
        flags.append("--untie-embeddings-and-output-weights")
    if pattern is not None and "M" in pattern and mamba_version == 1:
        inner = spec.num_heads * spec.head_dim
        if inner % spec.hidden_size:
            raise LlamaImportError(f"Mamba1 layers need heads x head_dim ({inner}) to be a multiple of the hidden "
                                   f"size {spec.hidden_size}")
        flags += ["--mamba-version", "1", "--mamba-expand", str(inner // spec.hidden_size), "--mamba-state-dim", "16"]
    elif pattern is not None and "M" in pattern:
        d = str(spec.head_dim)
        flags += ["--mamba-num-heads", str(spec.num_heads), "--mamba-head-dim", d, "--mamba-state-dim", d,
                  "--mamba-num-groups", str(spec.num_heads), "--mamba-kv-groups", str(spec.num_kv_heads)]
    if spec.rope_scaling is not None:
        scaling = spec.rope_scaling
        flags += ["--use-rope-scaling", "--rope-scaling-factor", repr(float(scaling["factor"])),
                  "--rope-scaling-low-freq-factor", repr(float(scaling["low_freq_factor"])),
                  "--rope-scaling-high-freq-factor", repr(float(scaling["high_freq_factor"])),
                  "--rope-scaling-original-max-position-embeddings",
                  str(int(scaling["original_max_position_embeddings"]))]
    if tokenizer_model is not None:
        flags += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_model)]
    else:
        flags += ["--vocab-size", str(true_vocab)]
    try:
        args = validate_args(build_parser().parse_args(flags), training=False)
    except ArgumentError as error:
        raise LlamaImportError(f"the Llama config gives invalid model arguments: {error}") from None
    if tokenizer_model is None:
        args.vocab_size = None  # no tokenizer to name: the user gives one when training or serving
    args.rotary_base = _number(spec.rope_theta)  # --rotary-base parses ints; keep a fractional base exact
    args.params_dtype = params_dtype
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.virtual_pipeline_model_parallel_size = None
    args.rank, args.world_size, args.data_parallel_size = 0, tp * pp, 1
    args.global_batch_size, args.num_microbatches = 1, 1
    args.sequence_parallel = False
    args.padded_vocab_size, args.true_vocab_size = rows, true_vocab
    args.consumed_train_samples = args.consumed_valid_samples = 0
    for name, count in (("num_attention_heads", spec.num_heads), ("num_query_groups", spec.num_kv_heads),
                        ("ffn_hidden_size", spec.intermediate_size)):
        if count % tp:
            raise LlamaImportError(f"--target-tp-size {tp} does not divide the model's {name} {count}")
    if 2 * spec.num_layers % pp:
        raise LlamaImportError(f"--target-pp-size {pp} does not divide the hybrid's {2 * spec.num_layers} layers "
                               f"({spec.num_layers} Llama layers)")
    return args


# ---------------------------------------------------------------------------------------------------- mapping

@dataclass(frozen=True)
class TargetTensor:
    """One tensor of the converted checkpoint: its key, the source tensors it is made of, how (``op``: copy,
    qkv, fc1 or vocab), its kind for the report (``copied`` or ``derived``) and its expected full shape."""

    key: str
    sources: tuple[str, ...]
    op: str
    shape: tuple[int, ...]
    padding: int = 0  # zero rows appended (vocabulary tensors)

    @property
    def kind(self) -> str:
        """``copied`` (one source, unchanged), ``derived`` (stacked, padded with zero rows, or a Mamba in_proj
        built from q/k/v) or ``initialised`` (a fresh Mamba parameter)."""
        if self.op == "fresh":
            return "initialised"
        return "copied" if self.op == "copy" or (self.op == "vocab" and not self.padding) else "derived"

    def describe(self) -> str:
        """How the tensor is made, in words."""
        if self.op == "qkv":
            return "q/k/v stacked per query group (grouped_qkv)"
        if self.op == "fc1":
            return "[gate_proj; up_proj] stacked"
        if self.op == "mamba":
            return "rows [z | x | B | C | dt] = [fresh | v_proj | k_proj | q_proj | fresh]"
        if self.op == "fresh":
            return "fresh Mamba initialisation (seeded)"
        if self.op == "vocab" and self.padding:
            return f"copied, {self.padding} zero rows appended (vocabulary padding)"
        return "copied unchanged"


def expected_source_shapes(spec: LlamaSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a ``LlamaForCausalLM`` checkpoint of ``spec`` holds and its shape (no ``lm_head`` when tied)."""
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    f = spec.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    if not spec.tied:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def conversion_plan(spec: LlamaSpec, rows: int | None = None, pattern: str | None = None,
                    mamba_version: int = 2) -> list[TargetTensor]:
    """The target tensors in model order (``rows``: the padded vocabulary, default the Llama vocabulary). With a
    ``pattern``, the Llama layers whose first symbol is ``M`` become Mamba2 layers initialised from q/k/v/o."""
    rows = spec.vocab_size if rows is None else rows
    if rows < spec.vocab_size:
        raise LlamaImportError(f"cannot pad the vocabulary of {spec.vocab_size} rows to {rows}")
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    f, pad = spec.intermediate_size, rows - spec.vocab_size
    plan = [TargetTensor("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", (rows, h), pad)]
    for i in range(spec.num_layers):
        src, attn, mlp = f"model.layers.{i}.", f"decoder.layers.{2 * i}.self_attention.", \
            f"decoder.layers.{2 * i + 1}.mlp."
        if pattern is not None and pattern[2 * i] == "M" and mamba_version == 1:
            plan += _mamba1_targets(spec, src, f"decoder.layers.{2 * i}.mixer.")
        elif pattern is not None and pattern[2 * i] == "M":
            plan += _mamba_targets(spec, src, f"decoder.layers.{2 * i}.mixer.")
        else:
            plan += [
                TargetTensor(attn + "linear_qkv.weight", tuple(src + f"self_attn.{n}_proj.weight" for n in "qkv"),
                             "qkv", (q + 2 * kv, h)),
                TargetTensor(attn + "linear_qkv.layer_norm_weight", (src + "input_layernorm.weight",), "copy", (h,)),
                TargetTensor(attn + "linear_proj.weight", (src + "self_attn.o_proj.weight",), "copy", (h, q)),
            ]
        plan += [
            TargetTensor(mlp + "linear_fc1.weight", (src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"), "fc1",
                         (2 * f, h)),
            TargetTensor(mlp + "linear_fc1.layer_norm_weight", (src + "post_attention_layernorm.weight",), "copy",
                         (h,)),
            TargetTensor(mlp + "linear_fc2.weight", (src + "mlp.down_proj.weight",), "copy", (h, f)),
        ]
    plan.append(TargetTensor("decoder.final_norm.weight", ("model.norm.weight",), "copy", (h,)))
    if not spec.tied:
        plan.append(TargetTensor("output_layer.weight", ("lm_head.weight",), "vocab", (rows, h), pad))
    return plan


def _mamba_targets(spec: LlamaSpec, src: str, dst: str) -> list[TargetTensor]:
    """The Mamba2 mixer tensors of one converted attention layer (DESIGN.md, "Mamba in the Llama")."""
    h, d, heads, kv = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    conv = 2 * kv * d + heads * d
    qkv = tuple(src + f"self_attn.{n}_proj.weight" for n in "qkv")
    return [
        TargetTensor(dst + "in_proj.weight", qkv, "mamba", (heads * d + conv + heads, h)),
        TargetTensor(dst + "in_proj.layer_norm_weight", (src + "input_layernorm.weight",), "copy", (h,)),
        *(TargetTensor(dst + name, (), "fresh", shape) for name, shape in (
            ("conv1d.weight", (conv, 1, 4)), ("conv1d.bias", (conv,)), ("dt_bias", (heads,)), ("A_log", (heads,)),
            ("D", (heads,)), ("norm.weight", (heads * d,)))),
        TargetTensor(dst + "out_proj.weight", (src + "self_attn.o_proj.weight",), "copy", (h, heads * d)),
    ]


def _mamba1_targets(spec: LlamaSpec, src: str, dst: str) -> list[TargetTensor]:
    """The Mamba1 mixer tensors of one converted attention layer: x rows from v_proj (repeated per head), out_proj
    from o_proj; q/k have no place (Mamba1 computes B and C from x)."""
    h, inner, state, rank = spec.hidden_size, spec.num_heads * spec.head_dim, 16, -(-spec.hidden_size // 16)
    return [
        TargetTensor(dst + "in_proj.weight", (src + "self_attn.v_proj.weight",), "mamba", (2 * inner, h)),
        TargetTensor(dst + "in_proj.layer_norm_weight", (src + "input_layernorm.weight",), "copy", (h,)),
        *(TargetTensor(dst + name, (), "fresh", shape) for name, shape in (
            ("conv1d.weight", (inner, 1, 4)), ("conv1d.bias", (inner,)), ("x_proj.weight", (rank + 2 * state, inner)),
            ("dt_proj.weight", (inner, rank)), ("dt_proj.bias", (inner,)), ("A_log", (inner, state)),
            ("D", (inner,)))),
        TargetTensor(dst + "out_proj.weight", (src + "self_attn.o_proj.weight",), "copy", (h, inner)),
    ]


def mamba1_unused(spec: LlamaSpec, pattern: str) -> dict[str, str]:
    """The q/k projections that Mamba1 conversions leave out, with the reason (for the validation report)."""
    reason = "Mamba1 computes B and C from x: q_proj / k_proj of a converted layer have no place"
    return {f"model.layers.{i}.self_attn.{n}_proj.weight": reason
            for i in range(spec.num_layers) if pattern[2 * i] == "M" for n in "qk"}


class MambaInit:
    """Mixer tensors of converted layers (:func:`mamba_from_attention`), one layer at a time; the fresh parts of
    Llama layer i are drawn from ``seed + i``."""

    def __init__(self, spec: LlamaSpec, args: argparse.Namespace, seed: int) -> None:
        full = argparse.Namespace(**vars(args))
        full.tensor_model_parallel_size, full.sequence_parallel = 1, False
        self.spec, self.config, self.seed = spec, core_transformer_config_from_args(full), seed
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None

    def tensor(self, key: str, folder: HFFolder) -> torch.Tensor:
        """The tensor of mixer key ``decoder.layers.{2i}.mixer.<name>``."""
        layer = int(key.split(".")[2]) // 2
        if self._cached is None or self._cached[0] != layer:
            src = f"model.layers.{layer}."
            q, k, v, o = (folder.get(src + f"self_attn.{n}_proj.weight").float() for n in "qkvo")
            norm = folder.get(src + "input_layernorm.weight").float()
            self._cached = (layer, mamba_from_attention(q, k, v, o, norm, self.config, self.spec.head_dim,
                                                        self.seed + layer))
        return self._cached[1][key.split(".mixer.", 1)[1]]


def convert_tensor(target: TargetTensor, folder: HFFolder, spec: LlamaSpec,
                   dtype: torch.dtype | None = None, mamba: MambaInit | None = None) -> torch.Tensor:
    """The full target tensor, read from ``folder`` now (``dtype`` None keeps the source dtype). Mixer tensors of
    converted layers come from ``mamba``."""
    if target.op in ("mamba", "fresh"):
        source_dtype = folder.info(f"model.layers.{int(target.key.split('.')[2]) // 2}.input_layernorm.weight").dtype
        tensor = mamba.tensor(target.key, folder).to(dtype or source_dtype)
        if tuple(tensor.shape) != target.shape:
            raise LlamaImportError(f"{target.key} came out with shape {tuple(tensor.shape)}, expected {target.shape}")
        return tensor.contiguous()
    sources = [folder.get(name) for name in target.sources]
    if target.op == "qkv":
        tensor = grouped_qkv(*sources, spec.num_kv_heads)
    elif target.op == "fc1":
        tensor = torch.cat(sources, dim=0)
    else:
        tensor = sources[0]
    if target.padding:
        tensor = torch.cat([tensor, tensor.new_zeros((target.padding, *tensor.shape[1:]))])
    if tuple(tensor.shape) != target.shape:
        raise LlamaImportError(f"{target.key} came out with shape {tuple(tensor.shape)}, expected {target.shape}")
    tensor = tensor if dtype is None else tensor.to(dtype)
    return tensor.contiguous()


def model_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry (and its full shape) of the model ``args`` describe, built on the meta device."""
    from megatron.training.training import build_model

    full = argparse.Namespace(**vars(args))
    full.tensor_model_parallel_size, full.pipeline_model_parallel_size = 1, 1
    with torch.device("meta"):
        model = build_model(full)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


# -------------------------------------------------------------------------------------------------- tokenizer

def inspect_tokenizer(folder: HFFolder) -> dict[str, Any]:
    """What the folder's tokenizer says: present, its files, vocabulary size and bos/eos/pad ids (read with this
    framework's ``HuggingFaceTokenizer``), or the error loading it."""
    files = [path.name for path in folder.tokenizer_files()]
    found: dict[str, Any] = {"present": folder.has_tokenizer(), "files": files, "vocab_size": None,
                             **{role: None for role in _ROLES}, "error": None}
    if not found["present"]:
        return found
    from megatron.training.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer

    try:
        tokenizer = HuggingFaceTokenizer(str(folder.path))
        found["vocab_size"] = tokenizer.vocab_size
        found.update({role: getattr(tokenizer, role) for role in _ROLES})
    except Exception as error:  # tokenizer libraries raise many kinds of errors for unusable files
        text = str(error).strip()
        found["error"] = text.splitlines()[0] if text else type(error).__name__
    return found


def _ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)] if values else None


def _special_tokens(spec: LlamaSpec, generation: dict[str, Any] | None, tokenizer: dict[str, Any],
                    vocab: int) -> tuple[dict[str, Any], list[str], list[str]]:
    """Per role: the ids of config.json, generation_config.json and the tokenizer and whether they agree; and the
    mismatches and (lesser) warnings found."""
    section, mismatches, warnings = {}, [], []
    for role in _ROLES:
        config_ids = _ids(spec.special_ids.get(role))
        generation_ids = _ids((generation or {}).get(f"{role}_token_id"))
        token = tokenizer.get(role)
        entry: dict[str, Any] = {"config": spec.special_ids.get(role),
                                 "generation_config": (generation or {}).get(f"{role}_token_id"),
                                 "tokenizer": token, "agree": True}
        for where, ids in (("config.json", config_ids), ("generation_config.json", generation_ids),
                           ("the tokenizer", [token] if token is not None else None)):
            for value in ids or []:
                if not 0 <= value < vocab:
                    mismatches.append(f"{role} id {value} of {where} is outside the vocabulary of {vocab}")
                    entry["agree"] = False
        if token is not None:
            for where, ids in (("config.json", config_ids), ("generation_config.json", generation_ids)):
                if ids and token not in ids:
                    mismatches.append(f"{role} id {token} of the tokenizer is not the {role}_token_id "
                                      f"{spec.special_ids.get(role) if where == 'config.json' else generation_ids} "
                                      f"of {where}")
                    entry["agree"] = False
        elif config_ids and generation_ids and not set(config_ids) & set(generation_ids):
            warnings.append(f"{role}_token_id of config.json {config_ids} and generation_config.json "
                            f"{generation_ids} differ")
        section[role] = entry
    return section, mismatches, warnings


# ---------------------------------------------------------------------------------------------------- report

def _unused_reason(name: str, spec: LlamaSpec) -> tuple[str, bool]:
    """(why a source tensor outside the plan is not used, whether that is expected)."""
    if name.endswith("rotary_emb.inv_freq"):
        return "RoPE inverse-frequency buffer: recomputed from rope_theta / rope_scaling", True
    if name == "lm_head.weight" and spec.tied:
        return "tie_word_embeddings is true: the output layer shares model.embed_tokens.weight", True
    return "unknown tensor: not part of a LlamaForCausalLM with this config.json", False


def validate_conversion(folder: HFFolder, spec: LlamaSpec, args: argparse.Namespace,
                        plan: list[TargetTensor], tokenizer: dict[str, Any], *,
                        allow_special_token_mismatch: bool = False,
                        known_unused: dict[str, str] | None = None) -> dict[str, Any]:
    """The validation report (a JSON-able dict) of converting ``folder`` by ``plan`` into the model of ``args``.
    ``ok`` is False when a source tensor is unknown or missing, a shape differs from what the config or the model
    implies, a target parameter has no source, the tokenizer is unusable or larger than the vocabulary, or (unless
    ``allow_special_token_mismatch``) the special-token ids disagree."""
    errors: list[str] = []
    warnings: list[str] = []
    expected = expected_source_shapes(spec)
    consumers: dict[str, list[str]] = {}
    for target in plan:
        for name in target.sources:
            consumers.setdefault(name, []).append(target.key)

    sources: dict[str, Any] = {}
    for name, info in folder.tensors.items():
        entry: dict[str, Any] = {"shape": list(info.shape), "dtype": str(info.dtype).replace("torch.", ""),
                                 "file": info.file.name}
        if name in consumers:
            entry.update(status="consumed", by=consumers[name])
            want = expected.get(name)
            if want is not None and info.shape != want:
                entry["expected_shape"] = list(want)
                errors.append(f"source tensor {name} has shape {list(info.shape)}, config.json implies {list(want)}")
            if info.dtype is None or not info.dtype.is_floating_point:
                errors.append(f"source tensor {name} has dtype {entry['dtype']}, not a floating-point type")
        else:
            reason, expected_unused = _unused_reason(name, spec)
            if name in (known_unused or {}):
                reason, expected_unused = known_unused[name], True
            entry.update(status="unused", reason=reason)
            if not expected_unused:
                errors.append(f"source tensor {name} {list(info.shape)} is unaccounted for ({reason})")
        sources[name] = entry
    for name in consumers:
        if name not in folder.tensors:
            errors.append(f"source tensor {name} is missing (needed for {', '.join(consumers[name])})")

    wanted = model_shapes(args)
    targets: dict[str, Any] = {}
    for target in plan:
        entry = {"status": target.kind, "from": list(target.sources), "how": target.describe(),
                 "shape": list(target.shape)}
        model_shape = wanted.get(target.key)
        if model_shape is None:
            errors.append(f"target tensor {target.key} is not a parameter of the model")
        elif model_shape != target.shape:
            entry["model_shape"] = list(model_shape)
            errors.append(f"target tensor {target.key} would have shape {list(target.shape)}, the model expects "
                          f"{list(model_shape)}")
        targets[target.key] = entry
    planned = {target.key for target in plan}
    for key, shape in wanted.items():
        if key not in planned:
            targets[key] = {"status": "initialised", "from": [], "how": "no source: freshly initialised",
                            "shape": list(shape)}
            errors.append(f"model parameter {key} has no source tensor (it would be freshly initialised)")

    tokenizer_vocab = tokenizer.get("vocab_size")
    vocab = {"config_vocab_size": spec.vocab_size, "embedding_rows": sources.get(
             "model.embed_tokens.weight", {}).get("shape", [None])[0], "tokenizer_vocab_size": tokenizer_vocab,
             "true_vocab_size": args.true_vocab_size, "padded_vocab_size": args.padded_vocab_size,
             "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by,
             "zero_rows_appended": args.padded_vocab_size - spec.vocab_size}
    if tokenizer["error"] is not None:
        errors.append(f"the tokenizer cannot be loaded: {tokenizer['error']}")
    elif not tokenizer["present"]:
        warnings.append("no tokenizer (tokenizer.json / tokenizer.model) in the folder: give --tokenizer-type and "
                        "--tokenizer-model when training or serving")
    elif tokenizer_vocab is not None and tokenizer_vocab > spec.vocab_size:
        errors.append(f"the tokenizer has {tokenizer_vocab} tokens, more than the model's {spec.vocab_size} "
                      "embedding rows")
    elif tokenizer_vocab is not None and tokenizer_vocab < spec.vocab_size:
        warnings.append(f"the tokenizer has {tokenizer_vocab} tokens, the model {spec.vocab_size} embedding rows: "
                        "the extra rows are kept as vocabulary padding")
    special, mismatches, special_warnings = _special_tokens(spec, folder.generation_config, tokenizer,
                                                            spec.vocab_size)
    warnings += special_warnings
    if allow_special_token_mismatch:
        warnings += mismatches
    else:
        errors += mismatches

    counts = {"source_tensors": len(sources),
              "consumed": sum(e["status"] == "consumed" for e in sources.values()),
              "unused": sum(e["status"] == "unused" for e in sources.values()),
              "target_tensors": len(targets)}
    for kind in ("copied", "derived", "initialised"):
        counts[kind] = sum(e["status"] == kind for e in targets.values())
    return {
        "ok": not errors,
        "errors": errors,
        "warnings": warnings,
        "source": {"hf_dir": str(folder.path.resolve()), "weights_format": folder.weights_format,
                   "architectures": folder.config.get("architectures"), "model_type": folder.config.get("model_type"),
                   "torch_dtype": spec.torch_dtype, "llama_layers": spec.num_layers, "hidden_size": spec.hidden_size,
                   "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
                   "head_dim": spec.head_dim, "intermediate_size": spec.intermediate_size,
                   "rope_theta": spec.rope_theta, "rope_scaling": spec.rope_scaling,
                   "tie_word_embeddings": spec.tied},
        "target": {"hybrid_layer_pattern": args.hybrid_layer_pattern, "num_layers": args.num_layers,
                   "tensor_model_parallel_size": args.tensor_model_parallel_size,
                   "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
                   "params_dtype": str(args.params_dtype).replace("torch.", ""),
                   "tokenizer_model": getattr(args, "tokenizer_model", None)},
        "counts": counts,
        "vocab": vocab,
        "special_tokens": special,
        "tokenizer": {k: tokenizer[k] for k in ("present", "files", "error")},
        "source_tensors": sources,
        "target_tensors": targets,
    }


def format_summary(report: dict[str, Any]) -> str:
    """A few lines describing the report, for the console."""
    counts, vocab, target = report["counts"], report["vocab"], report["target"]
    special = ", ".join(
        f"{role} {next((v for v in (entry['tokenizer'], entry['config']) if v is not None), '-')}"
        f"{'' if entry['agree'] else ' (MISMATCH)'}" for role, entry in report["special_tokens"].items())
    lines = [
        f"source: {report['source']['hf_dir']} ({report['source']['weights_format']}, {counts['source_tensors']} "
        f"tensors): consumed {counts['consumed']}, unused {counts['unused']}",
        f"target: {counts['target_tensors']} tensors (copied {counts['copied']}, derived {counts['derived']}, "
        f"initialised {counts['initialised']}), {target['num_layers']} layers, "
        f"tp {target['tensor_model_parallel_size']} x pp {target['pipeline_model_parallel_size']}, "
        f"{target['params_dtype']}",
        f"vocabulary: config {vocab['config_vocab_size']}, tokenizer {vocab['tokenizer_vocab_size']}, padded "
        f"{vocab['padded_vocab_size']} (make_vocab_size_divisible_by {vocab['make_vocab_size_divisible_by']}); "
        f"special tokens: {special}",
    ]
    lines += [f"warning: {w}" for w in report["warnings"]]
    lines += [f"problem: {e}" for e in report["errors"]]
    lines.append("validation: ok" if report["ok"] else f"validation: FAILED ({len(report['errors'])} problem(s))")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- writing

class _LazyTensors(Mapping):
    """Target key -> full tensor, converted from the source when asked (``build_rank_file`` shards and drops each
    one), so that at most one full tensor besides one rank file is in memory."""

    def __init__(self, plan: list[TargetTensor], folder: HFFolder, spec: LlamaSpec, dtype: torch.dtype | None,
                 bar: Any, mamba: MambaInit | None) -> None:
        self._plan = {target.key: target for target in plan}
        self._folder, self._spec, self._dtype, self._bar, self._mamba = folder, spec, dtype, bar, mamba

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = convert_tensor(self._plan[key], self._folder, self._spec, self._dtype, self._mamba)
        self._bar.update()
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)


@dataclass
class ConversionResult:
    """What :func:`convert_llama` did: the report, whether the checkpoint was written, and where."""

    report: dict[str, Any]
    written: bool
    save_dir: Path
    report_path: Path


def _check_save_dir(save_dir: Path, hf_dir: Path) -> None:
    if save_dir.resolve() == hf_dir.resolve():
        raise LlamaImportError(f"--save-dir {save_dir} is the --hf-dir: write the checkpoint elsewhere")
    if save_dir.exists():
        if not save_dir.is_dir():
            raise LlamaImportError(f"--save-dir {save_dir} exists and is not a directory")
        leftovers = [p.name for p in save_dir.iterdir() if p.name != REPORT_NAME]
        if leftovers:
            raise LlamaImportError(f"--save-dir {save_dir} already exists and is not empty")


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def _source_dtype(folder: HFFolder) -> torch.dtype:
    info = folder.tensors.get("model.embed_tokens.weight")
    if info is not None and info.dtype is not None and info.dtype.is_floating_point:
        return info.dtype
    return torch.float32


def convert_llama(hf_dir: str | Path, save_dir: str | Path, *, tp: int = 1, pp: int = 1, dtype: str = "source",
                  report_path: str | Path | None = None, progress: bool = False,
                  allow_special_token_mismatch: bool = False, pattern: str | None = None,
                  seed: int = 1234, mamba_version: int = 2) -> ConversionResult:
    """Validate and convert the Llama folder ``hf_dir`` into a ``release`` checkpoint (iteration 0) in
    ``save_dir`` at tensor / pipeline size ``tp`` / ``pp``, with the tokenizer in ``save_dir/tokenizer``.

    The report is written to ``report_path`` (default ``save_dir/conversion_report.json``) either way; the
    checkpoint only when the report is ok, atomically (a temporary sibling renamed at the end). ``dtype``:
    ``bfloat16``, ``float32`` or ``source`` (keep the stored dtype). ``pattern`` (two symbols per Llama layer,
    ``M`` or ``*`` then ``-``) turns the ``M`` layers into Mamba2 layers initialised from their attention weights,
    fresh parts drawn from ``seed``. Raises :class:`LlamaImportError`,
    ``HFFolderError`` or ``ReshardError`` for unusable input before anything is written."""
    from megatron.training.checkpoint_reshard import (
        FullCheckpoint,
        build_rank_file,
        resolve_layout,
        target_vocab,
        validate_target,
        write_checkpoint,
    )

    if dtype not in DTYPES:
        raise LlamaImportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    hf_dir, save_dir = Path(hf_dir), Path(save_dir).expanduser()
    report_path = Path(report_path) if report_path is not None else save_dir / REPORT_NAME
    with HFFolder(hf_dir) as folder:
        _check_save_dir(save_dir, folder.path)
        spec = llama_spec(folder.config)
        tokenizer = inspect_tokenizer(folder)
        true_vocab = tokenizer["vocab_size"] if tokenizer["vocab_size"] is not None else spec.vocab_size
        if true_vocab > spec.vocab_size:
            true_vocab = spec.vocab_size  # reported as an error below
        target_dtype = DTYPES[dtype] or _source_dtype(folder)
        tokenizer_model = str((save_dir / TOKENIZER_DIR).resolve()) if tokenizer["present"] else None
        if pattern is not None:
            check_hybrid_pattern(pattern, spec.num_layers)
        args = llama_model_args(spec, tp=tp, pp=pp, params_dtype=target_dtype, tokenizer_model=tokenizer_model,
                                true_vocab_size=true_vocab, pattern=pattern, mamba_version=mamba_version)
        plan = conversion_plan(spec, args.padded_vocab_size, pattern, mamba_version)
        unused = mamba1_unused(spec, pattern) if pattern is not None and mamba_version == 1 else {}
        mamba = MambaInit(spec, args, seed) if pattern is not None and "M" in pattern else None
        report = validate_conversion(folder, spec, args, plan, tokenizer,
                                     allow_special_token_mismatch=allow_special_token_mismatch,
                                     known_unused=unused)
        report["target"].update(save_dir=str(save_dir), report=str(report_path), checkpoint_written=False)
        if not report["ok"]:
            _write_json(report_path, report)
            return ConversionResult(report, False, save_dir, report_path)

        layout = resolve_layout(tp, pp, None, args.hybrid_layer_pattern)
        full_config_args = argparse.Namespace(**vars(args))
        full_config_args.tensor_model_parallel_size = 1
        meta = {t.key: torch.empty(t.shape, dtype=target_dtype, device="meta") for t in plan}
        full = FullCheckpoint(folder.path, "release", 0, args, core_transformer_config_from_args(full_config_args),
                              layout, meta, None, False, {}, {})
        validate_target(full, layout)
        if target_vocab(full, tp)[1] != args.padded_vocab_size:  # the re-padding rule must keep our rows
            raise LlamaImportError(f"internal: vocabulary padding {target_vocab(full, tp)} disagrees with "
                                   f"{args.padded_vocab_size} rows")
        ranks = [(t, p) for p in range(pp) for t in range(tp)]
        total = len(plan) * tp + (tp if spec.tied and pp > 1 else 0)
        report["target"]["checkpoint_written"] = True
        staging = save_dir.parent / f".{save_dir.name}.llama-import-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        save_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tqdm(total=total, desc="converting tensors", unit="tensor", disable=not progress) as bar:
                lazy = _LazyTensors(plan, folder, spec, DTYPES[dtype], bar, mamba)
                files = (((t, p), build_rank_file(full, layout, t, p, tensors=lazy, args=args, iteration=0))
                         for t, p in ranks)
                write_checkpoint(staging, files, "release", pp > 1)
            if tokenizer["present"]:
                folder.copy_tokenizer(staging / TOKENIZER_DIR)
            if report_path.resolve() == (save_dir / REPORT_NAME).resolve():
                _write_json(staging / REPORT_NAME, report)
            if save_dir.exists():
                stale = save_dir / REPORT_NAME
                if stale.exists():
                    stale.unlink()
                save_dir.rmdir()
            os.replace(staging, save_dir)
        except BaseException:
            report["target"]["checkpoint_written"] = False
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if report_path.resolve() != (save_dir / REPORT_NAME).resolve():
        _write_json(report_path, report)
    return ConversionResult(report, True, save_dir, report_path)


def hybrid_pattern(num_layers: int, attention_fraction: float | None = None,
                   attention_layers: Sequence[int] | None = None) -> str:
    """The hybrid pattern (``M-`` or ``*-`` per Llama layer) keeping attention in a fraction of the layers (layer i
    stays attention when ``(i + 1) % round(1 / fraction) == 0``; 0 converts every layer, 1 none) or in the listed
    0-based layers."""
    if (attention_fraction is None) == (attention_layers is None):
        raise LlamaImportError("give exactly one of --attention-fraction, --attention-layers or a layer pattern")
    if attention_layers is not None:
        bad = [i for i in attention_layers if not 0 <= i < num_layers]
        if bad:
            raise LlamaImportError(f"--attention-layers {bad} out of range: the Llama has {num_layers} layers")
        keep = set(attention_layers)
    else:
        if not 0.0 <= attention_fraction <= 1.0:
            raise LlamaImportError(f"--attention-fraction must be in [0, 1], got {attention_fraction}")
        period = round(1 / attention_fraction) if attention_fraction > 0 else 0
        keep = {i for i in range(num_layers) if period and (i + 1) % period == 0}
    return "".join("*-" if i in keep else "M-" for i in range(num_layers))


def check_hybrid_pattern(pattern: str, num_layers: int) -> None:
    """``LlamaImportError`` unless ``pattern`` is ``M-`` / ``*-`` for each of the ``num_layers`` Llama layers."""
    pairs = [pattern[i : i + 2] for i in range(0, len(pattern), 2)]
    if len(pattern) != 2 * num_layers or any(pair not in ("M-", "*-") for pair in pairs):
        raise LlamaImportError(f"hybrid layer pattern {pattern!r} must be 'M-' or '*-' for each of the "
                               f"{num_layers} Llama layers (each Llama layer keeps its MLP)")
