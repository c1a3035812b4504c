"""Serving trained hybrid models over HTTP: the Flask text generation server (Megatron's ``PUT /api`` plus an
OpenAI-style ``POST /v1/completions``) and the code that loads a checkpoint for it.

``text_generation_server`` needs Flask; ``model_loading`` needs the training package. Import the submodule you need.
"""
