import subprocess
import sys

import torch

from megatron.core.ssm.ops import ssm_ops
from megatron.core.ssm.ops.kernels import REFERENCE


def test_cpu_tensors_use_the_reference_ops():
    assert ssm_ops(torch.zeros(1)) is REFERENCE


def test_import_needs_no_optional_gpu_package():
    # A fresh interpreter in which importing mamba_ssm / causal_conv1d / transformer_engine fails must still import
    # and run the whole model.
    code = (
        "import sys\n"
        "for name in ('mamba_ssm', 'causal_conv1d', 'transformer_engine', 'apex'):\n"
        "    sys.modules[name] = None\n"
        "import torch, megatron\n"
        "from megatron.core.models.hybrid import HybridModel\n"
        "from megatron.core.transformer import TransformerConfig\n"
        "config = TransformerConfig(hidden_size=32, num_attention_heads=4, mamba_head_dim=8, mamba_num_groups=2)\n"
        "model = HybridModel(config, 11, 16, hybrid_layer_pattern='M*-')\n"
        "print(model(torch.zeros(1, 5, dtype=torch.long)).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torch.Size([1, 5, 11])" in result.stdout
