"""Rollout: vLLM engine wrapper, model directory export and Megatron -> vLLM weight push."""
