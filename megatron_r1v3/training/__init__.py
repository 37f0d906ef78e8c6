"""Optimizer, data-parallel wrapping and the pipeline-parallel train/eval step, on megatron-core."""
