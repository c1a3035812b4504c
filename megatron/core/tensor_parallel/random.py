"""Random streams under model parallelism, and initialisation that does not depend on the parallel layout.

* Parameters: :func:`build_sharded` draws each module at full size from its own seed and keeps this rank's shard,
  so the same seed gives the same full model at any tensor- and pipeline-parallel size.
* Dropout: the default generator is seeded ``seed + 100 * pipeline_rank`` (identical across tensor-parallel ranks,
  whose replicated activations must get identical masks); dropout on rank-specific data (attention probabilities,
  sequence-parallel slices) runs inside :meth:`RNGStatesTracker.fork`, seeded ``seed + 2718 + tensor_rank``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch
from torch import nn

from megatron.core import parallel_state
from megatron.core.tensor_parallel.sharding import shard_tensor, tp_split_rule
from megatron.core.transformer.transformer_config import TransformerConfig

MODEL_PARALLEL_RNG = "model-parallel-rng"


def _get_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def _set_state(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


class RNGStatesTracker:
    """Named generator states that :meth:`fork` swaps in for the duration of a block (Megatron's
    ``CudaRNGStatesTracker``, for CPU and the current CUDA device)."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def add(self, name: str, seed: int) -> None:
        """Register a stream seeded with ``seed``."""
        saved = _get_state()
        torch.manual_seed(seed)
        self.states[name] = _get_state()
        _set_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG, enabled: bool = True) -> Iterator[None]:
        """Run the block on stream ``name`` (a no-op when it was never added, as in a plain single process, or when
        not ``enabled``: a block that draws nothing need not pay for swapping generator states)."""
        if not enabled or name not in self.states:
            yield
            return
        saved = _get_state()
        _set_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state()
            _set_state(saved)

    def get_states(self) -> dict[str, torch.Tensor]:
        """The CPU generator state of every stream (for checkpoints)."""
        return {name: state[0] for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Restore streams saved by :meth:`get_states`."""
        for name, cpu_state in states.items():
            self.states[name] = (cpu_state, self.states.get(name, (None, None))[1])


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker."""
    return _TRACKER


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the default generator (``seed + 100 * pipeline rank``) and the tensor-parallel stream
    (``seed + 2718 + tensor rank``)."""
    torch.manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    _TRACKER.states.clear()
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + 2718 + parallel_state.get_tensor_model_parallel_rank())


def build_sharded(factory: Callable[[TransformerConfig], nn.Module], config: TransformerConfig, seed: int,
                  prefix: str = "") -> nn.Module:
    """``factory(config)`` with its parameters drawn at full size from a generator seeded ``seed`` and split for
    this tensor-parallel rank (rules by state-dict key, ``prefix`` + parameter name). The global random state is
    left untouched. Sharded parameters are tagged ``tensor_model_parallel = True``."""
    tp = config.tensor_model_parallel_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if tp == 1:
            return factory(config)
        full_config = dataclasses.replace(config, tensor_model_parallel_size=1, sequence_parallel=False)
        full = dict(factory(full_config).named_parameters())
        local = factory(config)
    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in local.named_parameters():
            rule = tp_split_rule(prefix + name, full_config)
            param.copy_(shard_tensor(full[name], rule, rank, tp))
            param.tensor_model_parallel = rule.dim is not None
    return local
