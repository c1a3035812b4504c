"""The Mamba1 mixer (selective scan with per-channel, per-state decay), selected by ``mamba_version=1``."""

from __future__ import annotations

import torch
from torch import nn

from megatron.core.inference_params import InferenceParams
from megatron.core.ssm.mamba_mixer import causal_conv, init_dt_bias, no_weight_decay
from megatron.core.ssm.ops import ssm_ops
from megatron.core.ssm.ops.selective_scan import selective_scan_step
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, divide
from megatron.core.transformer.norm import scaled_init_std
from megatron.core.transformer.transformer_config import TransformerConfig


class Mamba1Mixer(nn.Module):
    """Mamba1 mixer with the ``mamba_ssm`` parameter names and its pre-norm fused into ``in_proj``.

    ``in_proj`` rows ``[x (d_inner), z (d_inner)]``; conv over x; ``x_proj`` gives ``[dt_low (dt_rank), B (n), C (n)]``;
    ``dt_proj`` lifts dt to d_inner (its bias is the dt bias); ``A = -exp(A_log)`` of shape ``(d_inner, n)``.
    Under tensor parallelism the module holds this rank's channels; ``x_proj`` is row-parallel and its summed
    output (dt, B, C) is shared by all ranks.
    """

    def __init__(self, config: TransformerConfig, layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number
        full_inner = config.mamba_expand * config.hidden_size
        self.d_inner = divide(full_inner, config.tensor_model_parallel_size, "Mamba1 inner width")
        self.d_state = config.mamba_state_dim
        self.dt_rank = config.mamba1_dt_rank
        dtype = config.params_dtype

        self.in_proj = ColumnParallelLinear(config, config.hidden_size, 2 * full_inner, bias=False,
                                            init_std=config.init_method_std, normalize_input=True)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, config.mamba_d_conv, groups=self.d_inner, bias=True,
                                dtype=dtype)
        self.x_proj = RowParallelLinear(config, full_inner, self.dt_rank + 2 * self.d_state, bias=False,
                                        init_std=config.init_method_std, reduce_to_all=True)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, dtype=dtype)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        init_dt_bias(self.dt_proj.bias, config)
        # S4D-real initialisation: A[d, k] = -(k + 1).
        a_init = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a_init).to(dtype))
        self.D = nn.Parameter(torch.ones(self.d_inner, dtype=dtype))
        no_weight_decay(self.A_log, self.D, self.dt_proj.bias)
        self.out_proj = RowParallelLinear(config, full_inner, config.hidden_size, bias=False,
                                          init_std=scaled_init_std(config, residuals_per_layer=1))

    def forward(self, hidden: torch.Tensor, inference_params: InferenceParams | None = None) -> torch.Tensor:
        """hidden ``(b, l, hidden)`` -> ``(b, l, hidden)``; states read/updated as for the Mamba2 mixer."""
        x, z = self.in_proj(hidden, inference_params).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, l) each
        b, length = x.shape[0], x.shape[2]
        A = -torch.exp(self.A_log.float())
        conv_state = ssm_state = None
        continuing = False
        if inference_params is not None:
            conv_state, ssm_state = inference_params.layer_state(
                self.layer_number, lambda: self._allocate_states(hidden, inference_params.max_batch_size),
                recurrent=True)
            conv_state, ssm_state = conv_state[:b], ssm_state[:b]
            continuing = inference_params.sequence_len_offset > 0
            if continuing and length == 1:
                return self.out_proj(self._step(x[..., 0], z[..., 0], A, conv_state, ssm_state).unsqueeze(1),
                                     inference_params)

        x = causal_conv(self.conv1d, x.transpose(1, 2), [self.d_inner], conv_state, continuing)[0].transpose(1, 2)
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        y = ssm_ops(hidden).selective_scan(
            x, dt, A, B.transpose(1, 2), C.transpose(1, 2), self.D, z, delta_bias=self.dt_proj.bias,
            delta_softplus=True, return_last_state=ssm_state is not None,
            initial_state=ssm_state if continuing else None,
        )
        if ssm_state is not None:
            y, final = y
            ssm_state.copy_(final)
        return self.out_proj(y.transpose(1, 2))

    def _step(self, x: torch.Tensor, z: torch.Tensor, A: torch.Tensor, conv_state: torch.Tensor,
              ssm_state: torch.Tensor) -> torch.Tensor:
        """One decode step up to the gate: x, z ``(b, d_inner)`` -> ``(b, d_inner)``; states updated in place."""
        x = ssm_ops(x).conv_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        y = selective_scan_step(ssm_state, x, dt @ self.dt_proj.weight.t(), A, B, C, self.D, z,
                                delta_bias=self.dt_proj.bias, delta_softplus=True)
        return y

    def _allocate_states(self, like: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        conv_state = like.new_zeros(batch, self.d_inner, self.conv1d.kernel_size[0])
        ssm_state = like.new_zeros(batch, self.d_inner, self.d_state,
                                   dtype=torch.promote_types(like.dtype, torch.float32))
        return conv_state, ssm_state
