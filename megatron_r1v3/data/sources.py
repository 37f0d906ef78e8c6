"""Where a run's samples and tokenizer come from (SFT, GRPO, evaluation alike).

With no `data.train` files the embedded toy task is generated (rank 0, deterministic) into `data.toy_dir`; with no
`data.tokenizer` the toy tokenizer is built next to it. Every rank then reads the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_r1v3.config import ConfigError, RunConfig
from megatron_r1v3.data.synthetic import TASKS
from megatron_r1v3.data.tiling import TilingConfig
from megatron_r1v3.data.tokenizer import check_special_ids, load_tokenizer, toy_tokenizer


@dataclass
class DataSources:
    """Resolved inputs of a run (identical on every rank)."""

    train: list[str]
    val: list[str]
    root: str | None
    tokenizer_dir: Path
    tokenizer: object


def tiling_for(cfg: RunConfig) -> TilingConfig:
    """The tiling every consumer of this model uses (tile size = the ViT's input size)."""
    return TilingConfig(tile_size=cfg.model.vision.image_size, max_tiles=cfg.data.max_tiles,
                        use_thumbnail=cfg.data.use_thumbnail)


def check_toy_tasks(tasks) -> None:
    """`data.toy_tasks` must be a non-empty subset of the embedded task kinds."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"data.toy_tasks={list(tasks)} must be a non-empty subset of {list(TASKS)}")


def prepare_data(cfg: RunConfig, rank: int) -> DataSources:
    """Generate the toy task / toy tokenizer if the config asks for them (rank 0), then load on every rank."""
    d = cfg.data
    toy_dir = Path(d.toy_dir or Path(cfg.output_dir) / "toy_data")
    train, val, root = list(d.train), list(d.val), d.root
    if not train:
        check_toy_tasks(d.toy_tasks)
    if rank == 0:
        if not train:
            _generate_toy(cfg, toy_dir)
        if d.tokenizer is None:
            toy_tokenizer(toy_dir.parent / "tokenizers")
    if dist.is_initialized():
        dist.barrier()
    if not train:  # toy image paths are relative to their JSONL's folder (RecordReader's default root)
        prefix = "pretrain_" if d.toy_kind == "pretrain" else ""
        train, val = [str(toy_dir / f"{prefix}train.jsonl")], val or [str(toy_dir / f"{prefix}val.jsonl")]
        if d.toy_kind == "mixed":  # traces plus the captions of the same images (keeps the model seeing)
            train = [str(toy_dir / "pretrain_train.jsonl"), *train]
    tok_dir = Path(d.tokenizer) if d.tokenizer else toy_tokenizer(toy_dir.parent / "tokenizers")
    tokenizer = load_tokenizer(tok_dir)
    check_special_ids(tokenizer, cfg.model)
    return DataSources(train, val, root, tok_dir, tokenizer)


def _generate_toy(cfg: RunConfig, toy_dir: Path) -> None:
    from megatron_r1v3.data.synthetic import generate_toy_dataset

    if all((toy_dir / f).is_file() for f in ("train.jsonl", "val.jsonl", "pretrain_train.jsonl")):
        return
    d = cfg.data
    generate_toy_dataset(toy_dir, n_train=d.toy_train, n_val=d.toy_val, seed=cfg.seed,
                         image_size=cfg.model.vision.image_size, wrong_fraction=d.toy_wrong_fraction,
                         tasks=tuple(d.toy_tasks), reflect_fraction=d.toy_reflect_fraction)
