"""Stream `(name, full tensor)` out of Megatron TP/PP shards: pipeline stages broadcast what they own (a manifest
gathered first), tensor-parallel shards are all-gathered and un-fused. A generator: one full tensor at a time.
HF conversion and the vLLM refit both consume `iter_hf_tensors`."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_r1v3.bridge.mapping import find_rule, to_hf
from megatron_r1v3.bridge.shard import full_shape, global_named_parameters, tp_gather
from megatron_r1v3.config import ModelConfig
from megatron_r1v3.parallel.phase import set_phase


def local_manifest(chunks) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(canonical name, full shape, dtype) of every parameter this pipeline stage owns, in model order."""
    return [(name, full_shape(p), p.dtype) for chunk in chunks for name, p in global_named_parameters(chunk)]


def iter_full_megatron_tensors(chunks) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective over the TP and PP groups: every rank receives every full tensor, stage by stage."""
    set_phase("export: manifest")
    pp = ps.get_pipeline_model_parallel_world_size()
    mine = local_manifest(chunks)
    params = {name: p for chunk in chunks for name, p in global_named_parameters(chunk)}
    manifests = [mine]
    if pp > 1:
        manifests = [None] * pp
        dist.all_gather_object(manifests, mine, group=ps.get_pipeline_model_parallel_group())
    my_stage = ps.get_pipeline_model_parallel_rank()
    ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()) if pp > 1 else None
    device = next(iter(params.values())).device
    for stage, manifest in enumerate(manifests):
        set_phase(f"export: stage {stage}")
        for name, shape, dtype in manifest:
            if stage == my_stage:
                full = tp_gather(params[name], find_rule(name)[0].tp_gated)
            else:
                full = torch.empty(shape, dtype=dtype, device=device)
            if pp > 1:
                full = full.contiguous()
                dist.broadcast(full, src=ranks[stage], group=ps.get_pipeline_model_parallel_group())
            yield name, full


def iter_hf_tensors(chunks, model: ModelConfig, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    """`(hf_name, tensor)` for the whole model through the mapping table (collective; see above)."""
    for name, full in iter_full_megatron_tensors(chunks):
        yield from to_hf(name, full, model, layout)
