"""Pipeline-parallel training and evaluation steps on ``torch.distributed.pipelining``.

Each rank holds one model chunk (1F1B) or several (interleaved 1F1B: chunk c of pipeline rank r is virtual stage
``c * pp + r``). A step takes the rank's whole share of the global batch; the schedule splits it into micro-batches,
sends hidden states ``(b, s, hidden)`` between stages and back-propagates each micro-batch's masked mean loss, with
gradients scaled by 1 / micro-batches (the same sum as gradient accumulation without a pipeline).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from megatron.core import parallel_state


class PipelineChunk(nn.Module):
    """Adapts a model chunk to the stage calling convention: the first stage takes token ids, later ones the
    previous stage's hidden states; the last stage (which also receives ``labels``) returns per-token losses."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``(b, s)`` ids or ``(b, s, hidden)`` states -> states, or ``(b, s)`` losses on the last stage."""
        labels = labels if self.model.post_process else None
        if self.model.pre_process:
            return self.model(inputs, labels=labels)
        return self.model(None, decoder_input=inputs, labels=labels)


def masked_mean_loss(losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token ``losses`` ``(b, s)`` over the tokens where ``loss_mask`` ``(b, s)`` is 1."""
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


class PipelineSchedule:
    """The stages of this rank and the schedule that runs them (1F1B, or interleaved with several chunks)."""

    def __init__(self, chunks: list[nn.Module], wrapped: list[nn.Module], num_microbatches: int,
                 device: torch.device) -> None:
        """``chunks``: this rank's model chunks in order; ``wrapped``: the same, possibly wrapped in DDP around a
        :class:`PipelineChunk`."""
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        rank = parallel_state.get_pipeline_model_parallel_rank()
        group = parallel_state.get_pipeline_model_parallel_group()
        self.chunks = chunks
        self.device = device
        self.holds_first = chunks[0].pre_process
        self.holds_last = chunks[-1].post_process
        num_stages = pp * len(chunks)
        self.stages = [PipelineStage(module, c * pp + rank, num_stages, device, group=group)
                       for c, module in enumerate(wrapped)]
        if len(chunks) == 1:
            self.schedule = Schedule1F1B(self.stages[0], num_microbatches, loss_fn=masked_mean_loss)
        else:
            self.schedule = ScheduleInterleaved1F1B(self.stages, num_microbatches, loss_fn=masked_mean_loss)

    def run(self, batch: dict[str, torch.Tensor], train: bool) -> float | None:
        """One forward-backward (``train``) or forward-only pass over ``batch`` (``tokens``, ``labels``,
        ``loss_mask``, each ``(b, s)``); returns the mean micro-batch loss on every pipeline rank."""
        args = (batch["tokens"],) if self.holds_first else ()
        kwargs = {"labels": batch["labels"]} if self.holds_last else {}
        target = batch["loss_mask"] if self.holds_last else None
        losses: list[torch.Tensor] | None = [] if self.holds_last else None
        (self.schedule.step if train else self.schedule.eval)(*args, target=target, losses=losses, **kwargs)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        if losses:
            loss += torch.stack([item.detach().double() for item in losses]).mean()
        ranks = parallel_state.get_pipeline_model_parallel_ranks()
        dist.broadcast(loss, src=ranks[-1], group=parallel_state.get_pipeline_model_parallel_group())
        return loss.item()
