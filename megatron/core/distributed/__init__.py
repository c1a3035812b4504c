from megatron.core.distributed.finalize_model_grads import finalize_model_grads, wrap_data_parallel

__all__ = ["finalize_model_grads", "wrap_data_parallel"]
