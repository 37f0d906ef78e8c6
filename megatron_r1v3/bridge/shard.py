"""Generic TP/PP distribution of full (TP1-layout) tensors: canonical names with global layer numbers, TP gather
driven by megatron's `tensor_model_parallel`/`partition_dim` parameter attributes."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_r1v3.bridge.mapping import DECODER_LAYER_PREFIX
from megatron_r1v3.models.build import unwrap_model


def global_named_parameters(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Parameters of one model chunk named with global decoder layer indices (PP/VPP offsets applied)."""
    model = unwrap_model(chunk)
    for name, param in model.named_parameters():
        if name.startswith(DECODER_LAYER_PREFIX):
            local, rest = name[len(DECODER_LAYER_PREFIX):].split(".", 1)
            layer = model.language_model.decoder.layers[int(local)]
            name = f"{DECODER_LAYER_PREFIX}{layer.layer_number - 1}.{rest}"
        yield name, param


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False)) and ps.get_tensor_model_parallel_world_size() > 1


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """Shape of the TP-gathered tensor."""
    shape = list(param.shape)
    if is_tp_sharded(param):
        shape[param.partition_dim] *= ps.get_tensor_model_parallel_world_size()
    return tuple(shape)


def tp_gather_to_first(param: torch.Tensor, gated: bool) -> torch.Tensor | None:
    """Full tensor on TP rank 0 from every TP rank's shard (collective over the TP group); None on the others."""
    local = param.detach()
    if not is_tp_sharded(param):
        return local if ps.get_tensor_model_parallel_rank() == 0 else None
    tp, dim = ps.get_tensor_model_parallel_world_size(), param.partition_dim
    group = ps.get_tensor_model_parallel_group()
    first = ps.get_tensor_model_parallel_rank() == 0
    parts = [torch.empty_like(local) for _ in range(tp)] if first else None
    dist.gather(local.contiguous(), parts, dst=dist.get_global_rank(group, 0), group=group)
    return join_tp_parts(parts, dim, gated) if first else None


def join_tp_parts(parts: list[torch.Tensor], dim: int, gated: bool) -> torch.Tensor:
    """The full tensor from its TP shards in TP order (gated: shard r is [gate_r; up_r])."""
    if gated:
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)
