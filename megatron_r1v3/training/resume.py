"""Full training checkpoints: model, optimizer, LR scheduler, per-rank data position and RNG; atomic with `latest`.

Layout of `<root>/step_00000042/`: `model/` (dist_checkpointing, any layout), `optimizer/` (megatron's
per-(TP, PP) optimizer state; the distributed optimizer's Adam moments gathered to DP rank 0), `ranks/rank_<r>.pt`
(RNG states and trainer extras such as the data position), `trainer_state.json`. A step is written into
`step_….partial` and renamed when every rank is done; `latest` (a one-line file) is replaced last, so a kill at any
moment leaves the previous checkpoint as `latest` and loadable; stale `.partial` directories are removed when a run
starts (`remove_stale_partials`) and a step directory left by a crash before `latest` moved is replaced.

Resuming needs the layout the checkpoint was saved at (TP, PP, VPP, CP, DP and the distributed optimizer, recorded
in `trainer_state.json`): the optimizer state and the per-rank data positions are bound to it; the model part
reshards freely, so `checkpoint.load=<dir> checkpoint.resume=false` continues from its weights with a fresh
optimizer. A checkpoint that cannot be resumed raises CheckpointError on every rank together: every file is read
and checked before the first collective of the load.

A rank with nothing to train (a pipeline stage outside the trainable set: connector-only tuning at PP2 leaves the
last stage frozen) steps, saves and resumes like the others; its optimizer files hold empty groups.
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

from megatron_r1v3.models.weights import CheckpointError, load_model, save_model
from megatron_r1v3.parallel.agree import agree_on_errors, describe
from megatron_r1v3.parallel.init import current_layout
from megatron_r1v3.parallel.phase import set_phase

LATEST = "latest"
_REPLACED = ".replaced.partial"  # a committed step moved aside while a save of the same step commits


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


def _has_no_state(opt) -> bool:
    """A distributed optimizer (torch Adam: no Apex/TE) whose Adam holds no state: this rank trains nothing (a
    pipeline stage with no trainable parameter, e.g. connector-only tuning at PP2) or its DP shard is empty."""
    from megatron.core.optimizer import distrib_optimizer

    inner = getattr(opt, "optimizer", None)
    return (isinstance(opt, distrib_optimizer.DistributedOptimizer) and not distrib_optimizer.HAVE_APEX_OR_TE
            and not opt.is_stub_optimizer and inner is not None and len(inner.state) == 0)


def _stateless_state_dict(opt) -> dict:
    """megatron's `DistributedOptimizer.state_dict()` for a rank whose Adam has no state: without Apex/TE it asserts
    that the state holds exactly one Adam step (a bare AssertionError at the first save). The param groups are
    saved with step 0 (no state uses it), which its `load_state_dict` turns back into an empty state."""
    inner = opt.optimizer.state_dict()
    groups = [{k: v for k, v in g.items() if k != "params"} | {"step": 0} for g in inner["param_groups"]]
    out = {"optimizer": {k: v for k, v in inner.items() if k != "state"} | {"param_groups": groups}}
    if opt.grad_scaler:
        out["grad_scaler"] = opt.grad_scaler.state_dict()
    return out


def optimizer_state_dict(optimizer) -> dict | list:
    """The optimizer's non-parameter state (megatron's `state_dict()`), also on ranks with nothing to train."""
    inner = _inner_optimizers(optimizer)
    states = [_stateless_state_dict(o) if _has_no_state(o) else o.state_dict() for o in inner]
    return states[0] if len(inner) == 1 else states


def latest_step(root: str | Path) -> int | None:
    """Step number `latest` points to, or None (no checkpoint yet). Local; raises CheckpointError when it names a
    directory that does not exist."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    name = path.read_text().strip()
    if not (Path(root) / name / "trainer_state.json").is_file():
        what = "is not a complete checkpoint" if (Path(root) / name).is_dir() else "does not exist"
        raise CheckpointError(f"{path} names {name}, which {what} (move `latest` to an existing step_* directory"
                              " or set checkpoint.resume=false)")
    return int(name.split("_")[1])


def remove_stale_partials(root: str | Path) -> None:
    """Delete `step_*.partial` directories (saves a kill interrupted). A complete step that a save of the same step
    moved aside (`.replaced.partial`) and a kill left without its successor is moved back instead. Rank 0, before
    any rank reads `root`."""
    for aside in Path(root).glob(f"step_*{_REPLACED}"):
        final = aside.with_name(aside.name.removesuffix(_REPLACED))
        if not final.exists():
            os.replace(aside, final)
    for stale in Path(root).glob("step_*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def layout_record() -> dict:
    """What the optimizer state and data positions of a checkpoint are bound to."""
    layout = current_layout()
    return {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "cp": layout.cp, "dp": layout.dp,
            "label": layout.label()}


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
        torch.save(optimizer_state_dict(optimizer), tmp / "optimizer" / f"common_{tag}.pt")
    torch.save({"rng": _rng_state(), "extra": extra or {}}, tmp / "ranks" / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        layout = {**layout_record(), "distributed_optimizer": _uses_distributed_optimizer(optimizer)}
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict(),
                                                            "layout": layout}))
        if describe is not None:
            describe(tmp)
        replaced = final.with_name(final.name + _REPLACED)
        if final.exists():  # left by a crash between the rename and `latest`, or saved again: the new one wins
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)  # the commit point
        _prune(root, keep_last)  # removes `replaced` too
    dist.barrier()
    return final


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in _inner_optimizers(optimizer))


def _prune(root: Path, keep_last: int) -> None:
    remove_stale_partials(root)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in steps[: max(0, len(steps) - max(keep_last, 1))]:
        shutil.rmtree(old, ignore_errors=True)


def _inferred_layout(path: Path) -> dict:
    """The layout of a checkpoint written before layouts were recorded, from its file names (VPP/CP unknown)."""
    tags = [f.stem.removeprefix("common_") for f in (path / "optimizer").glob("common_tp*_pp*.pt")]
    tp = 1 + max((int(t.split("_")[0][2:]) for t in tags), default=0)
    pp = 1 + max((int(t.split("_")[1][2:]) for t in tags), default=0)
    world = len(list((path / "ranks").glob("rank_*.pt")))
    layout = current_layout()
    return {"tp": tp, "pp": pp, "vpp": layout.vpp, "cp": layout.cp, "dp": max(1, world // (tp * pp)),
            "label": f"TP{tp}·PP{pp}·DP{max(1, world // (tp * pp))}"}


def _layout_problem(path: Path, saved: dict | None, distributed: bool) -> str | None:
    """Why this run cannot resume the optimizer state saved in `path` (None when it can)."""
    now = {**layout_record(), "distributed_optimizer": distributed}
    if saved is None:
        saved = {**_inferred_layout(path), "distributed_optimizer": distributed}
        now["label"] = saved["label"] if all(saved[k] == now[k] for k in ("tp", "pp", "dp")) else now["label"]
    if all(saved.get(k) == v for k, v in now.items()):
        return None

    def named(r: dict) -> str:
        return r["label"] + (" (distributed optimizer)" if r.get("distributed_optimizer") else " (plain optimizer)")

    return (f"{path} was saved at {named(saved)}, this run is {named(now)}: the optimizer state and data positions"
            " resume only at the layout they were saved at. To continue from its weights with a fresh optimizer,"
            f" start a run with checkpoint.load={path} checkpoint.resume=false (in a new output_dir, which keeps"
            " this run's checkpoints)")


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    """Read one checkpoint file; CheckpointError naming it when it is missing or cut short."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return reader(path)
    except Exception as exc:
        first = describe(exc, CheckpointError).split(". ")[0]
        raise CheckpointError(f"{path} is unreadable, truncated? ({first})") from exc


def _torch_load(path: Path) -> Any:
    return torch.load(path, weights_only=False)


def _read_local_state(path: Path, optimizer) -> dict:
    """Every file this rank needs, read before any collective (local; raises CheckpointError)."""
    distributed = _uses_distributed_optimizer(optimizer)
    state = _read(path / "trainer_state.json", lambda p: json.loads(p.read_text()))
    problem = _layout_problem(path, state.get("layout"), distributed)
    if problem:
        raise CheckpointError(problem)
    tag = _layout_tag()
    files = {"state": state, "mine": _read(path / "ranks" / f"rank_{dist.get_rank()}.pt", _torch_load),
             "common": _read(path / "optimizer" / f"common_{tag}.pt", _torch_load)}  # saved by DP rank 0, read by all
    if distributed and ps.get_data_parallel_rank() == 0:  # DP rank 0 scatters the parameter state
        files["params_file"] = path / "optimizer" / f"params_{tag}.pt"
        files["params"] = _read(files["params_file"], _torch_load)
    return files


def _dp_zero_optimizers(optimizer) -> list:
    return [o for o in _inner_optimizers(optimizer) if hasattr(o, "load_parameter_state_from_dp_zero")]


def _parameter_states(optimizer, states) -> list:
    """The per-optimizer entries of a `params_*.pt` file: one state dict, or a list for a chained optimizer."""
    return [states] if len(_inner_optimizers(optimizer)) == 1 else list(states)


def _parameter_state_size_problem(optimizer, states) -> str | None:
    """megatron asserts the buffer sizes on DP rank 0 alone, inside the scatter the other ranks wait in (a hang):
    compare them here (another trainable set or model gives other sizes)."""
    try:
        for opt, state in zip(_dp_zero_optimizers(optimizer), _parameter_states(optimizer, states)):
            for i, ranges in enumerate(opt.gbuf_ranges):
                for dtype in ranges:
                    want, have = opt.buffers[i].numel_unpadded, state[i][dtype]["numel_unpadded"]
                    if want != have:
                        return (f"the optimizer state covers {have:,} parameter elements, this run trains {want:,}"
                                " (another train.trainable set?)")
    except (AttributeError, KeyError, IndexError, TypeError):  # another megatron-core layout of the file
        return None
    return None


def _load_parameter_state(optimizer, states) -> None:
    """Collective over DP: megatron's `load_parameter_state` minus its own file read (done earlier, by us)."""
    opts = _dp_zero_optimizers(optimizer)
    entries = _parameter_states(optimizer, states) if states is not None else [None] * len(opts)
    # fp32 main params are views of the (grad-requiring) model params: megatron 0.16 copies into them
    # in place, which autograd forbids outside no_grad.
    with torch.no_grad(), _megatron_legacy_load_fixes():
        for opt, state in zip(opts, entries):
            if not getattr(opt, "is_stub_optimizer", False):
                opt.load_parameter_state_from_dp_zero(state)


def load_checkpoint(root: str | Path, step: int, chunks, optimizer, scheduler) -> tuple[int, dict]:
    """Collective. Restore step `step` (rank 0's `latest_step`, shared by every rank) into model, optimizer,
    scheduler and RNG; returns (step, extra). Raises CheckpointError on every rank when it cannot."""
    path = _step_dir(Path(root), step)
    set_phase(f"read checkpoint step {step}")
    try:
        files, problem = _read_local_state(path, optimizer), None
    except CheckpointError as exc:
        files, problem = {}, exc
    agree_on_errors(problem, CheckpointError)
    load_model(chunks, path / "model")  # names tensors of another shape (another model) itself
    set_phase(f"load optimizer step {step}")
    try:  # local: the optimizer's own structure against the files (another trainable set fails here)
        size = _parameter_state_size_problem(optimizer, files["params"]) if "params" in files else None
        if size:
            raise CheckpointError(f"{files['params_file']}: {size}")
        optimizer.load_state_dict(files["common"])
        problem = None
    except CheckpointError as exc:
        problem = exc
    except Exception as exc:
        problem = CheckpointError(f"{path / 'optimizer'} does not fit this run's optimizer (another"
                                  f" train.trainable set?): {describe(exc, CheckpointError)}")
    agree_on_errors(problem, CheckpointError)
    if _uses_distributed_optimizer(optimizer):
        _load_parameter_state(optimizer, files.get("params"))
    _unshare_adam_steps(optimizer)
    scheduler.load_state_dict(files["state"]["scheduler"])
    _set_rng_state(files["mine"]["rng"])
    dist.barrier()
    return files["state"]["step"], files["mine"]["extra"]
