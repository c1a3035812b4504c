"""Convert a Hugging Face Llama folder into a hybrid whose Mamba2 layers start from the attention weights.

Usage::

    python tools/checkpoint/llama_to_hybrid.py --hf-dir Llama-3.2-1B --save-dir ckpt/mil-50 \\
        --attention-fraction 0.5 [--target-tp-size 1] [--target-pp-size 1] [--dtype ...] [--seed 1234]
    ... --attention-layers 3 7 11          # keep attention in these (0-based) Llama layers
    ... --hybrid-layer-pattern 'M-*-M-*-'  # or give the pattern (two symbols per Llama layer)

Each Llama layer becomes a mixer layer and an MLP layer. Layers that stay attention convert as in
``llama_to_transformer.py``; the others become Mamba2 layers initialised as DESIGN.md ("Mamba in the Llama") says:
``in_proj`` rows ``[z | x | B | C | dt] = [fresh | v_proj | k_proj | q_proj | fresh]`` with x and B shared per
key/value head (``--mamba-kv-groups``), ``out_proj = o_proj``, the layer's input norm kept; the conv, ``dt_bias``,
``A_log``, ``D`` and the gated norm are freshly initialised from ``--seed``. Norms and MLPs are copied. The
validation report lists every tensor as copied, derived or initialised; the checkpoint (release, iteration 0) and
the tokenizer are written as by ``llama_to_transformer.py``, which takes the same options.
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
    sys.exit(main(description=__doc__.split("\n\n")[0], hybrid=True))
