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

from megatron.training.llama_import_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__.split("\n\n")[0]))
