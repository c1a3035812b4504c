"""Linear layers and the word embedding split over tensor-parallel ranks (Megatron's ``tensor_parallel.layers``).

Each layer allocates only its shard; :func:`megatron.core.tensor_parallel.initialization.build_sharded` fills the
shards from a full-size draw so that the model is the same at any tensor-parallel size. At size 1 the layers are
plain linear layers and communicate nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import parallel_state
from megatron.core.inference.greedy_argmax import greedy_argmax
from megatron.core.inference_params import InferenceParams
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.norm import decode_linear, normalize
from megatron.core.transformer.transformer_config import TransformerConfig


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator / denominator``, or ``ValueError`` naming ``what`` when it does not divide."""
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def mark_sequence_parallel(*params: nn.Parameter | None) -> None:
    """Tag replicated parameters that see only this rank's sequence slice under sequence parallelism: their
    gradients are partial sums and get all-reduced over the tensor-parallel group before the optimizer step."""
    for param in params:
        if param is not None:
            param.sequence_parallel = True


def enter_tensor_parallel_region(x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """A replicated (or, with sequence parallelism, sequence-split) activation made ready for rank-specific work."""
    return gather_from_sequence_parallel_region(x) if sequence_parallel else copy_to_tensor_model_parallel_region(x)


class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with the output features (rows of ``A``) split over ranks: rank r computes ``y_r``.

    With ``normalize_input`` the layer's pre-norm is fused in front (``layer_norm_weight`` / ``layer_norm_bias``,
    Transformer Engine's layout). With sequence parallelism the input arrives split along the sequence and is
    all-gathered after the norm. ``gather_output`` concatenates the ranks' outputs. With
    ``skip_weight_param_allocation`` the weight is always passed to :meth:`forward` (a tied output layer).
    """

    def __init__(self, config: TransformerConfig, input_size: int, output_size: int, bias: bool, init_std: float,
                 normalize_input: bool = False, gather_output: bool = False,
                 skip_weight_param_allocation: bool = False) -> None:
        super().__init__()
        dtype = config.params_dtype
        local = divide(output_size, config.tensor_model_parallel_size, "output width")
        self.sequence_parallel = config.sequence_parallel
        self.gather_output = gather_output
        self.normalization = config.normalization
        self.eps = config.layernorm_epsilon
        self.weight = None
        if not skip_weight_param_allocation:
            self.weight = nn.Parameter(torch.empty(local, input_size, dtype=dtype))
            nn.init.normal_(self.weight, mean=0.0, std=init_std)
        self.bias = nn.Parameter(torch.zeros(local, dtype=dtype)) if bias else None
        self.layer_norm_weight = self.layer_norm_bias = None
        if normalize_input:
            self.layer_norm_weight = nn.Parameter(torch.ones(input_size, dtype=dtype))
            if config.normalization == "LayerNorm":
                self.layer_norm_bias = nn.Parameter(torch.zeros(input_size, dtype=dtype))
            if self.sequence_parallel:
                mark_sequence_parallel(self.layer_norm_weight, self.layer_norm_bias)

    def forward(self, x: torch.Tensor, inference_params: InferenceParams | None = None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """``(b, s, in)`` (``(b, s / tp, in)`` with sequence parallelism) -> ``(b, s, out / tp)`` (or ``out`` when
        gathered). ``weight`` replaces the layer's own (the tied output layer uses the embedding's shard)."""
        if self.layer_norm_weight is not None:
            x = normalize(x, self.normalization, self.layer_norm_weight, self.layer_norm_bias, self.eps)
        x = enter_tensor_parallel_region(x, self.sequence_parallel)
        out = decode_linear(x, self.weight if weight is None else weight, self.bias, inference_params)
        return gather_from_tensor_model_parallel_region(out) if self.gather_output else out

    def forward_argmax(self, x: torch.Tensor, inference_params: InferenceParams,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
        """The index of the largest output feature of :meth:`forward` among all ranks' features (the first
        ``inference_params.argmax_vocab_size`` of them when set): ``(b, s, in)`` -> ``(b, s)`` int64 (greedy
        decoding). On one rank without bias it runs the int8-screened ``greedy_argmax`` kernel, which reads a
        quarter of the weight's bytes; otherwise it takes the argmax of the gathered output."""
        weight = self.weight if weight is None else weight
        limit = inference_params.argmax_vocab_size
        if self.bias is None and parallel_state.get_tensor_model_parallel_world_size() == 1:
            normalized = x
            if self.layer_norm_weight is not None:
                normalized = normalize(x, self.normalization, self.layer_norm_weight, self.layer_norm_bias, self.eps)
            tokens = greedy_argmax(normalized, weight, inference_params, limit)
            if tokens is not None:
                return tokens
        out = self.forward(x, inference_params, weight)
        out = out if self.gather_output else gather_from_tensor_model_parallel_region(out)
        return out[..., :limit].argmax(dim=-1)


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with the input features (columns of ``A``) split over ranks: each rank multiplies its slice
    of ``x`` and the partial products are summed (reduce-scattered along the sequence with sequence parallelism).

    ``reduce_to_all`` forces a full all-reduce whose result feeds rank-specific computation again (Mamba1's
    ``x_proj``): its gradient is then summed over ranks too.
    """

    def __init__(self, config: TransformerConfig, input_size: int, output_size: int, bias: bool, init_std: float,
                 reduce_to_all: bool = False) -> None:
        super().__init__()
        dtype = config.params_dtype
        local = divide(input_size, config.tensor_model_parallel_size, "input width")
        self.sequence_parallel = config.sequence_parallel and not reduce_to_all
        self.reduce_to_all = reduce_to_all
        self.weight = nn.Parameter(torch.empty(output_size, local, dtype=dtype))
        nn.init.normal_(self.weight, mean=0.0, std=init_std)
        self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype)) if bias else None
        if self.sequence_parallel:
            mark_sequence_parallel(self.bias)

    def forward(self, x: torch.Tensor, inference_params: InferenceParams | None = None) -> torch.Tensor:
        """``(b, s, in / tp) -> (b, s, out)`` (``(b, s / tp, out)`` with sequence parallelism)."""
        partial = decode_linear(x, self.weight, None, inference_params)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(partial)
        else:
            out = reduce_from_tensor_model_parallel_region(partial)
            if self.reduce_to_all:
                out = copy_to_tensor_model_parallel_region(out)
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    """Word embedding whose vocabulary rows are split over ranks; tokens outside a rank's range contribute zero and
    the ranks' lookups are summed."""

    def __init__(self, config: TransformerConfig, vocab_size: int, init_std: float) -> None:
        super().__init__()
        tp = config.tensor_model_parallel_size
        local = divide(vocab_size, tp, "padded vocabulary size")
        self.vocab_start = local * parallel_state.get_tensor_model_parallel_rank() if tp > 1 else 0
        self.weight = nn.Parameter(torch.empty(local, config.hidden_size, dtype=config.params_dtype))
        nn.init.normal_(self.weight, mean=0.0, std=init_std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids ``(b, s)`` -> ``(b, s, hidden)``, replicated on every rank."""
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        embedded = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        embedded = embedded.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(embedded)
