"""Write a megatron-core `torch_dist` checkpoint from one process, one tensor in memory at a time.

torch.distributed.checkpoint's `FileSystemWriter` asks its planner for an item's data only when it writes that item;
our planner builds the tensor then (a callable per chunk: read the HF tensors, apply the mapping transform), so the
model is never resident. The directory is what `megatron.core.dist_checkpointing.save` writes (`.metadata`,
`__0_0.distcp`, `common.pt`, `metadata.json`) and megatron-core loads it at any TP/PP.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

# megatron-core's metadata.json for its torch_dist backend (dist_checkpointing.core.CheckpointingConfig)
MCORE_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                "common_backend_version": 1}


@dataclass(frozen=True)
class LazyChunk:
    """Region `offset`+`sizes` of the global tensor `key`; `make()` returns it (shape `sizes`, dtype `dtype`)."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


class _LazyPlanner(DefaultSavePlanner):
    """A save plan declared up front (shapes only); each item's data is made when the writer asks for it."""

    def __init__(self, chunks: list[LazyChunk], objects: dict[str, Any], on_item: Callable[[], None]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {MetadataIndex(c.key, torch.Size(c.offset)): c for c in chunks}
        self._objects, self._on_item = objects, on_item

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        super().set_up_planner({}, storage_meta, is_coordinator)

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=torch.Size(c.offset), sizes=torch.Size(c.sizes)),
                properties=TensorProperties(dtype=c.dtype), size=torch.Size(c.global_shape)))
            for index, c in self._chunks.items()
        ]
        items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self._objects]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        self._on_item()
        if write_item.type == WriteItemType.BYTE_IO:
            buf = io.BytesIO()
            torch.save([self._objects[write_item.index.fqn]], buf)  # megatron packs a ShardedObject as [data]
            return buf
        c = self._chunks[MetadataIndex(write_item.index.fqn, write_item.index.offset)]
        tensor = c.make()
        if tuple(tensor.shape) != c.sizes or tensor.dtype != c.dtype:
            raise RuntimeError(f"{c.key}{list(c.offset)}: built {tuple(tensor.shape)} {tensor.dtype},"
                               f" planned {c.sizes} {c.dtype}")
        return tensor.contiguous()


def save_lazy(path: str | Path, chunks: list[LazyChunk], objects: dict[str, Any],
              on_item: Callable[[], None] = lambda: None, fsync: bool = True) -> None:
    """Write the checkpoint into the (existing, empty) directory `path`; `on_item` is called per written item."""
    path = Path(path)
    writer = dcp.FileSystemWriter(str(path), single_file_per_rank=True, sync_files=fsync, thread_count=1)
    dcp.save({}, storage_writer=writer, planner=_LazyPlanner(chunks, objects, on_item), no_dist=True)
    torch.save({}, path / "common.pt")  # megatron's non-sharded part: nothing for a bare model
    (path / "metadata.json").write_text(json.dumps(MCORE_CONFIG))
