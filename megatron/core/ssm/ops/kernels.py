"""Run-time choice between the PyTorch reference ops and the CUDA kernels of ``mamba_ssm`` / ``causal_conv1d``.

The kernels are used only for CUDA tensors when both packages import; everything else (CPU, a missing package,
``MEGATRON_SSM_KERNELS=reference``) uses the reference ops, which compute the same function. The choice is logged
once per process.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from megatron.core.ssm.ops import causal_conv1d, selective_scan, ssd

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SSMOps:
    """The five ops a Mamba mixer needs, all with the reference signatures of this package.

    ``chunk_size``, when set, overrides the configured SSD chunk: the chunk changes only speed, never the result, and
    the PyTorch reference is fastest on CPU at 64 (its intra-chunk work grows with the chunk) while the CUDA kernels
    keep the configured one.
    """

    name: str
    chunk_scan: Any
    state_update: Any
    conv: Any
    conv_update: Any
    selective_scan: Any
    chunk_size: int | None = None


REFERENCE = SSMOps(
    name="PyTorch reference",
    chunk_scan=ssd.mamba_chunk_scan_combined,
    state_update=ssd.selective_state_update,
    conv=causal_conv1d.causal_conv1d_fn,
    conv_update=causal_conv1d.causal_conv1d_update,
    selective_scan=selective_scan.selective_scan_fn,
    chunk_size=64,
)


@functools.cache
def _cuda_ops() -> SSMOps | None:
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as error:  # ImportError, or a CUDA extension that fails to load
        logger.debug("mamba_ssm / causal_conv1d kernels unavailable: %s", error)
        return None

    def state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        # The kernel's multi-head form takes per-channel copies of the per-head parameters.
        p, n = x.shape[-1], state.shape[-1]
        return selective_state_update(
            state, x, dt.unsqueeze(-1).expand(-1, -1, p), A[:, None, None].expand(-1, p, n).float(), B, C,
            D=None if D is None else D[:, None].expand(-1, p), z=z,
            dt_bias=None if dt_bias is None else dt_bias[:, None].expand(-1, p), dt_softplus=dt_softplus,
        )

    def conv(x, weight, bias=None, initial_states=None, activation=None):
        if initial_states is not None:  # the kernel wants channel-last inputs for this case
            return causal_conv1d.causal_conv1d_fn(x, weight, bias, initial_states, activation)
        return causal_conv1d_fn(x, weight, bias, activation=activation)

    def scan1(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
              initial_state=None):
        if initial_state is not None:  # the kernel starts from a zero state
            return selective_scan.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                    return_last_state, initial_state)
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    return SSMOps("mamba_ssm/causal_conv1d CUDA kernels", mamba_chunk_scan_combined, state_update, conv,
                  causal_conv1d_update, scan1)


@functools.cache
def _log_choice(name: str) -> None:
    logger.info("Mamba ops: using the %s", name)


def ssm_ops(like: torch.Tensor) -> SSMOps:
    """The ops for tensors like ``like``: the CUDA kernels for CUDA tensors when available, else the reference."""
    ops = REFERENCE
    if like.is_cuda and os.environ.get("MEGATRON_SSM_KERNELS", "auto") != "reference":
        ops = _cuda_ops() or REFERENCE
    _log_choice(ops.name)
    return ops
