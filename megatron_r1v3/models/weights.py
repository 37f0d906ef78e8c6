"""Model weights on disk through megatron-core dist_checkpointing: saved at one TP/PP/VPP layout, loadable at any
other. Used by conversion, training checkpoints, evaluation and compare-hf alike.

One checkpoint for both layer specs: tensors carry the same keys (Transformer Engine names; see
`bridge/mcore_layout.py`), so only `_extra_state` objects differ. A TE model holds more of them (its final RMSNorm's,
core attention's where megatron saves it) and fills them with FP8 metadata; local layers hold `None`, and so do
converted checkpoints. Loading therefore treats an `_extra_state` object as optional both ways: one the checkpoint
lacks loads as `None` (TE's `set_extra_state(None)` returns at once and keeps the module's fresh FP8 metadata, so
delayed scaling restarts its amax history: TransformerEngine transformer_engine/pytorch/module/base.py, ops/op.py),
one the model lacks is skipped. A missing or surplus *tensor* is an error naming the keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_r1v3.models.build import unwrap_model
from megatron_r1v3.parallel.phase import set_phase


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """{"model{i}": chunk i's sharded state dict}; keys inside are global (layer numbers include PP/VPP offsets)."""
    return {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_model(chunks: list[torch.nn.Module], path: str | Path) -> None:
    """Collective: every rank writes its shards into the (existing, empty) directory `path`."""
    set_phase(f"save_model {path}")
    Path(path).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(path))


class CheckpointMismatch(RuntimeError):
    """The checkpoint lacks tensors the model needs (strict), or holds tensors no rank's model asks for."""


_EXTRA_STATE = "_extra_state"


def optional_on_load(key: str) -> bool:
    """A checkpoint key that may be absent from the checkpoint or from the model: `_extra_state` objects (FP8
    metadata of TE layers, `None` for local layers)."""
    return key.endswith("." + _EXTRA_STATE)


def _raise_on_any_rank(problem: str | None) -> None:
    """Collective over the world: every rank raises if one found a problem (ranks load different keys)."""
    problems = [problem]
    if dist.is_initialized() and dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    found = sorted({p for p in problems if p})
    if found:
        raise CheckpointMismatch("; ".join(found))


def _extra_state_keys(module: torch.nn.Module) -> list[str]:
    """State-dict keys of the `_extra_state` entries under `module` (modules overriding `get_extra_state`)."""
    return [f"{name}.{_EXTRA_STATE}" if name else _EXTRA_STATE for name, m in module.named_modules()
            if type(m).get_extra_state is not torch.nn.Module.get_extra_state]


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")


def load_model(chunks: list[torch.nn.Module], path: str | Path, strict: bool = True) -> None:
    """Collective: fill this rank's chunks from a checkpoint saved at any layout, by either layer spec (TE or
    local). `strict=False` leaves parameters the checkpoint lacks as they are and ignores surplus tensors."""
    set_phase(f"load_model {path}")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model checkpoint directory {path} does not exist")
    sharded = model_sharded_state_dict(chunks)
    # megatron's words: "unexpected" = asked for, absent from the checkpoint (dropped from the load here, per rank);
    # "missing" = in the checkpoint, asked for by no rank. RETURN_ALL reports both instead of failing inside the
    # load (the default, ASSUME_OK_UNEXPECTED, lets torch_dist fail on the first absent key).
    loaded, not_asked, absent = dist_checkpointing.load(sharded, str(path), strict=StrictHandling.RETURN_ALL)
    problems = []
    if strict:
        lacking = sorted(k for k in absent if not optional_on_load(k))
        surplus = sorted(k for k in not_asked if not optional_on_load(k))
        if lacking:
            problems.append(f"lacks {len(lacking)} tensor(s) the model needs: {_listed(lacking)}")
        if surplus:
            problems.append(f"holds {len(surplus)} tensor(s) the model does not: {_listed(surplus)}")
    _raise_on_any_rank(f"model checkpoint {path} " + " and ".join(problems) if problems else None)
    for i, chunk in enumerate(chunks):
        model, state = unwrap_model(chunk), loaded[f"model{i}"]
        for key in _extra_state_keys(model):
            # absent from the checkpoint, or left out of the sharded state dict by megatron (core attention's in
            # megatron-core 0.16, local and TE alike): what a local layer or a converted checkpoint holds
            state.setdefault(key, None)
        model.load_state_dict(state, strict=strict)


def load_initial_weights(chunks: list[torch.nn.Module], path: str | Path) -> None:
    """Weights from a megatron_r1v3 checkpoint: a converted dir, a training `step_*` dir, or a run's checkpoints
    root (its `latest`)."""
    root = Path(path)
    if (root / "latest").is_file():
        root = root / (root / "latest").read_text().strip()
    load_model(chunks, root / "model")
