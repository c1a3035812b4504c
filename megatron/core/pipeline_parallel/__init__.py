from megatron.core.pipeline_parallel.schedules import PipelineChunk, PipelineSchedule, masked_mean_loss

__all__ = ["PipelineChunk", "PipelineSchedule", "masked_mean_loss"]
