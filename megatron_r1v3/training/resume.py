"""Full training checkpoints: model, optimizer, LR scheduler, per-rank data position and RNG; atomic with `latest`.

Layout of `<root>/step_00000042/`: `model/` (dist_checkpointing, any layout), `optimizer/` (megatron's
per-(TP, PP) optimizer state; the distributed optimizer's Adam moments gathered to DP rank 0), `ranks/rank_<r>.pt`
(RNG states and trainer extras such as the data position), `trainer_state.json`. A step is written into
`step_….partial` and renamed when every rank is done; `latest` (a one-line file) is replaced last, so a kill at any
moment leaves the previous checkpoint as `latest` and loadable. Resuming needs the same TP/PP/DP layout for the
optimizer (the model part reshards freely).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_r1v3.models.weights import load_model, save_model
from megatron_r1v3.parallel.phase import set_phase

LATEST = "latest"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _layout_tag() -> str:
    return f"tp{ps.get_tensor_model_parallel_rank()}_pp{ps.get_pipeline_model_parallel_rank()}"


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _unshare_adam_steps(optimizer) -> None:
    """After megatron's legacy load, torch Adam's per-parameter `step` tensors may alias one tensor, which Adam
    then increments once per parameter per step (silently wrong bias correction). Give each its own copy."""
    for opt in _inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else []):
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


@contextlib.contextmanager
def _megatron_legacy_load_fixes():
    """megatron-core 0.16 without Apex/TE: `load_parameter_state` copies every key of torch Adam's state,
    including `step`, which the dp-zero file never holds (KeyError: 'step'). Copy the saved keys only; the step
    count itself comes from the optimizer's `load_state_dict` (see `_unshare_adam_steps`)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_saved_keys(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            dst[key].copy_(value)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_saved_keys
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original


def latest_step(root: str | Path) -> int | None:
    """Step number `latest` points to, or None (no checkpoint yet)."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    name = path.read_text().strip()
    if not (Path(root) / name).is_dir():
        raise FileNotFoundError(f"{path} points to {name}, which does not exist")
    return int(name.split("_")[1])


def save_checkpoint(root: str | Path, step: int, chunks, optimizer, scheduler, extra: dict[str, Any] | None = None,
                    keep_last: int = 2, describe: Callable[[Path], None] | None = None) -> Path:
    """Collective. Writes step `step` atomically, moves `latest`, prunes to the newest `keep_last` steps.
    `describe(dir)` (rank 0, before the commit) adds metadata files, e.g. `bridge.convert.write_training_meta`."""
    root = Path(root)
    final = _step_dir(root, step)
    tmp = final.with_name(final.name + ".partial")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "optimizer").mkdir(parents=True)
        (tmp / "ranks").mkdir()
    dist.barrier()
    save_model(chunks, tmp / "model")
    set_phase(f"save optimizer step {step}")
    tag = _layout_tag()
    if hasattr(optimizer, "save_parameter_state") and _uses_distributed_optimizer(optimizer):
        optimizer.save_parameter_state(str(tmp / "optimizer" / f"params_{tag}.pt"))  # collective over DP
    if ps.get_data_parallel_rank() == 0:
        torch.save(optimizer.state_dict(), tmp / "optimizer" / f"common_{tag}.pt")
    torch.save({"rng": _rng_state(), "extra": extra or {}}, tmp / "ranks" / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict()}))
        if describe is not None:
            describe(tmp)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)  # the commit point
        _prune(root, keep_last)
    dist.barrier()
    return final


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in _inner_optimizers(optimizer))


def _prune(root: Path, keep_last: int) -> None:
    for stale in root.glob("step_*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in steps[: max(0, len(steps) - max(keep_last, 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(root: str | Path, chunks, optimizer, scheduler) -> tuple[int, dict] | None:
    """Collective. Restore the `latest` step into model, optimizer, scheduler and RNG; returns (step, extra)."""
    step = latest_step(root)
    if step is None:
        return None
    path = _step_dir(Path(root), step)
    load_model(chunks, path / "model")
    set_phase(f"load optimizer step {step}")
    tag = _layout_tag()
    common = path / "optimizer" / f"common_{tag}.pt"
    if not common.is_file():
        raise FileNotFoundError(f"{common} missing: the optimizer state was saved at another TP/PP layout")
    optimizer.load_state_dict(torch.load(common, weights_only=False))
    if hasattr(optimizer, "load_parameter_state") and _uses_distributed_optimizer(optimizer):
        # fp32 main params are views of the (grad-requiring) model params: megatron 0.16 copies into them
        # in place, which autograd forbids outside no_grad.
        with torch.no_grad(), _megatron_legacy_load_fixes():
            optimizer.load_parameter_state(str(path / "optimizer" / f"params_{tag}.pt"))
    _unshare_adam_steps(optimizer)
    state = json.loads((path / "trainer_state.json").read_text())
    scheduler.load_state_dict(state["scheduler"])
    mine = torch.load(path / "ranks" / f"rank_{dist.get_rank()}.pt", weights_only=False)
    _set_rng_state(mine["rng"])
    dist.barrier()
    return state["step"], mine["extra"]
