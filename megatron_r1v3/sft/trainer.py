"""Supervised fine-tuning on megatron-core: R1V3 cold-start SFT and connector-only tuning (same loop, different
trainable set). The run scaffold (`training.run`) does set-up, resume, checkpoints and preemption; the loop here
reads top to bottom: microbatches -> step -> log -> evaluate / early stop; then held-out answers."""

from __future__ import annotations

import time

from megatron_r1v3.config import RunConfig
from megatron_r1v3.sft.data import make_iterator, validation_loss
from megatron_r1v3.training.run import TrainingRun
from megatron_r1v3.training.step import train_step


def run_sft(cfg: RunConfig) -> dict:
    """Train; returns the per-step losses and final metrics (rank 0 also logs them to TensorBoard)."""
    run = TrainingRun(cfg, "sft")
    state, t = run.state, cfg.train
    train_iter = make_iterator(run.sources, cfg, state, split="train")
    run.resume(data=train_iter)
    n_micro = t.global_batch_size // (t.micro_batch_size * state.dp)
    losses, best, stale, val = [], float("inf"), 0, None
    for step in run.steps():
        t0 = time.perf_counter()
        batches = [next(train_iter) for _ in range(n_micro)]
        metrics = train_step(run.ddp, run.optimizer, batches)
        run.scheduler.step(increment=1)
        seconds = time.perf_counter() - t0
        losses.append(metrics["loss"])
        run.log.advance(loss=metrics["loss"])
        if step % t.log_every == 0 or step == t.steps:
            stats = train_iter.stats
            run.log.scalars(step, {
                "loss": metrics["loss"], "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": metrics["grad_norm"],
                "tokens_per_s": sum(float(b["loss_mask"].sum()) for b in batches) * state.dp / seconds,
                "images_per_s": sum(b.get("num_images", 0) for b in batches) * state.dp / seconds,
                "skipped_samples": float(sum(stats.skipped.values()) + sum(stats.skipped_records.values())),
            })
        if t.eval_every and step % t.eval_every == 0:
            val = validation_loss(run.ddp, run.sources, cfg, state)
            if val is not None:
                run.log.scalars(step, {"loss": val}, group="val")
                best, stale = (val, 0) if val < best else (best, stale + 1)
                if t.early_stop_patience and stale >= t.early_stop_patience:
                    run.log.text(f"[sft] early stop at step {step}: val loss {val:.4f}, best {best:.4f}")
                    break
    run.finish()
    heldout = None
    if t.heldout_samples and run.sources.val and not run.preempted:
        from megatron_r1v3.sft.heldout import heldout_answers, write_items

        heldout = heldout_answers(run.chunks, cfg, run.sources, limit=t.heldout_samples)
        run.log.scalars(run.step, {"well_formed": heldout["well_formed"], "accuracy": heldout["accuracy"]},
                        group="heldout")
        if state.rank == 0:
            write_items(run.out / "heldout.jsonl", heldout["items"])
    train_iter.close()
    run.close()
    skipped = dict(train_iter.stats.skipped + train_iter.stats.skipped_records)
    return {"losses": losses, "step": run.step, "val_loss": val, "skipped": skipped, "heldout": heldout,
            "preempted": run.preempted, "checkpoint": str(run.ckpt_root),
            "tokenizer": str(run.sources.tokenizer_dir), "chunks": run.chunks}
