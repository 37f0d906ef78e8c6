"""Shared-memory transport for the Megatron -> one-rank stream (`bridge/export.py`) on a host-memory model.

When every rank of the destination's model-parallel group runs on the destination's host and the weights live in
host memory (CPU training, the laptop/CI path), each rank keeps a mirror of its parameter shards in a file under
/dev/shm that the destination maps once. A push is then one local copy per rank, all ranks in parallel, and one
read per tensor on the destination: the CPU counterpart of CUDA-IPC buckets, instead of a gloo gather + send of
every tensor through TCP loopback. The files are unlinked as soon as every rank has mapped them (nothing is left
in /dev/shm, even after a crash); the mappings live as long as the model.

Destinations: one rank (`dst`, the rank-0 engine and the HF export), or every rank of the group (`dst=None`: the
SPMD rollout engines, where each engine rank reads from the mirrors of its model replica what its vLLM shard loads:
its own TP part of the split tensors, or every part of a tensor to join; no rank routes data for another).

Cost: host memory for one extra copy of each rank's shards (the mirror), allocated on the first push.

`SharedBuffers`: named tensors in one file that every rank of a group maps, each rank writing its own parts and
every rank reading all of them - the SPMD engines' sliced refit places each pipeline stage's TP slices there once
for all stages of that TP rank (`rollout/spmd_refit.py`).
"""

from __future__ import annotations

import math
import os
import socket
import uuid
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_r1v3.bridge.shard import global_named_parameters, is_tp_sharded

SHM_DIR = "/dev/shm"
_ALIGN = 64
_MIRRORS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int | None, SharedShards | None]]" = (
    weakref.WeakKeyDictionary())


@dataclass(frozen=True)
class _Slot:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    tp_rank: int
    partition_dim: int | None  # None: replicated over TP (every TP rank holds the whole tensor)


def _layout(entries) -> tuple[dict[str, _Slot], int]:
    """(name, shape, dtype, tp_rank, partition_dim) entries -> their slots at aligned offsets, and the file size."""
    slots, offset = {}, 0
    for name, shape, dtype, tp_rank, dim in entries:
        slots[name] = _Slot(offset, tuple(shape), dtype, tp_rank, dim)
        offset += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    return slots, max(offset, _ALIGN)


def _map(path: str, nbytes: int) -> torch.UntypedStorage:
    """A shared mapping of the file at `path` (created sparse at `nbytes` if missing)."""
    return torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)


def _view(storage: torch.UntypedStorage, slot: _Slot) -> torch.Tensor:
    numel = math.prod(slot.shape)
    flat = torch.empty(0, dtype=slot.dtype).set_(storage, slot.offset // slot.dtype.itemsize, (numel,))
    return flat.view(slot.shape)


class SharedShards:
    """This rank's parameter mirror in shared memory; on the destination(s), every rank's mirror mapped."""

    def __init__(self, chunks, dst: int | None, group):
        self.group, self.rank, self.dst = group, dist.get_rank(), dst
        self.params = {name: p for chunk in chunks for name, p in global_named_parameters(chunk)}
        tp_rank = ps.get_tensor_model_parallel_rank()
        slots, nbytes = _layout((name, p.shape, p.dtype, tp_rank, p.partition_dim if is_tp_sharded(p) else None)
                                for name, p in self.params.items())
        self.reads = dst is None or self.rank == dst
        lead = dist.get_global_rank(group, 0) if dst is None else dst
        token = [uuid.uuid4().hex if self.rank == lead else None]
        dist.broadcast_object_list(token, src=lead, group=group)
        path = f"{SHM_DIR}/r1v3-shards-{token[0]}-{self.rank}"
        self.storage = _map(path, nbytes)
        self.mine = {name: _view(self.storage, s) for name, s in slots.items()}
        layouts = [None] * dist.get_world_size(group)
        dist.all_gather_object(layouts, (self.rank, path, nbytes, slots), group=group)
        self.remote: dict[str, list[tuple[torch.Tensor, _Slot]]] = {}  # name -> [(view, slot)] by TP rank
        if self.reads:
            for rank, rpath, rbytes, rslots in layouts:
                storage = self.storage if rank == self.rank else _map(rpath, rbytes)
                for name, slot in rslots.items():
                    self.remote.setdefault(name, []).append((_view(storage, slot), slot))
            for parts in self.remote.values():
                parts.sort(key=lambda vs: vs[1].tp_rank)
        dist.barrier(group=group)  # every file mapped: remove the names
        os.unlink(path)

    def publish(self, names: set[str] | None = None) -> None:
        """Collective: copy this rank's current shards (only `names`, when given: a freeze-aware refit) into its
        mirror; afterwards the destination may read."""
        with torch.no_grad():
            for name, p in self.params.items():
                if names is None or name in names:
                    self.mine[name].copy_(p.detach())
        dist.barrier(group=self.group)

    def parts(self, name: str) -> tuple[list[torch.Tensor], int | None]:
        """(the TP shards of `name` in TP order, the partition dim or None if replicated) - destinations only."""
        parts = self.remote[name]
        dim = parts[0][1].partition_dim
        return ([v for v, _ in parts] if dim is not None else [parts[0][0]]), dim

    def done(self) -> None:
        """Collective: the destination has read everything; mirrors may be overwritten by the next push."""
        dist.barrier(group=self.group)


class SharedBuffers:
    """Tensors of the given shapes in one shared-memory file mapped by every rank of `group` (collective over it):
    a rank writes into `views[name]` what it owns, and after a barrier every rank reads every view without a copy.
    The file is sparse (pages are allocated where written) and unlinked once mapped. `fill` (a value, or None):
    written into every tensor at creation, before any rank can write (tests: NaN where nothing is ever placed)."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], group, fill: float | None = None):
        slots, nbytes = _layout((name, shape, dtype, 0, None) for name, (shape, dtype) in shapes.items())
        lead = dist.get_global_rank(group, 0)
        path = [f"{SHM_DIR}/r1v3-buffers-{uuid.uuid4().hex}-{lead}" if dist.get_rank() == lead else None]
        if path[0] is not None:  # created and filled before anyone else maps it
            self.storage = _map(path[0], nbytes)
            if fill is not None:
                for slot in slots.values():
                    _view(self.storage, slot).fill_(fill)
        dist.broadcast_object_list(path, src=lead, group=group)
        if dist.get_rank() != lead:
            self.storage = _map(path[0], nbytes)
        dist.barrier(group=group)
        if dist.get_rank() == lead:
            os.unlink(path[0])
        self.views = {name: _view(self.storage, slot) for name, slot in slots.items()}


def shared_shards(chunks, dst: int | None) -> SharedShards | None:
    """The mirror for these model chunks read by `dst` (None: by every rank of the group), created on first use
    (collective over the model-parallel group), or None when shared memory cannot serve: weights not in host
    memory, ranks on several hosts, or no /dev/shm."""
    key = chunks[0]
    mirrors = _MIRRORS.setdefault(key, {})
    if dst in mirrors:
        return mirrors[dst]
    group = ps.get_model_parallel_group()
    device = next(p for chunk in chunks for p in chunk.parameters()).device
    here = (socket.gethostname(), device.type == "cpu" and os.path.isdir(SHM_DIR))
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, here, group=group)
    usable = all(h == (everyone[0][0], True) for h in everyone)
    mirrors[dst] = SharedShards(chunks, dst, group) if usable else None
    return mirrors[dst]
