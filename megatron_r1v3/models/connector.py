"""The connector `mlp1`: pixel shuffle (v2) -> LayerNorm -> Linear -> GELU -> Linear, tensor-parallel.

With Transformer Engine the LayerNorm is fused into the first linear (`TELayerNormColumnParallelLinear`) and both
GEMMs run under the FP8 recipe of the config; otherwise megatron-core's local column/row-parallel linears.

One checkpoint key set whatever the spec: the local LayerNorm saves and loads under the TE names
(`linear_fc1.layer_norm_weight/bias`), as megatron's local decoder layers do for their norms
(`sharded_state_dict_keys_map`); module attribute and parameter names stay spec-specific.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.utils import apply_prefix_mapping
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL `ps_version v2` space-to-depth: [N, W, H, C] -> [N, H*s, W*s, C/s^2] (0.5: 2x2 patches -> 1)."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


# local-spec module prefix -> checkpoint key prefix (the TE spec's, where the norm lives inside linear_fc1);
# bridge/mapping.py spells the resulting full names (local name first, TE alias after)
SHARDED_KEYS_MAP = {"layer_norm.": "linear_fc1.layer_norm_"}


class Connector(MegatronModule):
    """Maps ViT tokens `[tiles, grid^2, H_vit]` to decoder embeddings `[tiles, (grid*s)^2, H_lm]`."""

    def __init__(self, config: TransformerConfig, vit_hidden: int, lm_hidden: int, downsample: float, use_te: bool):
        super().__init__(config=config)
        self.downsample, self.use_te = downsample, use_te
        in_dim = int(vit_hidden / (downsample * downsample))
        col_kwargs = dict(config=config, init_method=config.init_method, bias=True, gather_output=False)
        row_kwargs = dict(
            config=config, init_method=config.output_layer_init_method, bias=True, input_is_parallel=True,
            skip_bias_add=False,
        )
        if use_te:  # GPU only: TE's layers need CUDA (and TE, which does not install on the CPU machines)
            from megatron.core.extensions.transformer_engine import (
                TELayerNormColumnParallelLinear,
                TERowParallelLinear,
            )

            self.layer_norm = None
            self.linear_fc1 = TELayerNormColumnParallelLinear(
                in_dim, lm_hidden, skip_bias_add=False, is_expert=False, **col_kwargs
            )
            self.linear_fc2 = TERowParallelLinear(lm_hidden, lm_hidden, is_expert=False, **row_kwargs)
        else:
            self.layer_norm = torch.nn.LayerNorm(in_dim, eps=config.layernorm_epsilon, dtype=config.params_dtype)
            self.linear_fc1 = tensor_parallel.ColumnParallelLinear(in_dim, lm_hidden, **col_kwargs)
            self.linear_fc2 = tensor_parallel.RowParallelLinear(lm_hidden, lm_hidden, **row_kwargs)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        """megatron's default (every submodule), with the local LayerNorm's keys renamed to the TE spec's."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.layer_norm is not None:
            apply_prefix_mapping(sharded, {prefix + old: prefix + new for old, new in SHARDED_KEYS_MAP.items()})
        return sharded

    def _fp8_context(self):
        if not (self.use_te and self.config.fp8):
            return contextlib.nullcontext()
        from megatron.core.fp8_utils import get_fp8_context

        return get_fp8_context(self.config)

    def forward(self, vit_tokens: torch.Tensor) -> torch.Tensor:
        n, s, c = vit_tokens.shape
        side = int(s**0.5)
        x = pixel_shuffle(vit_tokens.reshape(n, side, side, c), self.downsample)
        x = x.reshape(n, -1, x.shape[-1])
        with self._fp8_context():
            if self.layer_norm is not None:
                x = self.layer_norm(x)
            h, _ = self.linear_fc1(x)
            out, _ = self.linear_fc2(F.gelu(h))
        return out
