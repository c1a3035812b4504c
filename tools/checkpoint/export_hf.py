"""Export a hybrid checkpoint (Megatron's legacy layout, any tensor / pipeline layout) to a Hugging Face folder.

Usage::

    python tools/checkpoint/export_hf.py --load-dir ckpt/tp2pp2 --save-dir hf/my-model \\
        [--target {auto,llama,nemotron_h,mamba2}] [--dtype {float32,bfloat16}]

The folder loads offline with ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` and computes the
checkpoint's function on its true vocabulary:

* ``llama``: ``LlamaForCausalLM``, for a ``*-*-...`` model (attention + MLP pairs) with RMSNorm, SwiGLU and RoPE;
* ``nemotron_h``: ``NemotronHForCausalLM``, for a hybrid of Mamba2, attention (no position embeddings, no biases)
  and ungated MLP (squared ReLU or GELU) layers with RMSNorm;
* ``mamba2``: ``Mamba2ForCausalLM``, for a pure Mamba2 model;
* ``auto`` (default): ``mamba2`` for a pure ``M`` pattern, ``llama`` for ``*-`` pairs, otherwise ``nemotron_h``.

What a format cannot hold (LayerNorm, Mamba1, SwiGLU in NemotronH, RoPE in NemotronH, learned absolute positions,
...) is refused with a one-line message naming it. The model sizes come from the args saved in the checkpoint. The
folder gets ``config.json``, ``model.safetensors``, ``generation_config.json`` (when the tokenizer's end-of-sequence
id is known) and the tokenizer files named by the saved ``--tokenizer-model`` (a warning line when there are none).
It is written to a temporary sibling folder and renamed to ``--save-dir`` at the end; on any error nothing is left
there. Errors print ``error: <one line>`` and exit with code 2; warnings print ``warning: <line>``.
"""

from __future__ import annotations

import os
import sys

# tools/checkpoint/inspect.py would shadow the standard library's ``inspect`` for every import below; the package
# is importable from a checkout without installing it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched

import argparse  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from megatron.core.tensor_parallel.sharding import UnknownTensorError  # noqa: E402
from megatron.training.checkpoint_reshard import ReshardError  # noqa: E402
from megatron.training.checkpointing import CheckpointError  # noqa: E402
from megatron.training.cli import OneLineParser as _Parser  # noqa: E402
from megatron.training.cli import fail  # noqa: E402
from megatron.training.hf_export import DTYPES, TARGETS, ExportError, export_checkpoint  # noqa: E402


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = _Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--load-dir", required=True, help="Checkpoint directory to read (with its tracker file).")
    parser.add_argument("--save-dir", required=True, help="Hugging Face folder to write; must not exist or be empty.")
    parser.add_argument("--target", choices=TARGETS, default="auto",
                        help="Hugging Face format (default auto: mamba2 for pure Mamba, llama for '*-' pairs, "
                             "otherwise nemotron_h).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="Dtype of the saved tensors.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the export; returns the exit code."""
    args = get_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        result = export_checkpoint(args.load_dir, args.save_dir, args.target, args.dtype, progress=progress)
    except (ExportError, ReshardError, CheckpointError, UnknownTensorError, ValueError) as error:
        fail(str(error))
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(result.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
