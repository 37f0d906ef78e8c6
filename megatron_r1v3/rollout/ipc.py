"""CUDA-IPC bucket transport, for an engine that runs in ANOTHER process on the same GPU (vLLM's multiprocess mode,
or a separate rollout server): the trainer packs a bucket into one flat device buffer, sends a CUDA-IPC handle of
it with the bucket's layout, and the engine process opens the handle (no copy), views the tensors and loads them
with its own `reload_weights`. The pattern of verl / NeMo-RL / slime; two buffers used in turn let the trainer pack
bucket k+1 while the engine loads bucket k.

Status: written and reviewed, NOT YET RUN ON A GPU (the CPU machines have no CUDA); packing and unpacking are tested
on CPU. The SPMD engines of `engine_group` do not need it: they run in the trainer's process and receive a
bucket's tensors by reference (`spmd_refit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_ALIGN = 256  # bytes: every tensor starts on a boundary its dtype (and vectorised copies) are happy with


@dataclass(frozen=True)
class BucketLayout:
    """Where each tensor of a packed bucket lies: (hf_name, dtype name, shape, byte offset), and the total bytes."""

    entries: tuple[tuple[str, str, tuple[int, ...], int], ...]
    nbytes: int


def bucket_layout(bucket: Sequence[tuple[str, torch.Tensor]]) -> BucketLayout:
    """Offsets of the tensors of `bucket` in one flat buffer (each aligned to 256 bytes)."""
    entries, offset = [], 0
    for name, t in bucket:
        entries.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return BucketLayout(tuple(entries), offset)


def pack_bucket(bucket: Sequence[tuple[str, torch.Tensor]], buffer: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, BucketLayout]:
    """Copy the bucket into `buffer` (uint8, reused when large enough; else a new one on the tensors' device)."""
    layout = bucket_layout(bucket)
    if buffer is None or buffer.numel() < layout.nbytes:
        device = bucket[0][1].device if bucket else torch.device("cpu")
        buffer = torch.empty(max(layout.nbytes, _ALIGN), dtype=torch.uint8, device=device)
    for (_, t), (_, _, _, offset) in zip(bucket, layout.entries):
        nbytes = t.numel() * t.element_size()
        buffer[offset:offset + nbytes].copy_(t.detach().contiguous().view(-1).view(torch.uint8))
    return buffer, layout


def unpack_bucket(buffer: torch.Tensor, layout: BucketLayout) -> list[tuple[str, torch.Tensor]]:
    """Views of the packed tensors (no copy); valid while `buffer` is neither freed nor repacked."""
    out = []
    for name, dtype, shape, offset in layout.entries:
        dt = getattr(torch, dtype)
        numel = 1
        for s in shape:
            numel *= s
        out.append((name, buffer[offset:offset + numel * dt.itemsize].view(dt).view(shape)))
    return out


def share_handle(buffer: torch.Tensor) -> tuple:
    """A picklable CUDA-IPC handle of a device buffer (torch's own reduction: the storage's IPC handle, offset and
    the ref-counting event). CUDA only; the buffer must stay alive until the receiver is done with it."""
    if not buffer.is_cuda:
        raise ValueError("CUDA-IPC handles need a CUDA buffer; on CPU the engine shares memory through bridge/shm.py")
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(buffer)


def open_handle(handle: tuple) -> torch.Tensor:
    """The sender's buffer in this process (same GPU, same CUDA_VISIBLE_DEVICES order), without a copy."""
    rebuild, args = handle
    return rebuild(*args)


class IpcWeightLoader:
    """A vLLM `worker_extension_cls`: `llm.collective_rpc("load_ipc_bucket", args=(handle, layout))` loads one
    packed bucket into the worker's model (its TP slice) through vLLM's `reload_weights`."""

    def load_ipc_bucket(self, handle: tuple, layout: BucketLayout) -> int:
        weights = unpack_bucket(open_handle(handle), layout)
        self.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]  (the vLLM Worker's method)
        torch.cuda.synchronize()  # the sender may repack the buffer once this returns
        return len(weights)
