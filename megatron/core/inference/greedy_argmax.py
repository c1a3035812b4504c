"""The greedy next token without reading the whole output layer: argmax of ``x @ weight.T`` screened by int8 codes.

A decoding step at batch 1 streams every weight from memory once, and the output layer (vocab x hidden) is the
largest of them. The ``greedy_argmax`` C++ kernel reads an int8 copy of it (a quarter of the bytes), which bounds
every logit within a proven error, and recomputes exactly only the few rows that can still be the maximum. Its
answer is the argmax of the logits ``decode_linear`` would have produced, first index on ties (see the kernel's
header for the bound). The codes are built once per generation and kept in its :class:`InferenceParams`.
"""

from __future__ import annotations

import torch

from megatron.core.cpu_kernels import SMALL_BATCH_ROWS, cpu_op
from megatron.core.inference_params import InferenceParams


def greedy_argmax(x: torch.Tensor, weight: torch.Tensor, inference_params: InferenceParams,
                  vocab_size: int | None = None) -> torch.Tensor | None:
    """``(x @ weight[:vocab_size].T).argmax(-1)``: x ``(..., hidden)``, weight ``(vocab, hidden)`` -> ``(...)``
    int64.

    Returns None where the kernel does not apply (not float32 on CPU, autograd on, kernels unavailable, or more
    than ``SMALL_BATCH_ROWS`` rows: larger forwards compute logits with PyTorch's GEMM, whose rounding differs from
    ``decode_linear``'s in the last bit); the caller then computes the logits."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 0 or rows > SMALL_BATCH_ROWS or torch.is_grad_enabled() or not weight.is_contiguous():
        return None
    op = cpu_op("greedy_argmax", x, weight)
    if op is None:
        return None
    # The version counter catches in-place updates of the weight (inference tensors have none: built and only
    # changed under inference mode, where no optimizer runs).
    version = None if weight.is_inference() else weight._version
    entry = inference_params.derived_weights.get(id(weight))
    if entry is None or entry[0] is not weight or entry[1] != version:
        entry = (weight, version, *torch.ops.megatron.int8_row_codes(weight))
        inference_params.derived_weights[id(weight)] = entry
    codes = [tensor[:vocab_size] for tensor in (weight, *entry[2:])]  # row slices stay contiguous
    return op(x.reshape(rows, x.shape[-1]).contiguous(), *codes).view(x.shape[:-1])
