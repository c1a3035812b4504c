"""Convert a Hugging Face Llama 2 / 3 / 3.1 / 3.2 folder into an all-attention hybrid checkpoint.

Usage::

    python tools/checkpoint/llama_to_transformer.py --hf-dir Llama-3.2-1B --save-dir ckpt/llama32-1b \\
        [--target-tp-size 1] [--target-pp-size 1] [--dtype {bfloat16,float32,source}] [--report PATH]

Each Llama layer becomes an attention layer and an MLP layer (pattern ``*-*-...``); q/k/v are fused into Megatron's
grouped ``linear_qkv``, ``[gate; up]`` into ``linear_fc1``, RoPE keeps ``rope_theta`` and Llama 3.1's ``llama3``
scaling. The output is a legacy ``release`` checkpoint (iteration 0) at the target tensor / pipeline layout, with
the tokenizer copied to ``SAVE_DIR/tokenizer`` and the model arguments saved in it, so that::

    python tools/run_hybrid_text_generation_server.py --load SAVE_DIR --use-checkpoint-args

serves it. Tensors are read and converted one at a time (safetensors, sharded or not, or ``pytorch_model.bin``).

Before writing anything the conversion is validated: every source tensor must be consumed (or be a known leftover
such as a RoPE buffer), every shape must match ``config.json`` and the model, and the special-token ids of
``config.json`` / ``generation_config.json`` must match the tokenizer's. The report (``--report``, default
``SAVE_DIR/conversion_report.json``) lists all of it. A failed validation writes the report and no checkpoint and
exits with code 2; so does any other user error, printed as ``error: <one line>``. The checkpoint is written to a
temporary sibling folder renamed to ``--save-dir`` at the end: on any error nothing is left there.
"""

from __future__ import annotations

import os
import sys

# tools/checkpoint/inspect.py would shadow the standard library's ``inspect`` for every import below; the package
# is importable from a checkout without installing it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub

import argparse  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import NoReturn  # noqa: E402

from megatron.core.tensor_parallel.sharding import UnknownTensorError  # noqa: E402
from megatron.training.checkpoint_reshard import ReshardError  # noqa: E402
from megatron.training.hf_folder import HFFolderError  # noqa: E402
from megatron.training.llama_import import DTYPES, LlamaImportError, convert_llama, format_summary  # noqa: E402

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as one ``error:`` line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def fail(message: str) -> NoReturn:
    """Print ``error: <first line of message>`` to stderr and exit with code 2."""
    text = str(message).strip()
    print(f"error: {text.splitlines()[0] if text else 'failed'}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = _Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conversion; returns the exit code."""
    args = get_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        result = convert_llama(args.hf_dir, args.save_dir, tp=args.target_tp_size, pp=args.target_pp_size,
                               dtype=args.dtype, report_path=args.report, progress=progress,
                               allow_special_token_mismatch=args.allow_special_token_mismatch)
    except (LlamaImportError, HFFolderError, ReshardError, UnknownTensorError) as error:
        fail(str(error))
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_summary(result.report))
    print(f"report: {result.report_path}")
    if not result.written:
        print("error: validation failed; no checkpoint written", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"checkpoint: {result.save_dir} (release, tp {args.target_tp_size} x pp {args.target_pp_size}); tokenizer "
          f"in {result.report['target']['tokenizer_model'] or '(none)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
