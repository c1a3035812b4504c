"""Mamba kernels: PyTorch references with ``mamba_ssm``'s signatures, and the run-time kernel choice."""

from megatron.core.ssm.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from megatron.core.ssm.ops.kernels import ssm_ops
from megatron.core.ssm.ops.selective_scan import selective_scan_fn, selective_scan_step
from megatron.core.ssm.ops.ssd import mamba_chunk_scan_combined, selective_state_update

__all__ = [
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "mamba_chunk_scan_combined",
    "selective_scan_fn",
    "selective_scan_step",
    "selective_state_update",
    "ssm_ops",
]
