"""Optional C++ fast paths for CPU decoding, compiled on first use and cached by PyTorch's extension builder.

They compute the same function as the composed PyTorch reference ops. If no compiler (or ninja) is available, the
build fails once, is logged, and the reference path is used. ``MEGATRON_CPU_KERNELS=0`` disables them.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "mamba2_decode_step.cpp"


@functools.cache
def _build() -> Any | None:
    if os.environ.get("MEGATRON_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        logger.info("building the fused CPU Mamba2 decode step (once; cached by torch.utils.cpp_extension)")
        return load(name="megatron_mamba2_decode_step", sources=[str(_SOURCE)], extra_cflags=["-O3"],
                    verbose=False)
    except Exception as error:  # no compiler, no ninja, or a failed build: fall back to the reference
        logger.warning("fused CPU decode step unavailable, using the PyTorch reference: %s", error)
        return None


def mamba2_decode_step_kernel(like: torch.Tensor) -> Any | None:
    """The fused step for CPU float32 tensors like ``like`` (building it on first use), else None."""
    if like.device.type != "cpu" or like.dtype != torch.float32:
        return None
    module = _build()
    return module.mamba2_decode_step if module is not None else None
