"""Model weights on disk through megatron-core dist_checkpointing: saved at one TP/PP/VPP layout, loadable at any
other. Used by conversion, training checkpoints, evaluation and compare-hf alike."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing

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


def load_model(chunks: list[torch.nn.Module], path: str | Path, strict: bool = True) -> None:
    """Collective: fill this rank's chunks from a checkpoint saved at any layout."""
    set_phase(f"load_model {path}")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model checkpoint directory {path} does not exist")
    loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), str(path))
    for i, chunk in enumerate(chunks):
        unwrap_model(chunk).load_state_dict(loaded[f"model{i}"], strict=strict)


def load_initial_weights(chunks: list[torch.nn.Module], path: str | Path) -> None:
    """Weights from a megatron_r1v3 checkpoint: a converted dir, a training `step_*` dir, or a run's checkpoints
    root (its `latest`)."""
    root = Path(path)
    if (root / "latest").is_file():
        root = root / (root / "latest").read_text().strip()
    load_model(chunks, root / "model")
