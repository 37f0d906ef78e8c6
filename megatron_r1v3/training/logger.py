"""Run logging: TensorBoard event files (rank 0) and one console line per logged step."""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from pathlib import Path

import torch.distributed as dist

from megatron_r1v3.parallel.phase import set_phase


class RunLogger:
    """Writes scalars to TensorBoard under `<dir>/tensorboard` and, exactly (repr floats), to `<dir>/metrics.jsonl`
    (appended across resumes); prints a compact line. Silent off rank 0."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, prefix: str = "train",
                 progress_total: int | None = None, progress_start: int = 0):
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.prefix, self.writer, self.jsonl, self.bar = prefix, None, None, None
        if self.rank0 and progress_total:
            from tqdm import tqdm  # on stderr; the logged lines stay on stdout

            self.bar = tqdm(total=progress_total, initial=progress_start, desc=prefix, unit="step", leave=False,
                            disable=None)  # None: only on a terminal, not in log files
        if self.rank0:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(out_dir) / "metrics.jsonl", "a")
        if self.rank0 and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float], group: str | None = None,
                echo: bool | tuple[str, ...] = True) -> None:
        """Log all `values`; print them (echo=True), or only the keys listed in `echo`."""
        if not self.rank0:
            return
        group = group or self.prefix
        self.jsonl.write(json.dumps({"group": group, "step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{group}/{key}", value, step)
        if echo:
            shown = values if echo is True else {k: values[k] for k in echo if k in values}
            text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
            print(f"[{group}] step {step}  {text}", flush=True)

    def advance(self, **postfix: float) -> None:
        """One step done (progress bar)."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def text(self, message: str) -> None:
        if self.rank0:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class StepTimer:
    """Seconds per named phase of one step (`with timer("rollout"): ...`); entering a phase also records it as
    this rank's current phase (for hang reports)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        set_phase(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0
