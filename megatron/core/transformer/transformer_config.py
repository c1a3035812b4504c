"""The model configuration shared by every layer, with Megatron-core's field names and defaults."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)², the activation of ``--squared-relu`` (Primer; used by Nemotron-H)."""
    return torch.square(F.relu(x))


@dataclass
class TransformerConfig:
    """Sizes, numerics and initialisation of a hybrid model. Validated on construction (``ValueError``).

    Derived sizes are filled in by ``__post_init__``: ``kv_channels`` (head dim) = hidden / heads,
    ``num_query_groups`` = heads, ``ffn_hidden_size`` = 4 * hidden, the Mamba inner width and head count.
    """

    num_layers: int = 0
    hidden_size: int = 0
    num_attention_heads: int = 0
    num_query_groups: int | None = None
    kv_channels: int | None = None
    ffn_hidden_size: int | None = None

    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    gated_linear_unit: bool = False
    activation_func: Callable[[torch.Tensor], torch.Tensor] = F.gelu

    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    params_dtype: torch.dtype = torch.float32

    # Model parallelism: layers allocate 1/tensor_model_parallel_size of their split tensors; with
    # sequence_parallel the activations between tensor-parallel regions are split along the sequence.
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False

    # Mamba mixers. mamba_num_heads=None means d_inner = mamba_expand * hidden_size.
    mamba_version: int = 2
    mamba_state_dim: int = 128
    mamba_head_dim: int = 64
    mamba_num_groups: int = 8
    mamba_num_heads: int | None = None
    # Mamba2 only, the variant Llama attention layers convert into: x and B come in this many groups, each shared by
    # nheads / mamba_kv_groups heads (x) or mamba_num_groups / mamba_kv_groups C groups (B), as GQA shares keys and
    # values. None: x per head and B per group, as usual.
    mamba_kv_groups: int | None = None
    mamba_expand: int = 2
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 128
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4
    mamba_A_init_range: tuple[float, float] = (1.0, 16.0)
    mamba1_dt_rank: int | None = None  # Mamba1 only; None means ceil(hidden_size / 16)

    def __post_init__(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"TransformerConfig: {message}")

        require(self.hidden_size > 0, f"hidden_size must be positive, got {self.hidden_size}")
        require(self.num_layers >= 0, f"num_layers must be >= 0, got {self.num_layers}")
        require(self.normalization in NORMALIZATIONS,
                f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        require(self.layernorm_epsilon > 0, f"layernorm_epsilon must be positive, got {self.layernorm_epsilon}")
        require(self.init_method_std > 0, f"init_method_std must be positive, got {self.init_method_std}")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value}")

        require(self.num_attention_heads >= 0, f"num_attention_heads must be >= 0, got {self.num_attention_heads}")
        if self.num_attention_heads > 0:
            if self.kv_channels is None:
                require(self.hidden_size % self.num_attention_heads == 0,
                        f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                        f"{self.num_attention_heads}; set kv_channels")
                self.kv_channels = self.hidden_size // self.num_attention_heads
            if self.num_query_groups is None:
                self.num_query_groups = self.num_attention_heads
            require(self.num_query_groups > 0 and self.num_attention_heads % self.num_query_groups == 0,
                    f"num_attention_heads {self.num_attention_heads} is not divisible by num_query_groups "
                    f"{self.num_query_groups}")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        require(self.ffn_hidden_size > 0, f"ffn_hidden_size must be positive, got {self.ffn_hidden_size}")

        require(self.tensor_model_parallel_size >= 1,
                f"tensor_model_parallel_size must be >= 1, got {self.tensor_model_parallel_size}")
        if self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False
        require(self.mamba_version in (1, 2), f"mamba_version must be 1 or 2, got {self.mamba_version}")
        for name in ("mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_expand", "mamba_d_conv",
                     "mamba_chunk_size"):
            require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        require(0 < self.mamba_dt_min <= self.mamba_dt_max,
                f"need 0 < mamba_dt_min <= mamba_dt_max, got {self.mamba_dt_min}, {self.mamba_dt_max}")
        low, high = self.mamba_A_init_range
        require(0 < low <= high, f"mamba_A_init_range must satisfy 0 < low <= high, got {self.mamba_A_init_range}")
        if self.mamba1_dt_rank is None:
            self.mamba1_dt_rank = math.ceil(self.hidden_size / 16)

    def validate_mamba(self) -> None:
        """Check the Mamba2 shape constraints (called by models that hold Mamba layers); ``ValueError`` if broken."""
        if self.mamba_version != 2:
            return
        if self.mamba_d_inner % self.mamba_head_dim:
            raise ValueError(f"TransformerConfig: Mamba inner width {self.mamba_d_inner} is not divisible by "
                             f"mamba_head_dim {self.mamba_head_dim}")
        if self.mamba_nheads % self.mamba_num_groups:
            raise ValueError(f"TransformerConfig: Mamba head count {self.mamba_nheads} is not divisible by "
                             f"mamba_num_groups {self.mamba_num_groups}")
        kv = self.mamba_kv_groups
        if kv is not None and (kv <= 0 or self.mamba_num_groups % kv):
            raise ValueError(f"TransformerConfig: mamba_num_groups {self.mamba_num_groups} is not divisible by "
                             f"mamba_kv_groups {kv}")

    @property
    def mamba_d_inner(self) -> int:
        """Width of the Mamba inner stream: ``mamba_num_heads * mamba_head_dim`` or ``mamba_expand * hidden``."""
        if self.mamba_num_heads is not None:
            return self.mamba_num_heads * self.mamba_head_dim
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_nheads(self) -> int:
        """Number of Mamba2 heads (``d_inner / headdim``)."""
        return self.mamba_d_inner // self.mamba_head_dim

    @property
    def mamba_xbc_widths(self) -> tuple[int, int, int]:
        """Full widths of the Mamba2 x, B and C streams (rows of ``in_proj``, channels of the conv)."""
        groups = self.mamba_num_groups * self.mamba_state_dim
        if self.mamba_kv_groups is None:
            return self.mamba_d_inner, groups, groups
        kv = self.mamba_kv_groups
        return kv * self.mamba_head_dim, kv * self.mamba_state_dim, groups
