"""The Mamba2 mixer (Megatron's ``MambaMixer``): projection, short causal conv, SSD scan, gated norm, projection."""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron.core.cpu_kernels import SMALL_BATCH_ROWS, cpu_op
from megatron.core.inference_params import InferenceParams
from megatron.core.ssm.gated_rmsnorm import GatedRMSNorm
from megatron.core.ssm.ops import ssm_ops
from megatron.core.ssm.ops.causal_conv1d import (
    causal_conv1d_silu_split,
    conv_state_from_inputs,
    projection_conv1d_silu_split,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, divide
from megatron.core.transformer.norm import scaled_init_std
from megatron.core.transformer.transformer_config import TransformerConfig


def no_weight_decay(*params: nn.Parameter) -> None:
    """Mark parameters the optimizer must not decay (``dt_bias``, ``A_log``, ``D``)."""
    for param in params:
        param._no_weight_decay = True


def init_dt_bias(dt_bias: torch.Tensor, config: TransformerConfig) -> None:
    """dt ~ log-uniform in [dt_min, dt_max], floored at dt_init_floor, stored as softplus⁻¹(dt) in ``dt_bias``."""
    with torch.no_grad():
        low, high = math.log(config.mamba_dt_min), math.log(config.mamba_dt_max)
        dt = torch.exp(torch.rand_like(dt_bias, dtype=torch.float32) * (high - low) + low)
        dt = dt.clamp(min=config.mamba_dt_init_floor)
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def causal_conv(
    conv1d: nn.Conv1d, xbc: torch.Tensor, widths: list[int], conv_state: torch.Tensor | None, continuing: bool
) -> tuple[torch.Tensor, ...]:
    """SiLU(causal depthwise conv) of channel-last inputs ``(b, l, channels)``, split into pieces of ``widths``
    (x, B, C). With a decode ``conv_state`` ``(b, channels, K)`` the conv starts from it when ``continuing`` and the
    state is updated to the last K inputs."""
    weight = conv1d.weight.squeeze(1)
    width = weight.shape[-1]
    initial = conv_state[..., 1:] if conv_state is not None and continuing else None
    if xbc.device.type == "cpu":
        pieces = causal_conv1d_silu_split(xbc, weight, conv1d.bias, widths, initial)
    else:
        out = ssm_ops(xbc).conv(xbc.transpose(1, 2), weight, conv1d.bias, initial_states=initial, activation="silu")
        pieces = out.transpose(1, 2).split(widths, dim=-1)
    if conv_state is not None:
        conv_state.copy_(conv_state_from_inputs(xbc.transpose(1, 2), width, conv_state if continuing else None))
    return pieces


class MambaMixer(nn.Module):
    """Mamba2 mixer with its pre-norm fused into ``in_proj``.

    ``in_proj`` rows: ``[z (d_inner), x (d_inner), B (g*n), C (g*n), dt (nheads)]``; the conv runs over ``[x, B, C]``;
    ``y = out_proj(GatedRMSNorm(ssd(x, dt, A, B, C) + D x, z))`` with ``A = -exp(A_log)`` and
    ``dt = softplus(dt + dt_bias)``. Under tensor parallelism the module holds this rank's heads and groups (every
    component of ``in_proj`` and the conv split separately; ``out_proj`` row-parallel).
    """

    def __init__(self, config: TransformerConfig, layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number
        tp = config.tensor_model_parallel_size
        self.single_rank = tp == 1
        self.headdim = config.mamba_head_dim
        self.nheads = divide(config.mamba_nheads, tp, "Mamba head count")
        self.ngroups = divide(config.mamba_num_groups, tp, "mamba_num_groups")
        self.d_inner = self.nheads * self.headdim
        self.d_state = config.mamba_state_dim
        self.chunk_size = config.mamba_chunk_size
        # x, B and C widths on this rank; with mamba_kv_groups, x and B are narrower and repeated in forward.
        self.xbc_widths = [width // tp for width in config.mamba_xbc_widths]
        self.kv_groups = None if config.mamba_kv_groups is None else divide(config.mamba_kv_groups, tp,
                                                                             "mamba_kv_groups")
        self.conv_channels = sum(self.xbc_widths)
        dtype = config.params_dtype

        self.in_proj = ColumnParallelLinear(config, config.hidden_size,
                                            (self.d_inner + self.conv_channels + self.nheads) * tp, bias=False,
                                            init_std=config.init_method_std, normalize_input=True)
        # nn.Conv1d's default init is the specified one: kaiming-uniform(a=sqrt 5), bias U(±1/sqrt(d_conv)).
        self.conv1d = nn.Conv1d(self.conv_channels, self.conv_channels, config.mamba_d_conv,
                                groups=self.conv_channels, bias=True, dtype=dtype)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, dtype=dtype))
        init_dt_bias(self.dt_bias, config)
        low, high = config.mamba_A_init_range
        a_init = torch.empty(self.nheads, dtype=torch.float32).uniform_(low, high)
        self.A_log = nn.Parameter(torch.log(a_init).to(dtype))
        self.D = nn.Parameter(torch.ones(self.nheads, dtype=dtype))
        no_weight_decay(self.dt_bias, self.A_log, self.D)
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups, eps=1e-5, dtype=dtype)
        self.out_proj = RowParallelLinear(config, config.mamba_d_inner, config.hidden_size, bias=False,
                                          init_std=scaled_init_std(config, residuals_per_layer=1))

    def forward(self, hidden: torch.Tensor, inference_params: InferenceParams | None = None) -> torch.Tensor:
        """hidden ``(b, l, hidden)`` -> ``(b, l, hidden)``; with ``inference_params`` the conv/SSM states are read
        (when continuing a sequence) and updated."""
        zxbcdt = self.in_proj(hidden, inference_params)  # sequence-parallel input is gathered here
        b, length = zxbcdt.shape[:2]
        conv_state = ssm_state = None
        continuing = False
        if inference_params is not None:
            conv_state, ssm_state = inference_params.layer_state(
                self.layer_number, lambda: self._allocate_states(hidden, inference_params.max_batch_size),
                recurrent=True)
            conv_state, ssm_state = conv_state[:b], ssm_state[:b]
            continuing = inference_params.sequence_len_offset > 0
            if continuing and length == 1:
                return self.out_proj(self._step(zxbcdt, conv_state, ssm_state), inference_params)

        pieces = None
        if conv_state is None and torch.is_grad_enabled():  # training: one autograd node for split + conv
            pieces = projection_conv1d_silu_split(zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                                  self.d_inner, self.xbc_widths)
        if pieces is not None:
            z, x, B, C, dt = pieces
        else:
            z, xbc, dt = self._split_projection(zxbcdt)
            x, B, C = causal_conv(self.conv1d, xbc, self.xbc_widths, conv_state, continuing)
        A = -torch.exp(self.A_log.float())
        ops = ssm_ops(hidden)
        y = ops.chunk_scan(
            self._heads(x), dt, A, self._b_groups(B), C.reshape(b, length, self.ngroups, self.d_state),
            ops.chunk_size or self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
            initial_states=ssm_state if continuing else None, return_final_states=ssm_state is not None,
        )
        if ssm_state is not None:
            y, final = y
            ssm_state.copy_(final)
        return self.out_proj(self.norm(y.reshape(b, length, self.d_inner), z))

    def decode_with_residual(self, hidden: torch.Tensor,
                             inference_params: InferenceParams | None) -> torch.Tensor | None:
        """``hidden + self(hidden)`` for a few decoding tokens ``(b, s, hidden)`` (one step, or a speculative
        verification) in a single fused C++ call, or None where that path does not apply (no state to continue
        from, more than ``SMALL_BATCH_ROWS`` tokens in all, autograd on, not CPU float32, tensor parallelism,
        LayerNorm or shared x/B). Same states updated, same function as the module path: the recurrence stepped
        token by token, which for a few tokens is cheaper than the chunked scan."""
        if (inference_params is None or inference_params.sequence_len_offset == 0
                or hidden.shape[0] * hidden.shape[1] > SMALL_BATCH_ROWS
                or torch.is_grad_enabled() or not self.single_rank or self.kv_groups is not None
                or self.in_proj.normalization != "RMSNorm" or not hidden.is_contiguous()):
            return None
        kernel = cpu_op("mamba2_decode_layer", hidden, self.in_proj.weight)
        states = inference_params.key_value_memory_dict.get(self.layer_number)
        if kernel is None or states is None:
            return None
        b, s = hidden.shape[:2]
        conv_state, ssm_state = states[0][:b], states[1][:b]
        history = (None, None)
        if inference_params.record_token_states:  # the states after each token, for a speculative roll-back
            history = (conv_state.new_empty(s, *conv_state.shape), ssm_state.new_empty(s, *ssm_state.shape))
            inference_params.token_states[self.layer_number] = history
        return kernel(hidden, self.in_proj.layer_norm_weight, self.in_proj.eps, self.in_proj.weight, conv_state,
                      ssm_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.A_log, self.D, self.dt_bias,
                      self.norm.weight, self.ngroups, self.norm.eps, self.out_proj.weight, *history)

    def _step(self, zxbcdt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One decode step up to the gated norm: the in_proj output ``(b, 1, ·)`` -> ``(b, 1, d_inner)``; states
        updated in place. Uses the fused CPU step when it is available (inference only)."""
        b = zxbcdt.shape[0]
        fused = not torch.is_grad_enabled() and self.kv_groups is None  # the fused step knows the plain layout
        kernel = cpu_op("mamba2_decode_step", zxbcdt) if fused else None
        if kernel is not None:
            return kernel(zxbcdt[:, 0], conv_state, ssm_state, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                          self.A_log, self.D, self.dt_bias, self.norm.weight, self.ngroups, self.norm.eps).unsqueeze(1)
        z, xbc, dt = self._split_projection(zxbcdt)
        ops = ssm_ops(zxbcdt)
        xbc = ops.conv_update(xbc[:, 0], conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        x, B, C = self._split_conv_output(xbc)
        y = ops.state_update(
            ssm_state, self._heads(x), dt[:, 0], -torch.exp(self.A_log.float()),
            self._b_groups(B), C.reshape(b, self.ngroups, self.d_state),
            D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
        )
        return self.norm(y.reshape(b, 1, self.d_inner), z)

    def _split_projection(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The in_proj output ``(..., d_inner + conv_channels + nheads)`` -> views z, xBC, dt."""
        return zxbcdt.split([self.d_inner, self.conv_channels, self.nheads], dim=-1)

    def _split_conv_output(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The activated conv output ``(..., conv_channels)`` -> views x, B, C."""
        return xbc.split(self.xbc_widths, dim=-1)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(..., x width)`` -> ``(..., nheads, headdim)``, each kv group repeated to its heads if x is shared."""
        if self.kv_groups is None:
            return x.unflatten(-1, (self.nheads, self.headdim))
        return x.unflatten(-1, (self.kv_groups, self.headdim)).repeat_interleave(self.nheads // self.kv_groups, -2)

    def _b_groups(self, B: torch.Tensor) -> torch.Tensor:
        """B ``(..., B width)`` -> ``(..., ngroups, d_state)``, each kv group repeated if B is shared."""
        if self.kv_groups is None:
            return B.unflatten(-1, (self.ngroups, self.d_state))
        return B.unflatten(-1, (self.kv_groups, self.d_state)).repeat_interleave(self.ngroups // self.kv_groups, -2)

    def _allocate_states(self, like: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        conv_state = like.new_zeros(batch, self.conv_channels, self.conv1d.kernel_size[0])
        ssm_state = like.new_zeros(batch, self.nheads, self.headdim, self.d_state,
                                   dtype=torch.promote_types(like.dtype, torch.float32))
        return conv_state, ssm_state
