"""Optional C++ fast paths for CPU, compiled on first use and cached by PyTorch's extension builder.

Every ``csrc/*.cpp`` file registers its operators under ``torch.ops.megatron``; all of them build into one library,
compiled for the vector instructions PyTorch detects on this CPU. They compute the same functions as the composed
PyTorch reference ops. If no compiler (or ninja) is available, the build fails once, is logged, and the reference
paths are used. ``MEGATRON_CPU_KERNELS=0`` disables them.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
# Forwards of at most this many rows (decoding steps, speculative verifications) take the weight-streaming decode
# kernels: up to here they beat PyTorch's GEMM, which wins at prefill sizes.
SMALL_BATCH_ROWS = 16
_SOURCES = sorted(str(path) for path in (Path(__file__).with_name("csrc")).glob("*.cpp"))
# Flags for the instruction sets torch itself dispatches to; the library name carries the level, so a cache shared
# between different machines never hands one a binary built for instructions it lacks. -fno-trapping-math lets GCC
# vectorise loops with float selects (clamps); nothing here reads floating-point exception flags.
_ARCH_FLAGS = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512bw"]}


@functools.cache
def _build() -> bool:
    if os.environ.get("MEGATRON_CPU_KERNELS", "1") == "0":
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        from torch.utils.cpp_extension import load

        logger.info("building the fused CPU kernels for %s (once; cached by torch.utils.cpp_extension)", capability)
        # -fopenmp: at::parallel_for is an inline OpenMP region in torch's headers; compiled without it, every
        # kernel would run on one thread. It links the libgomp torch has already loaded (same soname).
        load(name=f"megatron_cpu_kernels_{capability.lower()}", sources=_SOURCES, is_python_module=False,
             extra_cflags=["-O3", "-fno-trapping-math", "-fopenmp", *_ARCH_FLAGS.get(capability, [])],
             extra_ldflags=["-fopenmp"], verbose=False)
        return True
    except Exception as error:  # no compiler, no ninja, or a failed build: fall back to the reference
        logger.warning("fused CPU kernels unavailable, using the PyTorch reference ops: %s", error)
        return False


def cpu_op(name: str, *tensors: torch.Tensor,
           dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> Callable[..., torch.Tensor] | None:
    """``torch.ops.megatron.<name>`` if every tensor is a CPU tensor of one of ``dtypes`` (all the same dtype) and
    the kernels built (building them on first use), else None."""
    dtype = tensors[0].dtype
    for tensor in tensors:  # a plain loop: this runs several times per layer in every decoding step
        if not tensor.is_cpu or tensor.dtype != dtype:
            return None
    if dtype not in dtypes or not _build():
        return None
    return getattr(torch.ops.megatron, name)
