"""Describe a hybrid-model checkpoint in Megatron's legacy layout: iteration, parallel layout, layer pattern and
pipeline stages, model sizes, vocabulary, optimizer state, and every tensor with its full and per-rank shapes.

Usage::

    python tools/checkpoint/inspect.py CHECKPOINT_DIR [--json]

The tensor-parallel shards are merged as ``tools/checkpoint/hybrid_conversion.py`` merges them, so the full shapes
and global layer indices shown are what a conversion would see. Errors print ``error: <one line>`` and exit with 2.
"""

from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's ``inspect`` (which torch and dataclasses import) while its own
# folder is on sys.path, as it is when run as a script; the package is importable from a checkout without installing.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import json  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from megatron.core.models.hybrid.hybrid_layer_allocation import strip_stage_boundaries  # noqa: E402
from megatron.core.tensor_parallel.sharding import UnknownTensorError  # noqa: E402
from megatron.training.checkpoint_reshard import FullCheckpoint, ReshardError, gather_checkpoint  # noqa: E402
from megatron.training.checkpointing import CheckpointError  # noqa: E402
from megatron.training.cli import OneLineParser as _Parser  # noqa: E402
from megatron.training.cli import fail  # noqa: E402

MODEL_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "mamba_version", "mamba_num_heads", "mamba_head_dim", "mamba_num_groups",
                "mamba_state_dim", "normalization", "swiglu", "squared_relu", "position_embedding_type",
                "untie_embeddings_and_output_weights", "make_vocab_size_divisible_by", "params_dtype")




def describe(full: FullCheckpoint) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-ready data."""
    layout, config = full.layout, full.config
    layers = strip_stage_boundaries(layout.pattern)
    model = {name: getattr(full.args, name) for name in MODEL_FIELDS if hasattr(full.args, name)}
    model["num_layers"] = len(layers)
    model["mamba_num_heads"] = config.mamba_nheads if config.mamba_version == 2 else None
    model["layer_counts"] = dict(Counter(layers))
    if "params_dtype" in model:
        model["params_dtype"] = str(model["params_dtype"]).replace("torch.", "")
    tensors = [{"key": key, "shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", ""),
                "stage": full.source_stage.get(key), "shard_shapes": [list(s) for s in full.shard_shapes[key]]}
               for key, tensor in full.tensors.items()]
    return {
        "directory": str(full.directory),
        "iteration": full.iteration,
        "file_iteration": full.file_iteration,
        "checkpoint_version": full.extras.get("checkpoint_version"),
        "layout": {"tensor_model_parallel_size": layout.tp, "pipeline_model_parallel_size": layout.pp,
                   "virtual_pipeline_model_parallel_size": layout.vpp, "files": layout.tp * layout.pp},
        "pattern": layout.pattern,
        "stages": layout.segments(),
        "model": model,
        "vocab": {"padded_vocab_size": full.padded_vocab, "true_vocab_size": full.true_vocab_size},
        "optimizer_state": full.has_optimizer,
        "consumed_train_samples": getattr(full.args, "consumed_train_samples", None),
        "parameters": sum(t.numel() for t in full.tensors.values()),
        "tensors": tensors,
    }


def render(report: dict[str, Any]) -> str:
    """The human-readable report."""
    layout, model, vocab = report["layout"], report["model"], report["vocab"]
    vpp = layout["virtual_pipeline_model_parallel_size"]
    lines = [
        f"checkpoint: {report['directory']}",
        f"iteration: {report['iteration']} (stored in files: {report['file_iteration']}; checkpoint version "
        f"{report['checkpoint_version']}; consumed train samples {report['consumed_train_samples']})",
        f"layout: tp {layout['tensor_model_parallel_size']} x pp {layout['pipeline_model_parallel_size']}"
        + (f" x vpp {vpp}" if vpp else " (not interleaved)") + f", {layout['files']} rank files",
        f"pattern: {report['pattern']} ({model['num_layers']} layers: "
        + ", ".join(f"{count} {symbol!r}" for symbol, count in model["layer_counts"].items()) + ")",
    ]
    stage_texts = [f"stage {index}: {segment}" for index, segment in enumerate(report["stages"])]
    lines.append("stages: " + " | ".join(stage_texts))
    sizes = ", ".join(f"{name} {value}" for name, value in model.items() if name not in ("layer_counts",))
    lines.append(f"model: {sizes}")
    lines.append(f"vocab: padded {vocab['padded_vocab_size']}, true "
                 f"{vocab['true_vocab_size'] if vocab['true_vocab_size'] is not None else 'unknown'}")
    lines.append(f"optimizer state: {'present' if report['optimizer_state'] else 'absent'}")
    lines.append(f"tensors: {len(report['tensors'])}, parameters: {report['parameters']:,}")
    rows = [("tensor", "full shape", "dtype", "stage", "shard shape per tp rank")]
    for entry in report["tensors"]:
        shards = entry["shard_shapes"]
        shard_text = _shape(shards[0]) if all(s == shards[0] for s in shards) else " ".join(map(_shape, shards))
        rows.append((entry["key"], _shape(entry["shape"]), entry["dtype"], str(entry["stage"]), shard_text))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _shape(shape: list[int]) -> str:
    return str(tuple(shape))


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report; returns the exit code."""
    parser = _Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("directory", help="Checkpoint directory (with latest_checkpointed_iteration.txt).")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = parser.parse_args(argv)
    try:
        full = gather_checkpoint(args.directory, load_optimizer=False)
        report = describe(full)
    except (ReshardError, CheckpointError, UnknownTensorError, ValueError) as error:
        fail(str(error))
    try:
        print(json.dumps(report, indent=2) if args.json else render(report), flush=True)
    except BrokenPipeError:  # e.g. piped into `head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
