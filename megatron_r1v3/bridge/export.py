"""Stream `(name, full tensor)` out of Megatron TP/PP shards to ONE rank (`dst`, the rank that loads or writes).
Every rank yields the same names in the same order (a manifest gathered first); ranks other than `dst` get meta
tensors (shape and dtype, no data), so callers run the same manifest checks everywhere and all fail at the same
tensor. A generator: one full tensor at a time. HF conversion (Megatron -> HF) and the vLLM refit both consume
`iter_hf_tensors`.

Transport, decided here:
- `shm` (host-memory weights, every rank on `dst`'s host): each rank mirrors its shards in shared memory and `dst`
  reads them directly (`bridge/shm.py`);
- `p2p` (otherwise): each stage gathers its TP shards on its first TP rank, which sends the full tensor to `dst`.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_r1v3.bridge.mapping import find_rule, to_hf
from megatron_r1v3.bridge.shard import full_shape, global_named_parameters, join_tp_parts, tp_gather_to_first
from megatron_r1v3.bridge.shm import shared_shards
from megatron_r1v3.config import ModelConfig
from megatron_r1v3.parallel.phase import set_phase


def local_manifest(chunks) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(canonical name, full shape, dtype) of every parameter this pipeline stage owns, in model order."""
    return [(name, full_shape(p), p.dtype) for chunk in chunks for name, p in global_named_parameters(chunk)]


def iter_full_megatron_tensors(
    chunks, dst: int = 0, transport: str = "auto"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective over the model-parallel group holding `dst` (a TP-rank-0 process, e.g. the engine's rank 0):
    `dst` receives every full tensor, stage by stage; every other rank gets meta tensors in the same order.
    transport: auto (shm when possible, else p2p) | shm | p2p."""
    set_phase("export: manifest")
    pp = ps.get_pipeline_model_parallel_world_size()
    mine = local_manifest(chunks)
    params = {name: p for chunk in chunks for name, p in global_named_parameters(chunk)}
    manifests = [mine]
    if pp > 1:
        manifests = [None] * pp
        dist.all_gather_object(manifests, mine, group=ps.get_pipeline_model_parallel_group())
    rank, my_stage = dist.get_rank(), ps.get_pipeline_model_parallel_rank()
    in_replica = dst in dist.get_process_group_ranks(ps.get_model_parallel_group())
    stage_heads = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()) if pp > 1 else [rank]
    first_tp = ps.get_tensor_model_parallel_rank() == 0
    if rank == dst and not first_tp:
        raise ValueError(f"export destination rank {dst} must be tensor-parallel rank 0 of its stage")
    device = next(iter(params.values())).device
    shared = shared_shards(chunks, dst) if in_replica and transport in ("auto", "shm") else None
    if transport == "shm" and in_replica and shared is None:
        raise ValueError("transport='shm' needs host-memory weights and every rank on the destination's host")
    if shared is not None:
        yield from _from_shared(shared, manifests, rank == dst, device)
        return
    for stage, manifest in enumerate(manifests):
        set_phase(f"export: stage {stage}")
        for name, shape, dtype in manifest:
            full = None
            if in_replica and stage == my_stage:
                full = tp_gather_to_first(params[name], find_rule(name)[0].tp_gated)  # None off TP rank 0
                if full is not None and rank != dst:
                    dist.send(full.contiguous(), dst)
                    full = None
            elif rank == dst:
                full = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(full, stage_heads[stage])
            yield name, full if full is not None else torch.empty(shape, dtype=dtype, device="meta")


def _from_shared(shared, manifests, is_dst: bool, device) -> Iterator[tuple[str, torch.Tensor]]:
    shared.publish()
    for stage, manifest in enumerate(manifests):
        set_phase(f"export (shm): stage {stage}")
        for name, shape, dtype in manifest:
            if not is_dst:
                yield name, torch.empty(shape, dtype=dtype, device="meta")
                continue
            parts, dim = shared.parts(name)  # views of the mirrors: valid until the next push
            full = parts[0] if dim is None else join_tp_parts(parts, dim, find_rule(name)[0].tp_gated)
            yield name, full.to(device)
    shared.done()


def iter_hf_tensors(
    chunks, model: ModelConfig, layout: str, dst: int = 0, transport: str = "auto"
) -> Iterator[tuple[str, torch.Tensor]]:
    """`(hf_name, tensor)` for the whole model through the mapping table, full on `dst` (collective; see above)."""
    for name, full in iter_full_megatron_tensors(chunks, dst, transport):
        yield from to_hf(name, full, model, layout)
