"""RMSNorm as InternViT and Qwen2 compute it (statistics in fp32, weight applied in the input dtype), and its form
for megatron-core layer specs.

megatron-core's local spec wraps `torch.nn.RMSNorm` in a norm that refuses sequence parallelism; the decoder's norms
here accept it: under sequence parallelism each TP rank normalises its slice of the sequence, and the weight is
marked `sequence_parallel` so megatron's `finalize_model_grads` sums its gradient over the TP group.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)` over the last dimension."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32,
                 sequence_parallel: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.weight.sequence_parallel = sequence_parallel
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


class SpecRMSNorm(RMSNorm):
    """The decoder's norms in megatron layer/block specs: built as `(config, hidden_size, eps)`."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__(hidden_size, eps, config.params_dtype, config.sequence_parallel)
