"""The run scaffold SFT and GRPO share: everything around their steps, in one order.

    init_parallel -> checkpoints root (rank 0: stale partials, `latest`, completion) -> output dir + config.yaml ->
    data sources -> model (+ initial weights) -> trainable set -> megatron DDP -> optimizer -> LR schedule ->
    resume (model, optimizer, schedule, RNG, the loop's own state) -> logger + preemption watch ->
    steps (periodic checkpoint, preemption check) -> final checkpoint -> (the loop's final evaluation) -> `COMPLETE`

A loop builds a `TrainingRun`, creates its own stateful objects (data iterator, prompt sampler, sample buffer),
hands them to `resume(...)` — they are checkpointed and restored by name from then on — and iterates `steps()`.

A run that ended (not preempted) leaves `<output_dir>/COMPLETE`. Started again with the same command (a requeued
or re-submitted job), it raises `RunAlreadyComplete` before it writes anything — no config, checkpoint, metrics,
TensorBoard file or final evaluation — unless `train.steps` was raised, in which case it resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch.distributed as dist

from megatron_r1v3.bridge.convert import check_checkpoint_model, write_training_meta
from megatron_r1v3.config import RunConfig, to_yaml
from megatron_r1v3.data.sources import prepare_data
from megatron_r1v3.models.build import build_model
from megatron_r1v3.models.weights import CheckpointError, load_initial_weights
from megatron_r1v3.parallel import init_parallel
from megatron_r1v3.parallel.phase import set_phase
from megatron_r1v3.training.freeze import apply_trainable
from megatron_r1v3.training.logger import RunLogger
from megatron_r1v3.training.optimizer import build_optimizer, wrap_ddp
from megatron_r1v3.training.preemption import PreemptionWatch, clear_marker, mark_preempted
from megatron_r1v3.training.resume import latest_step, load_checkpoint, remove_stale_partials, save_checkpoint
from megatron_r1v3.training.scheduler import build_scheduler

COMPLETE = "COMPLETE"


class RunAlreadyComplete(Exception):
    """The run in this output directory has ended already and `train.steps` was not raised: nothing to do."""


def _startup_view(out: Path, ckpt_root: Path, cfg: RunConfig) -> dict:
    """Rank 0, before any rank reads the checkpoints root: remove stale partial saves, find `latest` and the
    completion record (only when resuming)."""
    view = {"latest": None, "complete": None, "error": None}
    try:
        remove_stale_partials(ckpt_root)
        if not cfg.checkpoint.resume:
            return view
        view["latest"] = latest_step(ckpt_root)
        marker = out / COMPLETE
        if marker.is_file():
            record = json.loads(marker.read_text())
            if cfg.train.steps <= record["train_steps"]:
                view["complete"] = record
    except CheckpointError as exc:
        view["error"] = str(exc)
    except (OSError, ValueError, KeyError) as exc:  # told to every rank, not left to rank 0 alone
        view["error"] = f"cannot read the run's state in {out} / {ckpt_root}: {type(exc).__name__}: {exc}"
    return view


class TrainingRun:
    """Process groups, data sources, model chunks, DDP, optimizer, schedule, checkpoints, logger and preemption of
    one training run (collective: every rank builds one). Raises RunAlreadyComplete (every rank) when the run has
    ended already, CheckpointError when its `latest` is unusable."""

    def __init__(self, cfg: RunConfig, prefix: str):
        self.cfg, self.prefix = cfg, prefix
        self.state = init_parallel(cfg)
        self.out = Path(cfg.output_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir or self.out / "checkpoints")
        view = [_startup_view(self.out, self.ckpt_root, cfg) if self.state.rank == 0 else None]
        dist.broadcast_object_list(view, src=0)  # one view for every rank (no rank reads the root before this)
        view = view[0]
        if view["error"]:
            raise CheckpointError(view["error"])
        if view["complete"]:
            done = view["complete"]
            raise RunAlreadyComplete(
                f"{self.out} is complete: {done['step']} steps of train.steps={done['train_steps']}"
                f" (checkpoint {self.ckpt_root}); nothing to do — raise train.steps to continue")
        self.latest = view["latest"]
        if self.state.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))
        self.sources = prepare_data(cfg, self.state.rank)
        self.chunks = self.initial_model()
        self.trainable = apply_trainable(self.chunks, cfg.train.trainable)
        self.ddp = wrap_ddp(self.chunks, cfg)
        self.optimizer = build_optimizer(self.ddp, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg.optimizer, cfg.train.steps)
        self.step, self.saved_step, self.preempted = 0, None, False
        self._stateful: dict[str, object] = {}
        self.log: RunLogger | None = None
        self.watch: PreemptionWatch | None = None

    def initial_model(self, frozen: bool = False) -> list:
        """Model chunks with `checkpoint.load`'s weights (random init without one). `frozen`: a gradient-free copy
        of the initial policy (the KL reference): the loaded weights, or the policy's own initial ones."""
        load = self.cfg.checkpoint.load
        if load:
            check_checkpoint_model(self.cfg.model, load)
        chunks = build_model(self.cfg, init=load is None and not frozen)
        if load:
            load_initial_weights(chunks, load)
        elif frozen:
            for copy, policy in zip(chunks, self.chunks):
                copy.load_state_dict(policy.state_dict())
        for p in (p for c in chunks for p in c.parameters() if frozen):
            p.requires_grad_(False)
        return chunks

    def resume(self, **stateful) -> int:
        """Register the loop's own checkpointed objects (`state_dict`/`load_state_dict`; None = not used), restore
        the latest checkpoint when `checkpoint.resume` and one exists, then start logging and the preemption watch.
        Returns the step to continue from."""
        self._stateful = stateful
        if self.latest is not None:
            self.step, extra = load_checkpoint(self.ckpt_root, self.latest, self.chunks, self.optimizer,
                                               self.scheduler)
            self.saved_step = self.step
            for name, obj in stateful.items():
                if obj is not None and extra.get(name) is not None:
                    obj.load_state_dict(extra[name])
        cfg, s = self.cfg, self.state
        self.log = RunLogger(self.out, cfg.logging.tensorboard, prefix=self.prefix,
                             progress_total=cfg.train.steps if cfg.logging.progress else None,
                             progress_start=self.step)
        self.log.text(f"[{self.prefix}] {cfg.train.trainable}: {self.trainable['trainable']:,} trainable /"
                      f" {self.trainable['frozen']:,} frozen parameters on rank 0; {s.layout.label()};"
                      f" starting at step {self.step}")
        clear_marker(self.out)
        if s.rank == 0:  # this run goes on: an earlier completion record (fewer train.steps, or no resume) is void
            (self.out / COMPLETE).unlink(missing_ok=True)
        self.watch = PreemptionWatch()
        return self.step

    def steps(self) -> Iterator[int]:
        """The step numbers left to run. After each step: the periodic checkpoint, then the (collective) preemption
        check, which saves nothing itself and ends the iteration; `finish()` writes the checkpoint."""
        total, every = self.cfg.train.steps, self.cfg.checkpoint.save_every
        while self.step < total:
            self.step += 1
            set_phase(f"{self.prefix} step {self.step}")
            yield self.step
            if every and self.step % every == 0 and self.step < total:
                self.save()
            if self.watch.requested():
                self.log.text(f"[{self.prefix}] preemption signal: checkpointing step {self.step} and exiting"
                              " for requeue")
                self.preempted = True
                return

    def save(self) -> None:
        """Collective: checkpoint the current step (a step already saved is not written again)."""
        if self.saved_step == self.step:
            return
        extra = {name: obj.state_dict() if obj is not None else None for name, obj in self._stateful.items()}
        describe = partial(write_training_meta, self.cfg, self.sources.tokenizer_dir)
        save_checkpoint(self.ckpt_root, self.step, self.chunks, self.optimizer, self.scheduler, extra,
                        self.cfg.checkpoint.keep_last, describe)
        self.saved_step = self.step

    def finish(self) -> None:
        """Final checkpoint and signal handlers restored; after a preemption, the requeue marker."""
        self.save()
        self.watch.restore()
        if self.preempted:
            mark_preempted(self.out, self.step)

    def close(self) -> None:
        """The end of the run, after the loop's final evaluation: unless preempted, record it as complete."""
        self.log.close()
        if self.state.rank == 0 and not self.preempted:
            record = self.out / (COMPLETE + ".tmp")
            record.write_text(json.dumps({"step": self.step, "train_steps": self.cfg.train.steps}) + "\n")
            os.replace(record, self.out / COMPLETE)
        dist.barrier()
