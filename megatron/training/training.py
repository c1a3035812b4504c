"""The pretraining loop: data, model, optimizer, schedule, logging, evaluation, checkpoints and exit conditions."""

from __future__ import annotations

import argparse
import math
import random
import signal
import time
from collections.abc import Iterator
from datetime import datetime

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from megatron.core.datasets import build_gpt_datasets
from megatron.core.datasets.samplers import MegatronPretrainingSampler
from megatron.core.models.hybrid import HybridModel
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.training.arguments import core_transformer_config_from_args
from megatron.training.checkpointing import load_checkpoint, save_checkpoint
from megatron.training.metrics import MetricsWriter
from megatron.training.tokenizer import build_tokenizer_from_args, padded_vocab_size


def log(message: str) -> None:
    """Print a time-stamped line, flushed (Megatron's ``print_rank_0``)."""
    print(f"[{datetime.now():%Y-%m-%d %H:%M:%S}] {message}", flush=True)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(args: argparse.Namespace) -> HybridModel:
    """The hybrid model described by ``args`` (float32 parameters; ``--bf16``/``--fp16`` run under autocast)."""
    config = core_transformer_config_from_args(args)
    config.params_dtype = torch.float32
    return HybridModel(
        config, args.padded_vocab_size, args.max_position_embeddings, hybrid_layer_pattern=args.hybrid_layer_pattern,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )


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
                                         data_parallel_rank=0, data_parallel_size=args.data_parallel_size)
    # A private generator: DataLoader otherwise draws its worker seed from the global RNG, which would shift the
    # dropout stream of a resumed run relative to an uninterrupted one.
    generator = torch.Generator().manual_seed(args.seed)
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers, generator=generator))


def forward_loss(model: HybridModel, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> torch.Tensor:
    """Mean masked next-token loss of one micro-batch."""
    with torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=args.autocast_dtype,
                        enabled=args.autocast_dtype is not None):
        losses = model(batch["tokens"], labels=batch["labels"])
    mask = batch["loss_mask"].to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def build_grad_scaler(args: argparse.Namespace) -> torch.amp.GradScaler:
    """Loss scaling for ``--fp16`` (static with ``--loss-scale``, else dynamic from ``--initial-loss-scale``, growing
    every ``--loss-scale-window`` clean steps); a pass-through scaler otherwise."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    static = args.loss_scale is not None
    return torch.amp.GradScaler(device, enabled=args.fp16, init_scale=args.loss_scale if static else
                                args.initial_loss_scale, growth_factor=1.0 if static else 2.0,
                                backoff_factor=1.0 if static else 0.5, growth_interval=int(args.loss_scale_window))


def train_step(model: HybridModel, data: Iterator[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
               scheduler: OptimizerParamScheduler, scaler: torch.amp.GradScaler, args: argparse.Namespace,
               timers: dict[str, float]) -> tuple[float, float, bool]:
    """One optimizer step over ``num_microbatches`` accumulated micro-batches; returns (loss, grad norm, skipped)
    and adds the seconds spent fetching data, in forward-backward and in the optimizer to ``timers``. With
    ``--fp16`` a step whose gradients overflowed is skipped (no update, no schedule advance) and the scale shrinks."""
    total = 0.0
    for _ in range(args.num_microbatches):
        start = time.perf_counter()
        batch = next(data)
        fetched = time.perf_counter()
        loss = forward_loss(model, batch, args) / args.num_microbatches
        scaler.scale(loss).backward()
        total += loss.item()
        timers["data"] += fetched - start
        timers["forward-backward"] += time.perf_counter() - fetched
    start = time.perf_counter()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad if args.clip_grad > 0 else math.inf)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    skipped = scaler.is_enabled() and scaler.get_scale() < scale
    optimizer.zero_grad(set_to_none=True)
    if not skipped:
        scheduler.step(increment=args.global_batch_size)
    timers["optimizer"] += time.perf_counter() - start
    return total, grad_norm.item(), skipped


@torch.no_grad()
def evaluate(model: HybridModel, dataset: Dataset, args: argparse.Namespace) -> float:
    """Mean loss over ``eval_iters`` global batches from the start of ``dataset``."""
    model.eval()
    data = batches(dataset, 0, args)
    losses = [forward_loss(model, next(data), args).item()
              for _ in range(min(args.eval_iters * args.num_microbatches, len(dataset) // args.micro_batch_size))]
    model.train()
    return sum(losses) / max(len(losses), 1)


class ExitSignal:
    """Records SIGTERM (``--exit-signal-handler``) so the loop can save and stop at the end of the step."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        if enabled:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = True


def pretrain(args: argparse.Namespace) -> dict[str, float]:
    """Train (and evaluate) the model ``args`` describe; returns the final losses."""
    if args.tensor_model_parallel_size > 1 or args.pipeline_model_parallel_size > 1 or args.data_parallel_size > 1:
        raise ValueError("tensor, pipeline and data parallelism are not available yet (they come with issue 4): "
                         "run one process with --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1")
    set_seed(args.seed)
    tokenizer = None
    if args.tokenizer_type is not None:
        tokenizer = build_tokenizer_from_args(args)
    vocab = tokenizer.vocab_size if tokenizer is not None else args.vocab_size
    args.padded_vocab_size = padded_vocab_size(vocab, args.make_vocab_size_divisible_by,
                                               args.tensor_model_parallel_size)
    args.autocast_dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else None)
    args.train_samples_total = args.train_samples or (args.train_iters or 0) * args.global_batch_size
    train_iters = total_iterations(args)
    eval_samples = (train_iters // args.eval_interval + 1) * args.eval_iters * args.global_batch_size
    train_ds, valid_ds, _test_ds = build_gpt_datasets(
        args.data_path or [], args.split, args.seq_length, args.seed,
        (args.train_samples_total, eval_samples, 0),  # the test split is not evaluated during pretraining
        cache_dir=args.data_cache_path, mock=args.mock_data, vocab_size=vocab,
    )
    log(f"hybrid layer pattern: {args.hybrid_layer_pattern} ({args.num_layers} layers)")

    model = build_model(args)
    log(f"model parameters: {sum(p.numel() for p in model.parameters()):,}")
    optimizer = get_megatron_optimizer(model, args.lr or 0.0, args.weight_decay, args.adam_beta1, args.adam_beta2,
                                       args.adam_eps)
    scheduler = build_scheduler(optimizer, args)
    scaler = build_grad_scaler(args)
    iteration, consumed = 0, 0
    if args.load is not None:
        iteration, saved = load_checkpoint(args.load, model, optimizer, scheduler, args, grad_scaler=scaler,
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


def train_loop(model: HybridModel, optimizer: torch.optim.Optimizer, scheduler: OptimizerParamScheduler,
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
        stop = (exit_signal.received
                or (args.exit_interval and iteration % args.exit_interval == 0)
                or (args.exit_duration_in_mins and (time.time() - start) / 60 > args.exit_duration_in_mins))
        if args.save and ((args.save_interval and iteration % args.save_interval == 0) or stop
                          or iteration == train_iters):
            save_checkpoint(args.save, iteration, model, optimizer, scheduler, args, grad_scaler=scaler)
            log(f"saved checkpoint at iteration {iteration} to {args.save}")
        if stop:
            log(f"exiting at iteration {iteration}")
            break
    loop_seconds = time.perf_counter() - loop_start
    steps = max(iteration - first_iteration, 1)
    return {"train_loss": loss, "iteration": iteration, "tokens_per_second": steps * tokens_per_step / loop_seconds,
            "fraction_outside_forward_backward": 1.0 - timers["forward-backward"] / loop_seconds,
            **{f"seconds_{name}": value for name, value in timers.items()}}
