"""A Megatron-style framework for hybrid Mamba / attention / MLP language models that runs anywhere."""

__version__ = "0.1.0"
