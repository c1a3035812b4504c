"""Model code: configs, layers, SSM ops and the hybrid model, free of training-loop concerns."""
