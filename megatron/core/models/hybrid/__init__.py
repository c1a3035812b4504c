from megatron.core.models.hybrid.hybrid_layer_allocation import pattern_from_ratios
from megatron.core.models.hybrid.hybrid_model import HybridModel, MambaModel

__all__ = ["HybridModel", "MambaModel", "pattern_from_ratios"]
