"""Command lines of ``tools/checkpoint/llama_to_transformer.py`` and ``tools/checkpoint/llama_to_hybrid.py``.

Both read a Hugging Face Llama folder, validate and convert it (:func:`megatron.training.llama_import.convert_llama`);
the hybrid tool also chooses which layers become Mamba2 layers (``--attention-fraction``, ``--attention-layers`` or
``--hybrid-layer-pattern``). User errors print ``error: <one line>`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megatron.core.tensor_parallel.sharding import UnknownTensorError
from megatron.training.checkpoint_reshard import ReshardError
from megatron.training.cli import EXIT_USER_ERROR, fail
from megatron.training.cli import OneLineParser as _Parser
from megatron.training.hf_folder import HFFolder, HFFolderError
from megatron.training.llama_import import (
    DTYPES,
    LlamaImportError,
    check_hybrid_pattern,
    convert_llama,
    format_summary,
    hybrid_pattern,
    llama_spec,
)


def get_args(argv: Sequence[str] | None = None, hybrid: bool = False,
             description: str = "") -> argparse.Namespace:
    """Parse the command line (``hybrid``: with the options choosing the Mamba layers)."""
    parser = _Parser(description=description, allow_abbrev=False)
    parser.add_argument("--hf-dir", required=True,
                        help="Hugging Face Llama folder (config.json, weights, tokenizer files).")
    parser.add_argument("--save-dir", required=True, help="Checkpoint directory to write; must not exist or be empty.")
    parser.add_argument("--target-tp-size", type=int, default=1, help="Tensor-parallel size to write (default 1).")
    parser.add_argument("--target-pp-size", type=int, default=1, help="Pipeline-parallel size to write (default 1).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="source",
                        help="Dtype of the written tensors (default: source, the stored dtype).")
    parser.add_argument("--report", default=None,
                        help="Where to write the validation report (JSON); default SAVE_DIR/conversion_report.json.")
    parser.add_argument("--allow-special-token-mismatch", action="store_true",
                        help="Report bos/eos/pad ids that differ between config.json / generation_config.json and "
                             "the tokenizer as warnings instead of failing.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    if hybrid:
        parser.add_argument("--attention-fraction", type=float, default=None,
                            help="Fraction of the Llama layers that stay attention: layer i (0-based) stays when "
                                 "(i + 1) %% round(1 / fraction) == 0; 0 converts every layer.")
        parser.add_argument("--attention-layers", type=int, nargs="+", default=None,
                            help="0-based Llama layers that stay attention (the others become Mamba2).")
        parser.add_argument("--hybrid-layer-pattern", default=None,
                            help="The pattern itself, 'M-' or '*-' per Llama layer.")
        parser.add_argument("--seed", type=int, default=1234, help="Seed of the fresh Mamba parameters.")
        parser.add_argument("--mamba-version", type=int, choices=[1, 2], default=2,
                            help="Mamba2 (default: x <- v, B <- k, C <- q, out <- o) or Mamba1 (x <- v, out <- o; "
                                 "B and C come from x, so q and k are left unused).")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, hybrid: bool = False, description: str = "") -> int:
    """Run the conversion; returns the exit code."""
    args = get_args(argv, hybrid, description)
    progress = not args.no_progress and sys.stderr.isatty()
    pattern = None
    try:
        if hybrid:
            pattern = _pattern(args)
        result = convert_llama(args.hf_dir, args.save_dir, tp=args.target_tp_size, pp=args.target_pp_size,
                               dtype=args.dtype, report_path=args.report, progress=progress,
                               allow_special_token_mismatch=args.allow_special_token_mismatch, pattern=pattern,
                               seed=getattr(args, "seed", 1234), mamba_version=getattr(args, "mamba_version", 2))
    except (LlamaImportError, HFFolderError, ReshardError, UnknownTensorError) as error:
        fail(str(error))
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if pattern is not None:
        print(f"hybrid layer pattern: {pattern}")
    print(format_summary(result.report))
    print(f"report: {result.report_path}")
    if not result.written:
        print("error: validation failed; no checkpoint written", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"checkpoint: {result.save_dir} (release, tp {args.target_tp_size} x pp {args.target_pp_size}); tokenizer "
          f"in {result.report['target']['tokenizer_model'] or '(none)'}")
    return 0


def _pattern(args: argparse.Namespace) -> str:
    """The hybrid pattern the options ask for."""
    with HFFolder(args.hf_dir) as folder:
        layers = llama_spec(folder.config).num_layers
    if args.hybrid_layer_pattern is None:
        return hybrid_pattern(layers, args.attention_fraction, args.attention_layers)
    if args.attention_fraction is not None or args.attention_layers is not None:
        fail("give exactly one of --attention-fraction, --attention-layers or --hybrid-layer-pattern")
    check_hybrid_pattern(args.hybrid_layer_pattern, layers)
    return args.hybrid_layer_pattern
