"""Command-line arguments with Megatron-LM's flag names, types, defaults and meanings.

``parse_args`` builds the parser, parses and calls ``validate_args``, which fills in derived values (data-parallel
size, micro-batch count, the resolved hybrid layer pattern, default FFN / head sizes, ``params_dtype``, ...) and
rejects inconsistent settings with an :class:`ArgumentError` whose one-line message names the flag(s) at fault.
Flags that only tune GPU internals are accepted so that Megatron-LM command lines run unchanged; their help text says
what they do here.
"""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

import torch
import torch.nn.functional as F

from megatron.core.models.hybrid.hybrid_layer_allocation import (
    ATTENTION,
    MAMBA,
    MLP,
    pipeline_segments,
    resolve_hybrid_pattern,
    strip_stage_boundaries,
)
from megatron.core.transformer.transformer_config import TransformerConfig, squared_relu

# The tokenizers this framework ships (megatron/training/tokenizer/); Megatron's other types need files and code
# (BERT word pieces, GPT-2 BPE merges) that are not part of it.
TOKENIZER_TYPES = ("GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "TikTokenizer", "NullTokenizer")
TOKENIZERS_WITH_MODEL_FILE = ("GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "TikTokenizer")
CPU_NO_OP = "Accepted for Megatron-LM compatibility; no effect in this framework's CPU/torch code path."


class ArgumentError(ValueError):
    """An invalid command line; the message is one line naming the flag(s) at fault."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that raises :class:`ArgumentError` instead of printing usage and exiting, so that every
    command-line mistake surfaces as one line (``--help`` still prints and exits)."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(message)


def _add_network_size_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(title="network size")
    group.add_argument("--num-layers", type=int, default=None,
                       help="Number of layers (Mamba + attention + MLP); derived from --hybrid-layer-pattern if that "
                            "is given.")
    group.add_argument("--hidden-size", type=int, default=None, help="Transformer hidden size.")
    group.add_argument("--ffn-hidden-size", type=int, default=None,
                       help="MLP hidden size. Default 4 * hidden size; with --swiglu int((4 * hidden * 2 / 3) / 64) "
                            "* 64 as in Megatron-LM.")
    group.add_argument("--num-attention-heads", type=int, default=None,
                       help="Number of attention heads (required when the layer pattern has attention layers).")
    group.add_argument("--kv-channels", type=int, default=None,
                       help="Projection size per attention head. Default hidden size / number of heads.")
    group.add_argument("--group-query-attention", action="store_true", help="Use grouped-query attention.")
    group.add_argument("--num-query-groups", type=int, default=1,
                       help="Number of key/value head groups with --group-query-attention (otherwise one per head).")
    group.add_argument("--max-position-embeddings", type=int, default=None,
                       help="Longest sequence the position embeddings cover. Default --seq-length.")
    group.add_argument("--position-embedding-type", type=str, default="learned_absolute",
                       choices=["learned_absolute", "rope", "none"], help="Position embedding type.")
    group.add_argument("--rotary-base", type=int, default=10000, help="Base of the rotary position embeddings.")
    group.add_argument("--rotary-percent", type=float, default=1.0,
                       help="Fraction of each head's dimensions that rotary embeddings rotate.")
    group.add_argument("--use-rope-scaling", action="store_true",
                       help="Apply Llama 3.1's RoPE frequency scaling (the --rope-scaling-* values).")
    group.add_argument("--rope-scaling-factor", type=float, default=8.0,
                       help="RoPE scaling: low frequencies are divided by this (with --use-rope-scaling).")
    group.add_argument("--rope-scaling-low-freq-factor", type=float, default=1.0,
                       help="RoPE scaling: wavelengths above original length / this are fully scaled.")
    group.add_argument("--rope-scaling-high-freq-factor", type=float, default=4.0,
                       help="RoPE scaling: wavelengths below original length / this are kept.")
    group.add_argument("--rope-scaling-original-max-position-embeddings", type=int, default=8192,
                       help="RoPE scaling: the context length the model was pretrained with.")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="Pad the vocabulary to a multiple of this (times the tensor-parallel size).")
    group.add_argument("--normalization", type=str, default="LayerNorm", choices=["LayerNorm", "RMSNorm"],
                       help="Normalization layer type.")
    group.add_argument("--norm-epsilon", type=float, default=1e-5, help="Epsilon of the normalization layers.")
    group.add_argument("--swiglu", action="store_true", help="Use the gated SwiGLU MLP (SiLU gate).")
    group.add_argument("--squared-relu", action="store_true", help="Use squared ReLU as the MLP activation.")
    group.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                       help="Give the output layer its own weights instead of sharing the input embedding.")
    group.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear",
                       help="Disable the biases of the linear layers (stored as args.add_bias_linear = False).")
    group.add_argument("--add-qkv-bias", action="store_true", help="Add a bias to the QKV projection only.")
    group.add_argument("--is-hybrid-model", action="store_true",
                       help="Accepted for Megatron-LM compatibility; every model built here is hybrid.")
    group.add_argument("--hybrid-attention-ratio", type=float, default=0.0,
                       help="Fraction of layers that are self-attention ('*'), in [0, 1].")
    group.add_argument("--hybrid-mlp-ratio", type=float, default=0.0,
                       help="Fraction of layers that are MLPs ('-'), in [0, 1].")
    group.add_argument("--hybrid-override-pattern", type=str, default=None,
                       help="Layer pattern of --num-layers symbols (M Mamba, * attention, - MLP) that replaces the "
                            "ratio pattern; must agree with non-zero ratios.")
    group.add_argument("--hybrid-layer-pattern", type=str, default=None,
                       help="Layer pattern, optionally with '|' pipeline-stage boundaries; --num-layers is derived "
                            "from it. After validation args.hybrid_layer_pattern holds the resolved pattern however "
                            "it was given.")
    group.add_argument("--mamba-state-dim", type=int, default=128, help="State dimension of the Mamba layers.")
    group.add_argument("--mamba-head-dim", type=int, default=64, help="Head dimension of the Mamba2 layers.")
    group.add_argument("--mamba-num-groups", type=int, default=8, help="Number of B/C groups of the Mamba2 layers.")
    group.add_argument("--mamba-kv-groups", type=int, default=None,
                       help="Mamba2 layers converted from GQA attention: x and B come in this many groups, repeated "
                            "to all heads (x) and C groups (B). Default: x per head, B per group.")
    group.add_argument("--mamba-num-heads", type=int, default=None,
                       help="Number of Mamba2 heads. Default 2 * hidden size / --mamba-head-dim.")
    group.add_argument("--mamba-version", type=int, default=2, choices=[1, 2], help="Mamba layer version.")
    group.add_argument("--mamba-expand", type=int, default=2,
                       help="Mamba1 inner width as a multiple of --hidden-size (Mamba2 sizes come from its heads).")


def _add_regularization_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(title="regularization and optimizer")
    group.add_argument("--attention-dropout", type=float, default=0.1, help="Dropout on the attention probabilities.")
    group.add_argument("--hidden-dropout", type=float, default=0.1, help="Dropout on the residual branches.")
    group.add_argument("--weight-decay", type=float, default=0.01,
                       help="Weight decay (decoupled, AdamW) for --weight-decay-incr-style constant.")
    group.add_argument("--start-weight-decay", type=float, default=None,
                       help="Weight decay at the start of a linear / cosine weight-decay ramp.")
    group.add_argument("--end-weight-decay", type=float, default=None,
                       help="Weight decay at the end of a linear / cosine weight-decay ramp.")
    group.add_argument("--weight-decay-incr-style", type=str, default="constant",
                       choices=["constant", "linear", "cosine"], help="Weight-decay ramp over the training run.")
    group.add_argument("--clip-grad", type=float, default=1.0, help="Clip the global gradient L2 norm to this "
                       "(0 disables clipping).")
    group.add_argument("--optimizer", type=str, default="adam", choices=["adam"],
                       help="Optimizer: AdamW (torch's fused kernel on GPU).")
    group.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    group.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2.")
    group.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon.")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(title="training")
    group.add_argument("--micro-batch-size", type=int, default=None, help="Samples per forward/backward pass.")
    group.add_argument("--global-batch-size", type=int, default=None,
                       help="Samples per optimizer step; a multiple of micro batch size * data-parallel size. "
                            "Default micro batch size * data-parallel size.")
    group.add_argument("--train-iters", type=int, default=None, help="Training iterations (or --train-samples).")
    group.add_argument("--train-samples", type=int, default=None, help="Training samples (or --train-iters).")
    group.add_argument("--exit-interval", type=int, default=None,
                       help="Save a checkpoint and exit when the iteration is a multiple of this.")
    group.add_argument("--exit-duration-in-mins", type=float, default=None,
                       help="Save a checkpoint and exit after this many minutes of training.")
    group.add_argument("--exit-signal-handler", action="store_true",
                       help="On SIGTERM, save a checkpoint and exit cleanly.")
    group.add_argument("--skip-train", action="store_true",
                       help="Do not train: evaluate the (loaded) model on the validation split and exit.")
    group.add_argument("--use-mcore-models", action="store_true",
                       help="Accepted for Megatron-LM compatibility; the models here are always Megatron-core style.")
    group.add_argument("--spec", type=str, nargs="*", default=None,
                       help="Accepted for Megatron-LM compatibility (module and name of a layer spec); unused, the "
                            "layer pattern decides the layers.")
    group.add_argument("--init-method-std", type=float, default=0.02,
                       help="Standard deviation of the normal weight initialisation.")
    group.add_argument("--seed", type=int, default=1234, help="Random seed (weights, dropout, data order).")


def _add_learning_rate_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(title="learning rate")
    group.add_argument("--lr", type=float, default=None, help="Peak learning rate (after warmup).")
    group.add_argument("--min-lr", type=float, default=0.0, help="Learning rate at the end of the decay.")
    group.add_argument("--lr-decay-style", type=str, default="linear",
                       choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                       help="Learning-rate decay after warmup.")
    group.add_argument("--lr-wsd-decay-style", type=str, default="exponential",
                       choices=["exponential", "linear", "cosine", "minus_sqrt"],
                       help="Annealing shape of the last phase of --lr-decay-style WSD.")
    group.add_argument("--lr-decay-iters", type=int, default=None,
                       help="Iterations over which the learning rate decays (default --train-iters).")
    group.add_argument("--lr-decay-samples", type=int, default=None,
                       help="Samples over which the learning rate decays (default --train-samples).")
    group.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                       help="Iterations of the WSD annealing phase (with --train-iters).")
    group.add_argument("--lr-wsd-decay-samples", type=int, default=None,
                       help="Samples of the WSD annealing phase (with --train-samples).")
    group.add_argument("--lr-warmup-fraction", type=float, default=None,
                       help="Warmup as a fraction of the decay length (instead of --lr-warmup-iters/-samples).")
    group.add_argument("--lr-warmup-iters", type=int, default=0, help="Linear warmup iterations.")
    group.add_argument("--lr-warmup-samples", type=int, default=0, help="Linear warmup samples.")
    group.add_argument("--lr-warmup-init", type=float, default=0.0, help="Learning rate at the start of warmup.")


def _add_checkpointing_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(title="checkpointing")
    group.add_argument("--save", type=str, default=None, help="Directory to save checkpoints to.")
    group.add_argument("--save-interval", type=int, default=None, help="Iterations between checkpoint saves.")
    group.add_argument("--no-save-optim", action="store_true", default=None,
                       help="Do not save the optimizer state.")
    group.add_argument("--no-save-rng", action="store_true", default=None, help="Do not save the RNG states.")
    group.add_argument("--load", type=str, default=None,
                       help="Directory to resume from (a directory without a checkpoint starts from scratch).")
    group.add_argument("--no-load-optim", action="store_true", default=None,
                       help="Do not load the optimizer state when resuming.")
    group.add_argument("--no-load-rng", action="store_true", default=None,
                       help="Do not load the RNG states when resuming.")
    group.add_argument("--finetune", action="store_true",
                       help="Load model weights only and start at iteration 0 (no optimizer, RNG or data position).")
    group.add_argument("--use-checkpoint-args", action="store_true",
                       help="Take the model architecture (and the tokenizer, when not given) from the --load "
                            "checkpoint's saved arguments; flags given on the command line must agree with it.")


def _add_mixed_precision_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(title="mixed precision")
    group.add_argument("--fp16", action="store_true", help="Run in float16 (autocast) with dynamic loss scaling.")
    group.add_argument("--bf16", action="store_true", help="Run in bfloat16 (autocast).")
    group.add_argument("--loss-scale", type=float, default=None,
                       help="Static loss scale for --fp16 (default: dynamic loss scaling).")
    group.add_argument("--initial-loss-scale", type=float, default=2.0**32,
                       help="Initial dynamic loss scale for --fp16.")
    group.add_argument("--min-loss-scale", type=float, default=1.0, help="Minimum dynamic loss scale for --fp16.")
    group.add_argument("--loss-scale-window", type=float, default=1000,
                       help="Iterations without overflow before the dynamic loss scale grows.")
    group.add_argument("--hysteresis", type=int, default=2, help="Overflows tolerated before the loss scale shrinks.")


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(title="distributed")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Tensor model-parallel size.")
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Pipeline model-parallel size.")
    group.add_argument("--sequence-parallel", action="store_true",
                       help="Sequence parallelism for the norms and dropouts (only with tensor parallelism; turned "
                            "off when --tensor-model-parallel-size is 1).")
    group.add_argument("--distributed-backend", type=str, default="nccl", choices=["nccl", "gloo"],
                       help="torch.distributed backend; nccl becomes gloo when CUDA is not available.")
    group.add_argument("--distributed-timeout-minutes", type=int, default=10,
                       help="Timeout of torch.distributed collectives, in minutes.")
    group.add_argument("--use-distributed-optimizer", action="store_true",
                       help="Shard the optimizer state over data-parallel ranks (ZeRO-1); the checkpoint holds it "
                            "gathered, so it loads at any data-parallel size.")
    group.add_argument("--overlap-grad-reduce", action="store_true",
                       help="Reduce gradients over data-parallel ranks in buckets during the backward pass (torch "
                            "DDP) instead of once after it.")
    group.add_argument("--overlap-param-gather", action="store_true",
                       help="Overlap the parameter all-gather with the forward pass. " + CPU_NO_OP)
    group.add_argument("--local-rank", type=int, default=int(os.getenv("LOCAL_RANK", "0")),
                       help="Local rank, passed by old launchers (torchrun sets LOCAL_RANK instead).")


def _add_validation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(title="validation")
    group.add_argument("--eval-iters", type=int, default=100, help="Batches per evaluation (0 disables it).")
    group.add_argument("--eval-interval", type=int, default=1000, help="Iterations between evaluations.")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(title="data and tokenizer")
    group.add_argument("--data-path", nargs="*", default=None,
                       help="Indexed dataset prefix(es) (PREFIX.bin / PREFIX.idx), or weighted blend "
                            "'W1 PREFIX1 W2 PREFIX2 ...'.")
    group.add_argument("--split", type=str, default="969, 30, 1",
                       help="Comma-separated train, validation, test proportions, e.g. '99,1,0'.")
    group.add_argument("--data-cache-path", type=str, default=None, help="Directory for the dataset index caches.")
    group.add_argument("--mock-data", action="store_true", help="Train on synthetic data (no --data-path).")
    group.add_argument("--seq-length", type=int, default=None, help="Tokens per training sample.")
    group.add_argument("--num-workers", type=int, default=2, help="Data-loader worker processes.")
    group.add_argument("--no-create-attention-mask-in-dataloader", action="store_false",
                       dest="create_attention_mask_in_dataloader",
                       help="Do not build attention masks in the data loader (attention here is always causal, so "
                            "no mask is built either way).")
    group.add_argument("--tokenizer-type", type=str, default=None, choices=list(TOKENIZER_TYPES),
                       help="Tokenizer type.")
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="Tokenizer file or folder (SentencePiece .model, tokenizer.json or its folder, "
                            ".tiktoken file).")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="Vocabulary size for NullTokenizer (and an optional cap for TikTokenizer).")
    group.add_argument("--tiktoken-pattern", type=str, default=None, help="TikTokenizer pre-tokenization pattern.")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                       help="Number of special tokens of TikTokenizer.")
    group.add_argument("--tiktoken-special-tokens", type=str, nargs="+", default=None,
                       help="Special tokens of TikTokenizer.")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(title="logging")
    group.add_argument("--log-interval", type=int, default=100, help="Iterations between log lines.")
    group.add_argument("--tensorboard-dir", type=str, default=None, help="Write TensorBoard scalars here.")
    group.add_argument("--wandb-project", type=str, default="", help="Weights & Biases project (empty: off).")
    group.add_argument("--wandb-exp-name", type=str, default="", help="Weights & Biases run name.")
    group.add_argument("--wandb-save-dir", type=str, default="", help="Weights & Biases local directory.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every flag (no validation); ``parse_args`` is the usual entry point."""
    parser = _Parser(description="Megatron-style hybrid Mamba / attention / MLP language model arguments",
                     allow_abbrev=False)
    for add in (_add_network_size_args, _add_regularization_args, _add_training_args, _add_learning_rate_args,
                _add_checkpointing_args, _add_mixed_precision_args, _add_distributed_args, _add_validation_args,
                _add_data_args, _add_logging_args):
        add(parser)
    return parser


def parse_args(argv: list[str] | None = None, ignore_unknown_args: bool = False, *,
               training: bool = True) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) and validate it with :func:`validate_args`.

    ``ignore_unknown_args`` skips flags this parser does not know (as Megatron's ``parse_known_args`` mode).
    ``training=False`` (for serving / evaluation tools) skips the checks that only training needs. With
    ``--use-checkpoint-args`` the model-defining arguments come from the ``--load`` checkpoint.
    Raises :class:`ArgumentError` with a one-line message for any invalid command line (``CheckpointError`` for an
    unreadable checkpoint).
    """
    parser = build_parser()
    if ignore_unknown_args:
        args, _ = parser.parse_known_args(argv)
    else:
        args = parser.parse_args(argv)
    if args.use_checkpoint_args:
        if args.load is None:
            _fail("--use-checkpoint-args needs --load: the checkpoint whose model arguments to use")
        from megatron.training.checkpoint_args import apply_checkpoint_args, explicit_flags, read_checkpoint_args

        apply_checkpoint_args(args, read_checkpoint_args(args.load), explicit_flags(build_parser, argv))
    return validate_args(args, training=training)


def _fail(message: str) -> NoReturn:
    raise ArgumentError(message)


def _require(condition: bool, message: str) -> None:
    if not condition:
        _fail(message)


def _env_int(name: str, default: int) -> int:
    value = os.getenv(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        _fail(f"environment variable {name}={value!r} is not an integer")


def _check_writable_dir(path: str, flag: str) -> None:
    """A directory that exists and is writable, or can be created: its nearest existing ancestor is writable."""
    if os.path.exists(path):
        _require(os.path.isdir(path), f"{flag} {path!r} exists and is not a directory")
        _require(os.access(path, os.W_OK | os.X_OK), f"{flag} {path!r} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    _require(os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK),
             f"{flag} {path!r} cannot be created: {parent!r} is not a writable directory")


def _validate_parallelism(args: argparse.Namespace) -> None:
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:  # torchrun, or a single process
        args.rank, args.world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    else:  # srun python ... (one task per device)
        args.rank, args.world_size = _env_int("SLURM_PROCID", 0), _env_int("SLURM_NTASKS", 1)
    _require(args.world_size >= 1, f"WORLD_SIZE must be >= 1, got {args.world_size}")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    _require(tp >= 1, f"--tensor-model-parallel-size must be >= 1, got {tp}")
    _require(pp >= 1, f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    _require(args.world_size % (tp * pp) == 0,
             f"world size {args.world_size} is not divisible by --tensor-model-parallel-size {tp} x "
             f"--pipeline-model-parallel-size {pp}")
    args.data_parallel_size = args.world_size // (tp * pp)
    if tp == 1:
        args.sequence_parallel = False  # as in Megatron: nothing to split without tensor parallelism
    if args.distributed_backend == "nccl" and not torch.cuda.is_available():
        args.distributed_backend = "gloo"
    _require(args.distributed_timeout_minutes > 0,
             f"--distributed-timeout-minutes must be positive, got {args.distributed_timeout_minutes}")


def _validate_batch(args: argparse.Namespace, training: bool) -> None:
    if args.micro_batch_size is None:
        _require(not training, "--micro-batch-size is required")
        args.micro_batch_size = 1
    _require(args.micro_batch_size > 0, f"--micro-batch-size must be positive, got {args.micro_batch_size}")
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    _require(args.global_batch_size > 0, f"--global-batch-size must be positive, got {args.global_batch_size}")
    _require(args.global_batch_size % per_step == 0,
             f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
             f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    args.num_microbatches = args.global_batch_size // per_step


def _validate_schedule(args: argparse.Namespace, training: bool) -> None:
    _require(args.train_iters is None or args.train_samples is None,
             "give either --train-iters or --train-samples, not both")
    for flag in ("train_iters", "train_samples", "lr_decay_iters", "lr_decay_samples", "lr_wsd_decay_iters",
                 "lr_wsd_decay_samples"):
        value = getattr(args, flag)
        _require(value is None or value > 0, f"--{flag.replace('_', '-')} must be positive, got {value}")
    for flag in ("lr_warmup_iters", "lr_warmup_samples"):
        value = getattr(args, flag)
        _require(value >= 0, f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    if args.lr_warmup_fraction is not None:
        _require(0.0 <= args.lr_warmup_fraction < 1.0,
                 f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
        _require(args.lr_warmup_iters == 0 and args.lr_warmup_samples == 0,
                 "give either --lr-warmup-fraction or --lr-warmup-iters/--lr-warmup-samples, not both")

    by_iters = args.train_iters is not None
    by_samples = args.train_samples is not None
    if training and not args.skip_train:
        _require(by_iters or by_samples, "one of --train-iters or --train-samples is required")
    if by_iters or by_samples:
        unit, other = ("iters", "samples") if by_iters else ("samples", "iters")
        train_flag = f"--train-{unit}"
        for name in ("lr_decay", "lr_warmup", "lr_wsd_decay"):
            value = getattr(args, f"{name}_{other}")
            _require(value is None or value == 0,
                     f"--{name.replace('_', '-')}-{other} cannot be used with {train_flag}; "
                     f"use --{name.replace('_', '-')}-{unit}")
        decay = getattr(args, f"lr_decay_{unit}") or getattr(args, f"train_{unit}")
        warmup = getattr(args, f"lr_warmup_{unit}")
        if args.lr_warmup_fraction is not None:
            warmup = int(args.lr_warmup_fraction * decay)
        _require(warmup < decay,
                 f"--lr-warmup-{unit} ({warmup}) must be smaller than the decay length ({decay}, "
                 f"--lr-decay-{unit} or {train_flag})")
        if args.lr_decay_style == "WSD":
            wsd = getattr(args, f"lr_wsd_decay_{unit}")
            _require(wsd is not None, f"--lr-decay-style WSD needs --lr-wsd-decay-{unit}")
            _require(wsd <= decay - warmup,
                     f"--lr-wsd-decay-{unit} ({wsd}) must not exceed the decay length after warmup "
                     f"({decay - warmup})")

    if training and not args.skip_train:
        _require(args.lr is not None, "--lr is required for training")
    if args.lr is not None:
        _require(args.lr >= 0.0, f"--lr must be >= 0, got {args.lr}")
        _require(0.0 <= args.min_lr <= args.lr, f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}]")
    else:
        _require(args.min_lr >= 0.0, f"--min-lr must be >= 0, got {args.min_lr}")
    _require(0.0 <= args.lr_warmup_init <= (args.lr if args.lr is not None else float("inf")),
             f"--lr-warmup-init {args.lr_warmup_init} must be in [0, --lr]")

    _require(args.weight_decay >= 0.0, f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.weight_decay_incr_style == "constant":
        _require(args.start_weight_decay is None and args.end_weight_decay is None,
                 "--start-weight-decay/--end-weight-decay need --weight-decay-incr-style linear or cosine")
        args.start_weight_decay = args.end_weight_decay = args.weight_decay
    else:
        _require(args.start_weight_decay is not None and args.end_weight_decay is not None,
                 f"--weight-decay-incr-style {args.weight_decay_incr_style} needs --start-weight-decay and "
                 "--end-weight-decay")
        _require(0.0 <= args.start_weight_decay <= args.end_weight_decay,
                 f"need 0 <= --start-weight-decay ({args.start_weight_decay}) <= --end-weight-decay "
                 f"({args.end_weight_decay})")
    _require(args.clip_grad >= 0.0, f"--clip-grad must be >= 0, got {args.clip_grad}")
    for flag in ("adam_beta1", "adam_beta2"):
        value = getattr(args, flag)
        _require(0.0 <= value < 1.0, f"--{flag.replace('_', '-')} must be in [0, 1), got {value}")
    _require(args.adam_eps > 0.0, f"--adam-eps must be positive, got {args.adam_eps}")


def _validate_pattern(args: argparse.Namespace) -> None:
    for flag in ("hybrid_attention_ratio", "hybrid_mlp_ratio"):
        value = getattr(args, flag)
        _require(0.0 <= value <= 1.0, f"--{flag.replace('_', '-')} must be in [0, 1], got {value}")
    _require(args.hybrid_attention_ratio + args.hybrid_mlp_ratio <= 1.0,
             f"--hybrid-attention-ratio + --hybrid-mlp-ratio must be <= 1, got {args.hybrid_attention_ratio} + "
             f"{args.hybrid_mlp_ratio}")
    if args.hybrid_layer_pattern is not None:
        flag = "--hybrid-layer-pattern"
        _require(args.hybrid_override_pattern is None,
                 "give either --hybrid-layer-pattern or --hybrid-override-pattern, not both")
    elif args.hybrid_override_pattern is not None:
        flag = "--hybrid-override-pattern"
    else:
        flag = "--num-layers"
        _require(args.num_layers is not None, "--num-layers is required (or give --hybrid-layer-pattern)")
    _require(args.num_layers is None or args.num_layers > 0, f"--num-layers must be positive, got {args.num_layers}")
    try:
        pattern = resolve_hybrid_pattern(
            num_layers=args.num_layers, attention_ratio=args.hybrid_attention_ratio,
            mlp_ratio=args.hybrid_mlp_ratio, override_pattern=args.hybrid_override_pattern,
            layer_pattern=args.hybrid_layer_pattern,
        )
    except ValueError as error:
        _fail(f"{flag}: {error}")
    pp = args.pipeline_model_parallel_size
    try:
        segments = pipeline_segments(pattern, pp)
    except ValueError as error:
        _fail(f"--pipeline-model-parallel-size {pp}: {error}")
    # More '|' segments than stages: each rank holds several model chunks (the interleaved schedule). Without
    # pipelining the '|' marks are ignored.
    args.virtual_pipeline_model_parallel_size = len(segments) // pp if pp > 1 and len(segments) > pp else None
    args.hybrid_layer_pattern = pattern
    args.num_layers = len(strip_stage_boundaries(pattern))


def _validate_model(args: argparse.Namespace) -> None:
    pattern = args.hybrid_layer_pattern
    tp = args.tensor_model_parallel_size
    _require(args.hidden_size is not None, "--hidden-size is required")
    _require(args.hidden_size > 0, f"--hidden-size must be positive, got {args.hidden_size}")
    _require(not (args.swiglu and args.squared_relu), "--swiglu and --squared-relu cannot be used together")

    if args.ffn_hidden_size is None:
        if args.swiglu:
            # Megatron keeps the gated MLP's parameter count near that of a 4h MLP, rounded down to 64.
            args.ffn_hidden_size = int((4 * args.hidden_size * 2 / 3) / 64) * 64
            _require(args.ffn_hidden_size > 0,
                     f"--swiglu with --hidden-size {args.hidden_size} gives a default FFN size of 0 "
                     "(int(8 * hidden / 3 / 64) * 64); set --ffn-hidden-size")
        else:
            args.ffn_hidden_size = 4 * args.hidden_size
    _require(args.ffn_hidden_size > 0, f"--ffn-hidden-size must be positive, got {args.ffn_hidden_size}")

    if args.num_attention_heads is None:
        _require(ATTENTION not in pattern,
                 "--num-attention-heads is required: the layer pattern has attention layers ('*')")
        args.num_attention_heads = 0
    heads = args.num_attention_heads
    _require(heads >= 0, f"--num-attention-heads must not be negative, got {heads}")
    if heads > 0:
        if args.kv_channels is None:
            _require(args.hidden_size % heads == 0,
                     f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {heads}; "
                     "set --kv-channels")
            args.kv_channels = args.hidden_size // heads
        _require(args.kv_channels > 0, f"--kv-channels must be positive, got {args.kv_channels}")
        if args.group_query_attention:
            groups = args.num_query_groups
            _require(groups > 0 and heads % groups == 0,
                     f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}")
        else:
            args.num_query_groups = heads
        if ATTENTION in pattern:
            _require(heads % tp == 0,
                     f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp}")
            _require(args.num_query_groups % tp == 0,
                     f"--num-query-groups {args.num_query_groups} is not divisible by "
                     f"--tensor-model-parallel-size {tp}")
    elif not args.group_query_attention:
        args.num_query_groups = 0

    if MLP in pattern:
        _require(args.ffn_hidden_size % tp == 0,
                 f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    if MAMBA in pattern and args.mamba_version == 1:
        inner = args.mamba_expand * args.hidden_size
        _require(args.mamba_expand > 0, f"--mamba-expand must be positive, got {args.mamba_expand}")
        _require(inner % tp == 0, f"Mamba1 inner width {inner} is not divisible by --tensor-model-parallel-size {tp}")
    for flag in ("mamba_state_dim", "mamba_head_dim", "mamba_num_groups"):
        value = getattr(args, flag)
        _require(value > 0, f"--{flag.replace('_', '-')} must be positive, got {value}")
    _require(args.mamba_num_heads is None or args.mamba_num_heads > 0,
             f"--mamba-num-heads must be positive, got {args.mamba_num_heads}")
    if MAMBA in pattern and args.mamba_version == 2:
        d_inner = (args.mamba_num_heads * args.mamba_head_dim if args.mamba_num_heads is not None
                   else 2 * args.hidden_size)
        _require(d_inner % args.mamba_head_dim == 0,
                 f"Mamba inner width {d_inner} (2 x --hidden-size) is not divisible by --mamba-head-dim "
                 f"{args.mamba_head_dim}")
        nheads = d_inner // args.mamba_head_dim
        _require(nheads % args.mamba_num_groups == 0,
                 f"Mamba head count {nheads} is not divisible by --mamba-num-groups {args.mamba_num_groups}")
        kv = args.mamba_kv_groups
        _require(kv is None or (kv > 0 and args.mamba_num_groups % kv == 0 and kv % tp == 0),
                 f"--mamba-kv-groups {kv} must divide --mamba-num-groups {args.mamba_num_groups} and be divisible "
                 f"by --tensor-model-parallel-size {tp}")
        _require(nheads % tp == 0 and args.mamba_num_groups % tp == 0,
                 f"Mamba heads ({nheads}) and --mamba-num-groups ({args.mamba_num_groups}) must be divisible by "
                 f"--tensor-model-parallel-size {tp}")

    for flag in ("hidden_dropout", "attention_dropout"):
        value = getattr(args, flag)
        _require(0.0 <= value < 1.0, f"--{flag.replace('_', '-')} must be in [0, 1), got {value}")
    _require(args.init_method_std > 0.0, f"--init-method-std must be positive, got {args.init_method_std}")
    _require(args.norm_epsilon > 0.0, f"--norm-epsilon must be positive, got {args.norm_epsilon}")
    _require(0.0 < args.rotary_percent <= 1.0, f"--rotary-percent must be in (0, 1], got {args.rotary_percent}")
    _require(args.rotary_base > 0, f"--rotary-base must be positive, got {args.rotary_base}")
    if args.use_rope_scaling:
        _require(args.position_embedding_type == "rope", "--use-rope-scaling needs --position-embedding-type rope")
        for flag in ("rope_scaling_factor", "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor",
                     "rope_scaling_original_max_position_embeddings"):
            _require(getattr(args, flag) > 0, f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
        _require(args.rope_scaling_high_freq_factor > args.rope_scaling_low_freq_factor,
                 f"--rope-scaling-high-freq-factor {args.rope_scaling_high_freq_factor} must be greater than "
                 f"--rope-scaling-low-freq-factor {args.rope_scaling_low_freq_factor}")
    _require(args.make_vocab_size_divisible_by > 0,
             f"--make-vocab-size-divisible-by must be positive, got {args.make_vocab_size_divisible_by}")

    _require(not (args.bf16 and args.fp16), "--bf16 and --fp16 cannot be used together")
    args.params_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    _require(args.loss_scale is None or args.loss_scale > 0, f"--loss-scale must be positive, got {args.loss_scale}")
    _require(args.initial_loss_scale > 0, f"--initial-loss-scale must be positive, got {args.initial_loss_scale}")


def _validate_sequence(args: argparse.Namespace, training: bool) -> None:
    if args.seq_length is None:
        _require(not training, "--seq-length is required")
    else:
        _require(args.seq_length > 0, f"--seq-length must be positive, got {args.seq_length}")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    _require(args.max_position_embeddings is not None,
             "--max-position-embeddings (or --seq-length) is required")
    _require(args.max_position_embeddings > 0,
             f"--max-position-embeddings must be positive, got {args.max_position_embeddings}")
    if args.sequence_parallel and args.seq_length is not None:
        _require(args.seq_length % args.tensor_model_parallel_size == 0,
                 f"--sequence-parallel: --seq-length {args.seq_length} is not divisible by "
                 f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
    if args.seq_length is not None and args.position_embedding_type == "learned_absolute":
        _require(args.seq_length <= args.max_position_embeddings,
                 f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                 f"{args.max_position_embeddings} (learned absolute position embeddings)")


def _validate_data(args: argparse.Namespace, training: bool) -> None:
    if args.tokenizer_type is None:
        _require(args.vocab_size is not None, "--tokenizer-type is required (one of " + ", ".join(TOKENIZER_TYPES)
                 + ")")
    elif args.tokenizer_type == "NullTokenizer":
        _require(args.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size")
    elif args.tokenizer_type in TOKENIZERS_WITH_MODEL_FILE:
        _require(args.tokenizer_model is not None, f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
    _require(args.vocab_size is None or args.vocab_size > 0, f"--vocab-size must be positive, got {args.vocab_size}")

    if training and not args.skip_train:
        _require(args.mock_data or bool(args.data_path), "--data-path (or --mock-data) is required for training")
    _require(not (args.mock_data and args.data_path), "give either --mock-data or --data-path, not both")
    parts = [part.strip() for part in args.split.replace("/", ",").split(",")]
    try:
        weights = [float(part) for part in parts]
    except ValueError:
        _fail(f"--split {args.split!r} must be up to three comma-separated numbers, e.g. '99,1,0'")
    _require(1 <= len(weights) <= 3 and all(w >= 0 for w in weights) and sum(weights) > 0,
             f"--split {args.split!r} must be up to three non-negative numbers with a positive sum")
    _require(args.num_workers >= 0, f"--num-workers must be >= 0, got {args.num_workers}")

    for flag in ("log_interval", "eval_interval", "save_interval", "exit_interval"):
        value = getattr(args, flag)
        _require(value is None or value > 0, f"--{flag.replace('_', '-')} must be positive, got {value}")
    _require(args.eval_iters >= 0, f"--eval-iters must be >= 0, got {args.eval_iters}")
    _require(args.exit_duration_in_mins is None or args.exit_duration_in_mins > 0,
             f"--exit-duration-in-mins must be positive, got {args.exit_duration_in_mins}")
    for flag, path in (("--save", args.save), ("--data-cache-path", args.data_cache_path),
                       ("--tensorboard-dir", args.tensorboard_dir)):
        if path:
            _check_writable_dir(path, flag)


def validate_args(args: argparse.Namespace, *, training: bool = True) -> argparse.Namespace:
    """Check ``args`` and fill in derived values, in place; returns ``args``.

    Derives ``rank`` / ``world_size`` (env ``RANK`` / ``WORLD_SIZE``), ``data_parallel_size``, ``global_batch_size``
    (default micro batch x data-parallel size), ``num_microbatches``, the resolved ``hybrid_layer_pattern`` and
    ``num_layers``, ``ffn_hidden_size``, ``kv_channels``, ``num_query_groups``, ``max_position_embeddings``,
    ``start/end_weight_decay``, ``params_dtype`` and the backend (gloo without CUDA). ``training=False`` skips the
    requirements only a training run has (iterations, ``--lr``, data, ``--seq-length``, ``--micro-batch-size``).
    Raises :class:`ArgumentError` naming the flag(s) at fault.
    """
    # The flag-named spellings of Megatron's store_false flags, for code that reads them under those names.
    args.disable_bias_linear = not args.add_bias_linear
    args.no_create_attention_mask_in_dataloader = not args.create_attention_mask_in_dataloader
    _validate_parallelism(args)
    _validate_batch(args, training)
    _validate_schedule(args, training)
    _validate_pattern(args)
    _validate_model(args)
    _validate_sequence(args, training)
    _validate_data(args, training)
    core_transformer_config_from_args(args)  # any inconsistency left surfaces here, before anything runs
    return args


def rope_scaling_from_args(args: argparse.Namespace) -> dict | None:
    """The Llama 3.1 ``rope_scaling`` dict of ``--use-rope-scaling`` (None without it, or for args that predate it)."""
    if not getattr(args, "use_rope_scaling", False):
        return None
    return {"rope_type": "llama3", "factor": args.rope_scaling_factor,
            "low_freq_factor": args.rope_scaling_low_freq_factor,
            "high_freq_factor": args.rope_scaling_high_freq_factor,
            "original_max_position_embeddings": args.rope_scaling_original_max_position_embeddings}


def core_transformer_config_from_args(args: argparse.Namespace) -> TransformerConfig:
    """The :class:`TransformerConfig` that validated ``args`` describe (activation GELU, or gated SiLU for
    ``--swiglu``, or squared ReLU for ``--squared-relu``). Raises :class:`ArgumentError` if the config rejects them."""
    if args.swiglu:
        activation, gated = F.silu, True
    elif args.squared_relu:
        activation, gated = squared_relu, False
    else:
        activation, gated = F.gelu, False
    heads = args.num_attention_heads or 0
    try:
        return TransformerConfig(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_attention_heads=heads,
            num_query_groups=args.num_query_groups if heads > 0 else None,
            kv_channels=args.kv_channels if heads > 0 else None,
            ffn_hidden_size=args.ffn_hidden_size,
            normalization=args.normalization,
            layernorm_epsilon=args.norm_epsilon,
            add_bias_linear=args.add_bias_linear,
            add_qkv_bias=args.add_qkv_bias,
            gated_linear_unit=gated,
            activation_func=activation,
            hidden_dropout=args.hidden_dropout,
            attention_dropout=args.attention_dropout,
            init_method_std=args.init_method_std,
            params_dtype=args.params_dtype,
            mamba_version=args.mamba_version,
            mamba_expand=args.mamba_expand,
            mamba_state_dim=args.mamba_state_dim,
            mamba_head_dim=args.mamba_head_dim,
            mamba_num_groups=args.mamba_num_groups,
            mamba_kv_groups=args.mamba_kv_groups,
            mamba_num_heads=args.mamba_num_heads,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            sequence_parallel=args.sequence_parallel,
        )
    except ValueError as error:
        raise ArgumentError(str(error)) from None
