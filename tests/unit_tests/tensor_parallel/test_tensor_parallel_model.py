"""Tensor-parallel models compute the single-process function (two local gloo processes).

For each configuration every process first runs the model without tensor parallelism (the oracle: same seed, so the
same weights), then at TP2, and compares the per-token losses, the logits (gathered over the vocabulary) and every
parameter gradient (after the training step's gradient reductions) against the matching shard of the oracle's
gradient. Covered: Mamba1 and Mamba2 mixers, GQA
attention with RoPE or learned absolute positions, GELU / SwiGLU MLPs with biases, LayerNorm and RMSNorm, tied and
untied embeddings, with and without sequence parallelism. Tolerance 1e-5 (float32, reductions split across ranks).
Dropout: replicated activations draw identical masks on every tensor-parallel rank, rank-specific ones do not.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.models.hybrid import HybridModel
from megatron.core.tensor_parallel.random import get_rng_tracker, model_parallel_manual_seed
from megatron.core.tensor_parallel.sharding import shard_tensor, tp_split_rule
from megatron.core.transformer import TransformerConfig

CONFIGS = [
    dict(mamba_version=1, normalization="LayerNorm", add_bias_linear=True, sequence_parallel=True,
         position_embedding_type="learned_absolute", tied=True),
    dict(mamba_version=2, normalization="RMSNorm", add_bias_linear=False, sequence_parallel=False,
         position_embedding_type="rope", tied=False, gated_linear_unit=True, activation_func=F.silu),
    dict(mamba_version=2, normalization="LayerNorm", add_bias_linear=True, sequence_parallel=True,
         position_embedding_type="none", tied=False),
    dict(mamba_version=2, normalization="RMSNorm", add_bias_linear=False, sequence_parallel=True,
         position_embedding_type="none", tied=False, mamba_num_groups=8, mamba_kv_groups=2),  # x/B shared (GQA)
]


def _model(settings: dict, tp: int) -> HybridModel:
    settings = {"hidden_dropout": 0.0, "attention_dropout": 0.0, "mamba_num_groups": 2, **settings}
    position, tied = settings.pop("position_embedding_type"), settings.pop("tied")
    config = TransformerConfig(
        hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48, mamba_head_dim=8,
        mamba_state_dim=8, mamba_chunk_size=8, mamba1_dt_rank=4, tensor_model_parallel_size=tp, **settings)
    torch.manual_seed(42)
    return HybridModel(config, 64, 32, hybrid_layer_pattern="M*-M", position_embedding_type=position,
                       share_embeddings_and_output_weights=tied)


def _run(model: HybridModel, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    losses = model(tokens[:, :-1], labels=tokens[:, 1:])
    losses.mean().backward()
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    return losses.detach(), logits


def _check(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(3))
        for settings in CONFIGS:
            parallel_state.destroy_model_parallel()
            reference = _model(settings, 1)
            expected_losses, expected_logits = _run(reference, tokens)
            parallel_state.initialize_model_parallel(2, 1)
            model = _model(settings, 2)
            losses, logits = _run(model, tokens)
            finalize_model_grads([model], ddp_reduced=False)  # sums the sequence-parallel norms' partial gradients
            torch.testing.assert_close(losses, expected_losses, rtol=0, atol=1e-5)
            torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
            full_config = reference.config
            expected_grads = dict(reference.named_parameters())
            for name, param in model.named_parameters():
                rule = tp_split_rule(name, full_config)
                expected = shard_tensor(expected_grads[name].grad, rule, rank, 2)
                torch.testing.assert_close(param.grad, expected, rtol=0, atol=1e-5, msg=f"{settings}: {name}")
        _check_dropout_streams(tokens)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _gather(value: torch.Tensor) -> list[torch.Tensor]:
    gathered = [torch.empty_like(value) for _ in range(2)]
    dist.all_gather(gathered, value.contiguous())
    return gathered


def _check_dropout_streams(tokens: torch.Tensor) -> None:
    """The default stream is the same on both tensor-parallel ranks (replicated activations get the same dropout
    mask, so the replicated loss stays identical), the tensor-parallel stream differs."""
    model_parallel_manual_seed(5)
    default = _gather(torch.rand(4))
    with get_rng_tracker().fork():
        forked = _gather(torch.rand(4))
    assert torch.equal(default[0], default[1]) and not torch.equal(forked[0], forked[1])
    settings = {**CONFIGS[1], "hidden_dropout": 0.3, "attention_dropout": 0.3}
    model = _model(settings, 2)
    model.train()
    losses = _gather(model(tokens[:, :-1], labels=tokens[:, 1:]).detach())
    assert torch.equal(losses[0], losses[1])
    model.eval()
    assert not torch.equal(losses[0], model(tokens[:, :-1], labels=tokens[:, 1:]).detach())  # dropout was active


def test_tensor_parallel_models_match_single_process():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_check, args=(port,), nprocs=2)
