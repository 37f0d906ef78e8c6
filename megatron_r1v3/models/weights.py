"""Model weights on disk through megatron-core dist_checkpointing: saved at one TP/PP/VPP layout, loadable at any
other. Used by conversion, training checkpoints, evaluation and compare-hf alike.

One checkpoint for both layer specs: tensors carry the same keys (Transformer Engine names; see
`bridge/mcore_layout.py`), so only `_extra_state` objects differ. A TE model holds more of them (its final RMSNorm's,
core attention's where megatron saves it) and fills them with FP8 metadata; local layers hold `None`, and so do
converted checkpoints. Loading therefore treats an `_extra_state` object as optional both ways: one the checkpoint
lacks loads as `None` (TE's `set_extra_state(None)` returns at once and keeps the module's fresh FP8 metadata, so
delayed scaling restarts its amax history: TransformerEngine transformer_engine/pytorch/module/base.py, ops/op.py),
one the model lacks is skipped. A missing or surplus *tensor* is an error naming the keys.

A checkpoint that cannot load raises CheckpointError on every rank together, naming the file: before the collective
load, each rank checks the DCP index against the shard files (truncated copies) and the saved global shapes against
its model's (another model), and the ranks agree on what they found (`parallel.agree`).
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Iterator
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_r1v3.models.build import unwrap_model
from megatron_r1v3.parallel.agree import agree_on_errors, describe
from megatron_r1v3.parallel.phase import set_phase


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """{"model{i}": chunk i's sharded state dict}; keys inside are global (layer numbers include PP/VPP offsets)."""
    return {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(chunks)}


@contextlib.contextmanager
def write_results_in_process() -> Iterator[None]:
    """A synchronous save hands its write results back through a plain in-process queue.

    megatron-core's torch_dist writer (`strategies/filesystem_async.py`) collects them through a multiprocessing
    `Manager().Queue()` it starts on a process's first save, for async saves whose writer lives in another process.
    Its server is a freshly spawned interpreter that imports torch to unpickle the results: 2.7 s on the first
    save of every job and ~1.8 CPU-s per rank here (measured on the 2-core box: first model save 2.9 s, later
    ones 0.2 s). `dist_checkpointing.save` (no async request) writes and reads the results in this process, so a
    `queue.Queue` serves. Left as it is when megatron-core has no such module-level queue (a later version)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fs
    except ImportError:
        yield
        return
    if not hasattr(fs, "_results_queue"):
        yield
        return
    before = fs._results_queue
    fs._results_queue = queue.Queue()
    try:
        yield
    finally:
        fs._results_queue = before


def save_model(chunks: list[torch.nn.Module], path: str | Path) -> None:
    """Collective: every rank writes its shards into the (existing, empty) directory `path`."""
    set_phase(f"save_model {path}")
    Path(path).mkdir(parents=True, exist_ok=True)
    with write_results_in_process():
        dist_checkpointing.save(model_sharded_state_dict(chunks), str(path))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, of another model or layout). The message names the file
    and the mismatch; every rank raises it together (`parallel.agree`)."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint lacks tensors the model needs (strict), or holds tensors no rank's model asks for."""


_EXTRA_STATE = "_extra_state"


def optional_on_load(key: str) -> bool:
    """A checkpoint key that may be absent from the checkpoint or from the model: `_extra_state` objects (FP8
    metadata of TE layers, `None` for local layers)."""
    return key.endswith("." + _EXTRA_STATE)


def _extra_state_keys(module: torch.nn.Module) -> list[str]:
    """State-dict keys of the `_extra_state` entries under `module` (modules overriding `get_extra_state`)."""
    return [f"{name}.{_EXTRA_STATE}" if name else _EXTRA_STATE for name, m in module.named_modules()
            if type(m).get_extra_state is not torch.nn.Module.get_extra_state]


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")


def _sharded_tensors(chunks: list[torch.nn.Module]) -> list:
    """The ShardedTensors this rank's chunks load (factories such as the gated-MLP split applied)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = model_sharded_state_dict(chunks)
    apply_factories(sharded)
    return [v for v in nested_values(sharded) if isinstance(v, ShardedTensor)]


def checkpoint_problems(chunks: list[torch.nn.Module], path: str | Path) -> str | None:
    """Local checks of a model checkpoint before the (collective) load, naming the file and the mismatch: the
    directory and its index exist, no shard file is shorter than the index says (a truncated copy), and each
    tensor this rank loads has the model's global shape (another model's checkpoint). None when it looks usable."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not path.is_dir():
        return f"model checkpoint directory {path} does not exist"
    for name in ("metadata.json", ".metadata"):
        if not (path / name).is_file():
            return f"{path} is not a megatron dist checkpoint: {name} is missing"
    try:
        index = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # a truncated or foreign index file
        return f"{path / '.metadata'} is unreadable ({type(exc).__name__}: {exc})"
    needed: dict[str, int] = {}
    for item in index.storage_data.values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    problems = []
    for name, end in sorted(needed.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None or size < end:
            problems.append(f"{path / name} is " + ("missing" if size is None else
                                                    f"truncated: {size} bytes, its index needs {end}"))
    saved = {k: tuple(m.size) for k, m in index.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    shapes = [f"{t.key} {saved[t.key]} in the checkpoint, {tuple(t.global_shape)} in the model"
              for t in _sharded_tensors(chunks) if t.key in saved and saved[t.key] != tuple(t.global_shape)]
    if shapes:
        problems.append(f"{path} holds a model of another shape: {_listed(sorted(set(shapes)))}")
    return "; ".join(problems) or None


def _dcp_failure(exc: BaseException) -> BaseException:
    """torch DCP wraps each rank's error (with its traceback) in one CheckpointException: the first rank's own."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = failures[min(failures)]
        return getattr(inner, "exc", inner)
    return exc


def load_model(chunks: list[torch.nn.Module], path: str | Path, strict: bool = True) -> None:
    """Collective: fill this rank's chunks from a checkpoint saved at any layout, by either layer spec (TE or
    local). `strict=False` leaves parameters the checkpoint lacks as they are and ignores surplus tensors. A
    checkpoint that cannot load raises CheckpointError on every rank."""
    set_phase(f"load_model {path}")
    agree_on_errors(checkpoint_problems(chunks, path), CheckpointError)
    sharded = model_sharded_state_dict(chunks)
    # megatron's words: "unexpected" = asked for, absent from the checkpoint (dropped from the load here, per rank);
    # "missing" = in the checkpoint, asked for by no rank. RETURN_ALL reports both instead of failing inside the
    # load (the default, ASSUME_OK_UNEXPECTED, lets torch_dist fail on the first absent key).
    try:
        loaded, not_asked, absent = dist_checkpointing.load(sharded, str(path), strict=StrictHandling.RETURN_ALL)
        failure = None
    except Exception as exc:  # a shard corrupted in a way the checks above do not see; DCP raises on every rank
        failure = f"model checkpoint {path}: {describe(_dcp_failure(exc), CheckpointError)}"
    agree_on_errors(failure, CheckpointError)
    problems = []
    if strict:
        lacking = sorted(k for k in absent if not optional_on_load(k))
        surplus = sorted(k for k in not_asked if not optional_on_load(k))
        if lacking:
            problems.append(f"lacks {len(lacking)} tensor(s) the model needs: {_listed(lacking)}")
        if surplus:
            problems.append(f"holds {len(surplus)} tensor(s) the model does not: {_listed(surplus)}")
    # ranks load different keys
    agree_on_errors(f"model checkpoint {path} " + " and ".join(problems) if problems else None, CheckpointMismatch)
    for i, chunk in enumerate(chunks):
        model, state = unwrap_model(chunk), loaded[f"model{i}"]
        for key in _extra_state_keys(model):
            # absent from the checkpoint, or left out of the sharded state dict by megatron (core attention's in
            # megatron-core 0.16, local and TE alike): what a local layer or a converted checkpoint holds
            state.setdefault(key, None)
        model.load_state_dict(state, strict=strict)


def resolve_latest(root: str | Path) -> Path:
    """A run's checkpoints root (a `latest` file) -> the step directory it names; any other path as it is."""
    root = Path(root)
    pointer = root / "latest"
    if not pointer.is_file():
        return root
    step = root / pointer.read_text().strip()
    if not step.is_dir():
        raise CheckpointError(f"{pointer} names {step.name}, which does not exist in {root}")
    return step


def load_initial_weights(chunks: list[torch.nn.Module], path: str | Path) -> None:
    """Weights from a megatron_r1v3 checkpoint: a converted dir, a training `step_*` dir, or a run's checkpoints
    root (its `latest`)."""
    try:
        step, problem = resolve_latest(path), None
    except CheckpointError as exc:
        step, problem = None, exc
    agree_on_errors(problem, CheckpointError)
    load_model(chunks, step / "model")
