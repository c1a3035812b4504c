"""The pretraining loop: data, model, optimizer, schedule, logging, evaluation, checkpoints and exit conditions."""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from megatron.core import parallel_state
from megatron.core.datasets import build_gpt_datasets
from megatron.core.datasets.samplers import MegatronPretrainingSampler
from megatron.core.distributed import finalize_model_grads, wrap_data_parallel
from megatron.core.models.hybrid import HybridModel
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_norm, counted_in_norm
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import PipelineChunk, PipelineSchedule, masked_mean_loss
from megatron.core.tensor_parallel.random import model_parallel_manual_seed
from megatron.training.arguments import core_transformer_config_from_args, rope_scaling_from_args
from megatron.training.checkpointing import load_checkpoint, save_checkpoint
from megatron.training.initialize import destroy_distributed, initialize_distributed
from megatron.training.metrics import MetricsWriter
from megatron.training.tokenizer import build_tokenizer_from_args, padded_vocab_size


def is_rank_0() -> bool:
    """Whether this is the process that logs (global rank 0, or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def log(message: str) -> None:
    """Print a time-stamped line, flushed, from global rank 0 only (Megatron's ``print_rank_0``)."""
    if is_rank_0():
        print(f"[{datetime.now():%Y-%m-%d %H:%M:%S}] {message}", flush=True)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(args: argparse.Namespace, pipeline_stage: int = 0, num_pipeline_stages: int = 1) -> HybridModel:
    """The hybrid model described by ``args`` (float32 parameters; ``--bf16``/``--fp16`` run under autocast), or
    stage ``pipeline_stage`` of it, split for this rank's tensor-parallel position."""
    config = core_transformer_config_from_args(args)
    config.params_dtype = torch.float32
    return HybridModel(
        config, args.padded_vocab_size, args.max_position_embeddings, hybrid_layer_pattern=args.hybrid_layer_pattern,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent, rope_scaling=rope_scaling_from_args(args),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        pre_process=pipeline_stage == 0, post_process=pipeline_stage == num_pipeline_stages - 1,
        pipeline_stage=pipeline_stage, num_pipeline_stages=num_pipeline_stages,
    )


def build_model_chunks(args: argparse.Namespace) -> list[HybridModel]:
    """This rank's model chunks: one per virtual pipeline stage it holds (chunk c is stage ``c * pp + pp_rank``)."""
    pp = args.pipeline_model_parallel_size
    chunks = args.virtual_pipeline_model_parallel_size or 1
    rank = parallel_state.get_pipeline_model_parallel_rank()
    return [build_model(args, c * pp + rank, pp * chunks).to(args.device) for c in range(chunks)]


@dataclass
class TrainingModel:
    """This rank's model: its chunks (for state dicts and the optimizer), the modules that run them (DDP-wrapped
    when gradients are reduced during the backward) and, with pipelining, the schedule."""

    chunks: list[HybridModel]
    wrapped: list[nn.Module]
    pipeline: PipelineSchedule | None
    ddp: bool  # DDP reduces gradients over data-parallel ranks during the backward

    def train(self, mode: bool = True) -> None:
        """Training (dropout on) or evaluation mode for every chunk."""
        for chunk in self.chunks:
            chunk.train(mode)

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter of this rank."""
        return [p for chunk in self.chunks for p in chunk.parameters() if p.requires_grad]


def setup_model(args: argparse.Namespace) -> TrainingModel:
    """Build this rank's chunks, wrap them for data parallelism and, with pipelining, build the schedule."""
    chunks = build_model_chunks(args)
    ddp = args.overlap_grad_reduce and args.data_parallel_size > 1
    if args.pipeline_model_parallel_size == 1:
        return TrainingModel(chunks, [wrap_data_parallel(chunks[0], args.overlap_grad_reduce)], None, ddp)
    wrapped = [wrap_data_parallel(PipelineChunk(chunk), args.overlap_grad_reduce) for chunk in chunks]
    return TrainingModel(chunks, wrapped, PipelineSchedule(chunks, wrapped, args.num_microbatches, args.device),
                         ddp)


def total_iterations(args: argparse.Namespace) -> int:
    """The run's length in optimizer steps: ``--train-iters``, or ``--train-samples`` / global batch size."""
    return args.train_iters or args.train_samples_total // args.global_batch_size


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> OptimizerParamScheduler:
    """Megatron's schedule, counted in samples: iteration-based flags are converted with the global batch size."""
    gbs = args.global_batch_size
    if args.train_iters is not None:
        decay = (args.lr_decay_iters or args.train_iters) * gbs
        warmup = args.lr_warmup_iters * gbs
        wsd = (getattr(args, "lr_wsd_decay_iters", None) or 0) * gbs
    else:
        decay = args.lr_decay_samples or args.train_samples
        warmup = args.lr_warmup_samples
        wsd = getattr(args, "lr_wsd_decay_samples", None) or 0
    if getattr(args, "lr_warmup_fraction", None) is not None:
        warmup = int(args.lr_warmup_fraction * decay)
    start_wd = args.start_weight_decay if args.start_weight_decay is not None else args.weight_decay
    end_wd = args.end_weight_decay if args.end_weight_decay is not None else args.weight_decay
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr or 0.0, min_lr=args.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=args.lr_decay_style, start_wd=start_wd,
        end_wd=end_wd, wd_incr_steps=args.train_samples_total, wd_incr_style=args.weight_decay_incr_style,
        wsd_decay_steps=wsd or None, lr_wsd_decay_style=getattr(args, "lr_wsd_decay_style", None),
    )


def batches(dataset: Dataset, consumed_samples: int, args: argparse.Namespace) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches of ``dataset`` starting after ``consumed_samples`` (so resumed runs neither repeat nor skip)."""
    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, args.micro_batch_size,
                                         data_parallel_rank=parallel_state.get_data_parallel_rank(),
                                         data_parallel_size=args.data_parallel_size)
    # A private generator: DataLoader otherwise draws its worker seed from the global RNG, which would shift the
    # dropout stream of a resumed run relative to an uninterrupted one.
    generator = torch.Generator().manual_seed(args.seed)
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers, generator=generator))


def autocast(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``--bf16`` / ``--fp16`` (parameters stay float32)."""
    return torch.autocast(args.device.type, dtype=args.autocast_dtype, enabled=args.autocast_dtype is not None)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors moved to ``device``."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> torch.Tensor:
    """Mean masked next-token loss of one micro-batch (``model`` holds the whole network)."""
    with autocast(args):
        losses = model(batch["tokens"], labels=batch["labels"])
    return masked_mean_loss(losses, batch["loss_mask"])


def forward_backward(model: TrainingModel, micro_batches: list[dict[str, torch.Tensor]],
                     scaler: torch.amp.GradScaler | None, args: argparse.Namespace) -> float:
    """Forward (and, when ``scaler`` is given, backward) over a step's micro-batches; returns the mean loss over
    micro-batches and data-parallel ranks. Gradients accumulate as the sum of loss / micro-batches."""
    if model.pipeline is not None:
        batch = {key: torch.cat([mb[key] for mb in micro_batches]) for key in micro_batches[0]}
        with autocast(args):
            loss = model.pipeline.run(batch, train=scaler is not None)
    else:
        runner, total = model.wrapped[0], 0.0
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # DDP reduces gradients on the last micro-batch only; earlier ones just accumulate.
            sync = contextlib.nullcontext() if last or not hasattr(runner, "no_sync") else runner.no_sync()
            with sync:
                micro_loss = forward_loss(runner, batch, args) / len(micro_batches)
                if scaler is not None:
                    scaler.scale(micro_loss).backward()
            total += micro_loss.item()
        loss = total
    return data_parallel_mean(loss, args.device)


def data_parallel_mean(value: float, device: torch.device) -> float:
    """The mean of ``value`` over data-parallel ranks (for logging)."""
    if parallel_state.get_data_parallel_world_size() == 1:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return tensor.item() / parallel_state.get_data_parallel_world_size()


def build_grad_scaler(args: argparse.Namespace) -> torch.amp.GradScaler:
    """Loss scaling for ``--fp16`` (static with ``--loss-scale``, else dynamic from ``--initial-loss-scale``, growing
    every ``--loss-scale-window`` clean steps); a pass-through scaler otherwise."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    static = args.loss_scale is not None
    return torch.amp.GradScaler(device, enabled=args.fp16, init_scale=args.loss_scale if static else
                                args.initial_loss_scale, growth_factor=1.0 if static else 2.0,
                                backoff_factor=1.0 if static else 0.5, growth_interval=int(args.loss_scale_window))


def train_step(model: TrainingModel, data: Iterator[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
               scheduler: OptimizerParamScheduler, scaler: torch.amp.GradScaler, args: argparse.Namespace,
               timers: dict[str, float]) -> tuple[float, float, bool]:
    """One optimizer step over ``num_microbatches`` micro-batches; returns (loss, grad norm, skipped) and adds the
    seconds spent fetching data, in forward-backward and in the optimizer (gradient reductions included) to
    ``timers``. With ``--fp16`` a step whose gradients overflowed is skipped (no update, no schedule advance) and
    the scale shrinks."""
    start = time.perf_counter()
    micro_batches = [to_device(next(data), args.device) for _ in range(args.num_microbatches)]
    fetched = time.perf_counter()
    loss = forward_backward(model, micro_batches, scaler, args)
    timers["data"] += fetched - start
    timers["forward-backward"] += time.perf_counter() - fetched
    start = time.perf_counter()
    finalize_model_grads(model.chunks, ddp_reduced=model.ddp)
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(model.parameters(), args.clip_grad if args.clip_grad > 0 else math.inf)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    skipped = scaler.is_enabled() and scaler.get_scale() < scale
    optimizer.zero_grad(set_to_none=True)
    if not skipped:
        scheduler.step(increment=args.global_batch_size)
    timers["optimizer"] += time.perf_counter() - start
    return loss, grad_norm, skipped


@torch.no_grad()
def evaluate(model: TrainingModel, dataset: Dataset, args: argparse.Namespace) -> float:
    """Mean loss over ``eval_iters`` global batches from the start of ``dataset``."""
    model.train(False)
    data = batches(dataset, 0, args)
    steps = min(args.eval_iters, len(dataset) // args.global_batch_size)
    losses = [forward_backward(model, [to_device(next(data), args.device) for _ in range(args.num_microbatches)],
                               None, args) for _ in range(steps)]
    model.train(True)
    return sum(losses) / max(len(losses), 1)


def every_rank_agrees_to_stop(stop: bool, device: torch.device) -> bool:
    """True on every rank when any rank wants to stop (a signal or a clock reaches only some of them)."""
    if not dist.is_initialized():
        return stop
    flag = torch.tensor(int(stop), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class ExitSignal:
    """Records SIGTERM (``--exit-signal-handler``) so the loop can save and stop at the end of the step."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        if enabled:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = True


def pretrain(args: argparse.Namespace) -> dict[str, float]:
    """Train (and evaluate) the model ``args`` describe, on this process's share of the parallel layout; returns
    the final losses (the same on every rank)."""
    if args.fp16 and args.pipeline_model_parallel_size > 1:
        raise ValueError("--fp16 loss scaling does not run through the pipeline schedule; use --bf16 with "
                         "--pipeline-model-parallel-size > 1")
    initialize_distributed(args)
    try:
        return _pretrain(args)
    finally:
        destroy_distributed()


def _pretrain(args: argparse.Namespace) -> dict[str, float]:
    set_seed(args.seed)
    args.device = torch.device(f"cuda:{torch.cuda.current_device()}" if args.distributed_backend == "nccl"
                               else "cpu")
    tokenizer = None
    if args.tokenizer_type is not None:
        tokenizer = build_tokenizer_from_args(args)
    vocab = tokenizer.vocab_size if tokenizer is not None else args.vocab_size
    args.true_vocab_size = vocab
    args.padded_vocab_size = padded_vocab_size(vocab, args.make_vocab_size_divisible_by,
                                               args.tensor_model_parallel_size)
    args.autocast_dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else None)
    args.train_samples_total = args.train_samples or (args.train_iters or 0) * args.global_batch_size
    train_iters = total_iterations(args)
    eval_samples = (train_iters // args.eval_interval + 1) * args.eval_iters * args.global_batch_size
    train_ds, valid_ds = None, None
    for builder in (True, False):  # rank 0 writes the index caches first; the others then read them
        if is_rank_0() == builder:
            train_ds, valid_ds, _test_ds = build_gpt_datasets(
                args.data_path or [], args.split, args.seq_length, args.seed,
                (args.train_samples_total, eval_samples, 0),  # the test split is not evaluated during pretraining
                cache_dir=args.data_cache_path, mock=args.mock_data, vocab_size=vocab,
            )
        if dist.is_initialized():
            dist.barrier()
    log(f"hybrid layer pattern: {args.hybrid_layer_pattern} ({args.num_layers} layers); parallel layout: "
        f"tensor {args.tensor_model_parallel_size} x pipeline {args.pipeline_model_parallel_size} x data "
        f"{args.data_parallel_size}" + (" with sequence parallelism" if args.sequence_parallel else ""))

    model = setup_model(args)
    model_parallel_manual_seed(args.seed)  # dropout streams; parameters were drawn from their own seeds
    log(f"model parameters: {model_parameter_count(model, args.device):,}")
    optimizer = get_megatron_optimizer(model.chunks, args.lr or 0.0, args.weight_decay, args.adam_beta1,
                                       args.adam_beta2, args.adam_eps,
                                       use_distributed_optimizer=args.use_distributed_optimizer)
    scheduler = build_scheduler(optimizer, args)
    scaler = build_grad_scaler(args)
    iteration, consumed = 0, 0
    if args.load is not None:
        iteration, saved = load_checkpoint(args.load, model.chunks, optimizer, scheduler, args, grad_scaler=scaler,
                                           load_optim=not args.no_load_optim and not args.finetune,
                                           load_rng=not args.no_load_rng and not args.finetune)
        consumed = 0 if args.finetune else saved.get("consumed_train_samples", 0)
        iteration = 0 if args.finetune else iteration
        log(f"loaded checkpoint from {args.load} at iteration {iteration}")

    results: dict[str, float] = {}
    metrics = MetricsWriter(args)
    if not args.skip_train:
        results.update(train_loop(model, optimizer, scheduler, train_ds, valid_ds, args, iteration, consumed,
                                  metrics, scaler))
    if valid_ds is not None and args.eval_iters > 0:
        results["valid_loss"] = evaluate(model, valid_ds, args)
        log(f"validation loss at the end | lm loss value: {results['valid_loss']:.6E} | "
            f"lm loss PPL: {math.exp(min(results['valid_loss'], 20)):.6E} |")
        metrics.scalars(int(results.get("iteration", iteration)), {"lm loss validation": results["valid_loss"]})
    metrics.close()
    return results


def model_parameter_count(model: TrainingModel, device: torch.device) -> int:
    """Parameters of the whole model, summed over tensor- and pipeline-parallel ranks (tied copies once)."""
    count = sum(p.numel() for chunk in model.chunks for p in chunk.parameters() if counted_in_norm(p))
    if parallel_state.get_model_parallel_group() is None:
        return count
    total = torch.tensor(count, dtype=torch.int64, device=device)
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return int(total.item())


def train_loop(model: TrainingModel, optimizer: torch.optim.Optimizer, scheduler: OptimizerParamScheduler,
               train_ds: Dataset, valid_ds: Dataset | None, args: argparse.Namespace, iteration: int,
               consumed: int, metrics: MetricsWriter, scaler: torch.amp.GradScaler) -> dict[str, float]:
    """Run steps until ``train_iters`` (or an exit condition); log, evaluate and save on their intervals."""
    train_iters = total_iterations(args)
    data = batches(train_ds, consumed, args)
    exit_signal = ExitSignal(args.exit_signal_handler)
    start = time.time()
    interval_start, interval_loss, interval_steps = time.time(), 0.0, 0
    tokens_per_step = args.global_batch_size * args.seq_length
    model.train()
    loss = float("nan")
    timers = {"data": 0.0, "forward-backward": 0.0, "optimizer": 0.0}
    loop_start, first_iteration, skipped_steps = time.perf_counter(), iteration, 0
    while iteration < train_iters:
        loss, grad_norm, skipped = train_step(model, data, optimizer, scheduler, scaler, args, timers)
        skipped_steps += skipped
        iteration += 1
        consumed += args.global_batch_size
        args.consumed_train_samples = consumed
        interval_loss, interval_steps = interval_loss + loss, interval_steps + 1
        if iteration % args.log_interval == 0 or iteration == train_iters:
            elapsed = (time.time() - interval_start) / interval_steps
            log(f" iteration {iteration:8d}/{train_iters:8d} | consumed samples: {consumed:12d} | "
                f"elapsed time per iteration (ms): {elapsed * 1000:.1f} | "
                f"learning rate: {scheduler.get_lr():.6E} | global batch size: {args.global_batch_size:5d} | "
                f"lm loss: {interval_loss / interval_steps:.6E} | grad norm: {grad_norm:.3f} | "
                + (f"loss scale: {scaler.get_scale():.1f} | " if scaler.is_enabled() else "")
                + f"number of skipped iterations: {skipped_steps:3d} | number of nan iterations:   0 | "
                f"tokens per second: {tokens_per_step / elapsed:.1f} |")
            metrics.scalars(iteration, {"lm loss": interval_loss / interval_steps, "learning-rate": scheduler.get_lr(),
                                        "grad-norm": grad_norm, "tokens-per-second": tokens_per_step / elapsed})
            interval_start, interval_loss, interval_steps, skipped_steps = time.time(), 0.0, 0, 0
        if valid_ds is not None and args.eval_interval and iteration % args.eval_interval == 0 and args.eval_iters:
            valid = evaluate(model, valid_ds, args)
            log(f"validation loss at iteration {iteration} | lm loss value: {valid:.6E} | "
                f"lm loss PPL: {math.exp(min(valid, 20)):.6E} |")
            metrics.scalars(iteration, {"lm loss validation": valid})
        stop = every_rank_agrees_to_stop(
            exit_signal.received
            or bool(args.exit_interval and iteration % args.exit_interval == 0)
            or bool(args.exit_duration_in_mins and (time.time() - start) / 60 > args.exit_duration_in_mins),
            args.device)
        if args.save and ((args.save_interval and iteration % args.save_interval == 0) or stop
                          or iteration == train_iters):
            save_checkpoint(args.save, iteration, model.chunks, optimizer, scheduler, args, grad_scaler=scaler)
            log(f"saved checkpoint at iteration {iteration} to {args.save}")
        if stop:
            log(f"exiting at iteration {iteration}")
            break
    loop_seconds = time.perf_counter() - loop_start
    steps = max(iteration - first_iteration, 1)
    return {"train_loss": loss, "iteration": iteration, "tokens_per_second": steps * tokens_per_step / loop_seconds,
            "fraction_outside_forward_backward": 1.0 - timers["forward-backward"] / loop_seconds,
            **{f"seconds_{name}": value for name, value in timers.items()}}
