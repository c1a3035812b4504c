"""Training: arguments, tokenizers, the pretraining loop and checkpoints."""
