"""Checkpoint-and-exit on a preemption signal (Slurm `--signal=USR1@120`, or SIGTERM).

The handler only sets a flag; at each step boundary every rank agrees (all-reduce MAX) whether any rank was
signalled, so they all save the same step and leave together. The run then writes `<output_dir>/PREEMPTED`, which
the sbatch script turns into `scontrol requeue` (the requeued job resumes from `latest`).
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_r1v3.parallel.init import compute_device

MARKER = "PREEMPTED"


class PreemptionWatch:
    """Installs handlers for `signals`; `requested()` is collective and True on every rank once any got one."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.flag = False
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def requested(self) -> bool:
        t = torch.tensor([1 if self.flag else 0], dtype=torch.int32, device=compute_device())
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def mark_preempted(output_dir: str | Path, step: int) -> None:
    """Rank 0 leaves the marker the sbatch script looks for."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        (Path(output_dir) / MARKER).write_text(f"{step}\n")


def clear_marker(output_dir: str | Path) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        (Path(output_dir) / MARKER).unlink(missing_ok=True)
