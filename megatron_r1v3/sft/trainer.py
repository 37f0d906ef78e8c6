"""Supervised fine-tuning on megatron-core: R1V3 cold-start SFT and connector-only tuning (same loop, different
trainable set). Reads top to bottom: data -> model -> freeze -> DDP/optimizer/schedule -> resume -> steps
(train, log, evaluate, early-stop, checkpoint)."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import torch.distributed as dist

from megatron_r1v3.bridge.convert import write_training_meta
from megatron_r1v3.config import RunConfig, to_yaml
from megatron_r1v3.models.build import build_model
from megatron_r1v3.parallel import init_parallel
from megatron_r1v3.parallel.phase import set_phase
from megatron_r1v3.sft.data import DataSources, make_iterator, prepare_data
from megatron_r1v3.training.checkpoint import load_model
from megatron_r1v3.training.freeze import apply_trainable
from megatron_r1v3.training.logger import RunLogger
from megatron_r1v3.training.optimizer import build_optimizer, wrap_ddp
from megatron_r1v3.training.preemption import PreemptionWatch, clear_marker, mark_preempted
from megatron_r1v3.training.resume import load_checkpoint, save_checkpoint
from megatron_r1v3.training.scheduler import build_scheduler
from megatron_r1v3.training.step import eval_loss, train_step


def load_initial_weights(chunks, path: str) -> None:
    """Weights from a megatron_r1v3 checkpoint: a converted dir, a training `step_*` dir, or a run's checkpoints
    root (its `latest`)."""
    root = Path(path)
    if (root / "latest").is_file():
        root = root / (root / "latest").read_text().strip()
    load_model(chunks, root / "model")


def write_items(path: Path, items: list[dict]) -> None:
    """Per-item answers as JSONL (one object per held-out sample)."""
    path.write_text("".join(json.dumps(i) + "\n" for i in items))


def _microbatches(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def evaluate(ddp, sources: DataSources, cfg: RunConfig, state) -> float | None:
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
    return eval_loss(ddp, batches) if batches else None


def run_sft(cfg: RunConfig) -> dict:
    """Train; returns the per-step losses and final metrics (rank 0 also logs them to TensorBoard)."""
    state = init_parallel(cfg)
    out = Path(cfg.output_dir)
    ckpt_root = Path(cfg.checkpoint.dir or out / "checkpoints")
    if state.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    sources = prepare_data(cfg, state)

    chunks = build_model(cfg, init=cfg.checkpoint.load is None)
    if cfg.checkpoint.load:
        load_initial_weights(chunks, cfg.checkpoint.load)
    trainable = apply_trainable(chunks, cfg.train.trainable)
    ddp = wrap_ddp(chunks, cfg)
    optimizer = build_optimizer(ddp, cfg)
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.train.steps)
    train_iter = make_iterator(sources, cfg, state, split="train")

    describe = partial(write_training_meta, cfg, sources.tokenizer_dir)
    step = 0
    if cfg.checkpoint.resume:
        resumed = load_checkpoint(ckpt_root, chunks, optimizer, scheduler)
        if resumed is not None:
            step, extra = resumed
            train_iter.load_state_dict(extra["data"])

    log = RunLogger(out, cfg.logging.tensorboard, prefix="sft", progress_total=cfg.train.steps if
                    cfg.logging.progress else None, progress_start=step)
    log.text(f"[sft] {cfg.train.trainable}: {trainable['trainable']:,} trainable / {trainable['frozen']:,} frozen"
             f" parameters on rank 0; TP{state.tp}·PP{state.pp}·DP{state.dp}; starting at step {step}")
    n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * state.dp)
    losses, best, stale, val = [], float("inf"), 0, None
    clear_marker(out)
    watch, preempted = PreemptionWatch(), False
    while step < cfg.train.steps:
        step += 1
        set_phase(f"sft step {step}")
        t0 = time.perf_counter()
        batches = _microbatches(train_iter, n_micro)
        metrics = train_step(ddp, optimizer, batches)
        scheduler.step(increment=1)
        seconds = time.perf_counter() - t0
        losses.append(metrics["loss"])
        log.advance(loss=metrics["loss"])
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            tokens = sum(float(b["loss_mask"].sum()) for b in batches) * state.dp
            images = sum(b.get("num_images", 0) for b in batches) * state.dp
            log.scalars(step, {
                "loss": metrics["loss"], "lr": optimizer.param_groups[0]["lr"], "grad_norm": metrics["grad_norm"],
                "tokens_per_s": tokens / seconds, "images_per_s": images / seconds,
                "skipped_samples": float(sum(train_iter.stats.skipped.values())
                                         + sum(train_iter.stats.skipped_records.values())),
            })
        if cfg.train.eval_every and step % cfg.train.eval_every == 0:
            val = evaluate(ddp, sources, cfg, state)
            if val is not None:
                log.scalars(step, {"loss": val}, group="val")
                best, stale = (val, 0) if val < best else (best, stale + 1)
                if cfg.train.early_stop_patience and stale >= cfg.train.early_stop_patience:
                    log.text(f"[sft] early stop at step {step}: val loss {val:.4f}, best {best:.4f}")
                    break
        if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0 and step < cfg.train.steps:
            save_checkpoint(ckpt_root, step, chunks, optimizer, scheduler, {"data": train_iter.state_dict()},
                            cfg.checkpoint.keep_last, describe)
        if watch.requested():
            log.text(f"[sft] preemption signal: checkpointing step {step} and exiting for requeue")
            preempted = True
            break
    save_checkpoint(ckpt_root, step, chunks, optimizer, scheduler, {"data": train_iter.state_dict()},
                    cfg.checkpoint.keep_last, describe)
    watch.restore()
    if preempted:
        mark_preempted(out, step)
    heldout = None
    if cfg.train.heldout_samples and sources.val and not preempted:
        from megatron_r1v3.sft.heldout import heldout_answers

        heldout = heldout_answers(chunks, cfg, sources, limit=cfg.train.heldout_samples)
        log.scalars(step, {"well_formed": heldout["well_formed"], "accuracy": heldout["accuracy"]}, group="heldout")
        if state.rank == 0:
            write_items(out / "heldout.jsonl", heldout["items"])
    train_iter.close()
    log.close()
    dist.barrier()
    skipped = dict(train_iter.stats.skipped + train_iter.stats.skipped_records)
    return {"losses": losses, "step": step, "val_loss": val, "skipped": skipped, "heldout": heldout,
            "preempted": preempted,
            "checkpoint": str(ckpt_root), "tokenizer": str(sources.tokenizer_dir), "chunks": chunks}

