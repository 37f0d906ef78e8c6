"""The SFT microbatches of one data-parallel rank, and the validation loss over them."""

from __future__ import annotations

from megatron_r1v3.config import RunConfig
from megatron_r1v3.data.sft_dataset import SFTBatchIterator
from megatron_r1v3.data.sources import DataSources, tiling_for
from megatron_r1v3.training.step import eval_loss


def make_iterator(sources: DataSources, cfg: RunConfig, state, split: str) -> SFTBatchIterator:
    """This DP rank's fixed-shape microbatches: endless shuffled epochs for `train`, one ordered pass for `val`."""
    train = split == "train"
    return SFTBatchIterator.from_files(
        sources.train if train else sources.val, sources.tokenizer, root=sources.root, strict=cfg.data.strict,
        tiling=tiling_for(cfg), tokens_per_tile=cfg.model.tokens_per_tile, seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.train.micro_batch_size, decoder=cfg.data.decoder, pack=cfg.data.pack and train,
        seed=cfg.seed, shuffle=train, dp_rank=state.dp_rank, dp_size=state.dp, num_epochs=None if train else 1,
        decode_threads=cfg.data.decode_threads,
    )


def validation_loss(chunks, sources: DataSources, cfg: RunConfig, state) -> float | None:
    """Mean validation loss over up to `train.eval_batches` microbatches (same on every rank)."""
    if not sources.val:
        return None
    it = make_iterator(sources, cfg, state, split="val")
    batches = []
    for batch in it:
        batches.append(batch)
        if len(batches) == cfg.train.eval_batches:
            break
    it.close()
    return eval_loss(chunks, batches) if batches else None
