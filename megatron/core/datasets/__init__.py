"""Datasets for pretraining: Megatron's indexed dataset format, GPT samples, blends and the pretraining sampler.

Names are imported lazily so that torch-free users (``tools/preprocess_data.py`` and the indexed dataset) start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_LOCATIONS = {
    "BlendedDataset": "blended_dataset",
    "GPTDataset": "gpt_dataset",
    "MockGPTDataset": "gpt_dataset",
    "build_gpt_datasets": "gpt_dataset",
    "parse_blend": "gpt_dataset",
    "IndexedDataset": "indexed_dataset",
    "IndexedDatasetBuilder": "indexed_dataset",
    "MegatronPretrainingSampler": "samplers",
    "parse_split": "splits",
    "split_document_ranges": "splits",
}

__all__ = sorted(_LOCATIONS)


def __getattr__(name: str) -> Any:
    """Import ``name`` from its submodule on first access."""
    if name not in _LOCATIONS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LOCATIONS[name]}"), name)
