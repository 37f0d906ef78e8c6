"""GRPO on megatron-core with a colocated vLLM engine (R1V3 recipe, spec §3). The loop reads like a one-GPU loop:

    rollout (rank 0: sample G responses per prompt with vLLM) -> reward -> advantage (episode.py)
    -> loss + optimizer step (every rank: megatron pipeline schedule, policy_loss.py)
    -> refit (stream the new weights from the TP/PP shards into vLLM, rollout/refit.py)

Everything parallel lives below: `bridge.export` (TP gather, PP broadcast), megatron-core (schedules, DDP,
distributed optimizer); set-up, resume, checkpoints and preemption are `training.run`'s. Rank 0 hosts the engine
and decides the episode while the other ranks wait as long as it is alive (`parallel.wait.compute_on_rank`); the
rows reach them as token ids, and the first pipeline stage's ranks tile their own rows' images with the engine's
processor. Checkpoints hold, besides the run's state, the prompt sampler position and the selective sample buffer.
With `rl.rollout_tp >= 1` every rank hosts part of an SPMD engine (`rl/spmd_rollouts.py`): the episode runs on
every rank in lockstep, the engines sleep while the trainer runs, and refits are per engine rank and freeze-aware.
"""

from __future__ import annotations

import re
import time
from functools import partial

from megatron_r1v3.bridge.mapping import parameter_names
from megatron_r1v3.config import RunConfig, prompt_token_budget
from megatron_r1v3.parallel.phase import set_phase
from megatron_r1v3.parallel.wait import compute_on_rank
from megatron_r1v3.rl.batch import episode_microbatches, vision_counts
from megatron_r1v3.rl.buffer import SelectiveSampleBuffer
from megatron_r1v3.rl.episode import collect_episode
from megatron_r1v3.rl.evaluate import evaluate_heldout
from megatron_r1v3.rl.loss import PROB_ERROR_ALARM
from megatron_r1v3.rl.policy_loss import count_units, loss_function, reduce_metrics, write_logprobs
from megatron_r1v3.rl.prompts import PromptSampler, difficulties, load_prompts
from megatron_r1v3.rl.rollouts import PixelSource
from megatron_r1v3.rl.spmd_rollouts import refit_engines, start_engines
from megatron_r1v3.training.freeze import trainable_patterns
from megatron_r1v3.training.logger import StepTimer
from megatron_r1v3.training.run import TrainingRun
from megatron_r1v3.training.step import train_step

CONSOLE = ("reward/mean", "reward/accuracy", "reward/format", "response/length_mean", "actor/entropy",
           "rollout/critical_entropy", "rollout/prob_error", "adv/zero_advantage_fraction", "actor/grad_norm",
           "refit/seconds", "rollout/gen_tokens_per_s", "time/step", "time/overhead_fraction")


def connector_frozen(spec: str) -> bool:
    """True when the trainable set `spec` leaves every connector (mlp1) parameter frozen."""
    return not any(re.search(p, name) for p in trainable_patterns(spec) for name in parameter_names("mlp1"))


def train_on(rows, run: TrainingRun, ref_chunks, pixels: PixelSource, step: int) -> dict:
    """Loss and one optimizer step on the episode's rows (each DP rank its share, in whole microbatches)."""
    cfg = run.cfg
    mbs = episode_microbatches(rows, run.state, cfg.train.micro_batch_size, cfg.model, pixels, step,
                               cfg.rl.share_vision, cfg.rl.micro_batch_tokens)
    before = vision_counts([], run.chunks)
    t0 = time.perf_counter()
    if cfg.rl.old_logprobs == "recompute":
        write_logprobs(run.ddp, mbs, "old_logp")
    if ref_chunks is not None:
        write_logprobs(ref_chunks, mbs, "ref_logp")
    logprob_pass = time.perf_counter() - t0
    total = count_units(mbs, cfg.rl.agg)
    t0 = time.perf_counter()
    result = train_step(run.ddp, run.optimizer, mbs, loss_function(cfg.rl, total, len(mbs)))
    metrics = reduce_metrics(result["outputs"])
    metrics.update(vision_metrics(vision_counts(mbs, run.chunks) - before, run.state.tp))
    metrics.update({"actor/loss": result["loss"], "time/forward_backward_step": time.perf_counter() - t0,
                    "time/logprob_pass": logprob_pass, "actor/grad_norm": result["grad_norm"],
                    "actor/lr": run.optimizer.param_groups[0]["lr"],
                    "actor/seq_length": float(max(mb["input_ids"].shape[1] for mb in mbs)),
                    "actor/rows": float(len(rows)), "actor/microbatches": float(len(mbs)),
                    "actor/padded_tokens": float(sum(mb["input_ids"].numel() for mb in mbs))})
    return metrics


def vision_metrics(local, tp: int) -> dict:
    """ViT work of the step over every first-stage rank (TP ranks count the same tiles once): tiles encoded (all
    passes), tiles the microbatches hold, and what one vision forward per row would encode."""
    import torch.distributed as dist

    from megatron_r1v3.parallel.init import compute_device

    total = local.to(compute_device())
    dist.all_reduce(total)
    encoded, held, per_row = (total / tp).tolist()
    return {"vision/encoded_tiles": encoded, "vision/tiles_per_pass": held, "vision/tiles_per_pass_unshared": per_row}


def step_timing(metrics: dict, timer: StepTimer, total: float, refit_seconds: float, cfg: RunConfig) -> None:
    """Phase times, and the overhead fraction: everything but generation, the trainer's forward/backward/optimizer
    step (incl. logprob passes) and the refit — rewards, advantages, broadcast, batching, metrics (target <= 5%)."""
    metrics.update({f"time/{k}": v for k, v in timer.seconds.items()})
    metrics["time/step"] = total
    core = metrics["time/generate"] + metrics["time/forward_backward_step"] + refit_seconds
    if cfg.rl.old_logprobs == "recompute" or cfg.rl.kl_coef:
        core += metrics["time/logprob_pass"]
    metrics["time/overhead_fraction"] = max(0.0, total - core) / total
    metrics["rollout/gen_tokens_per_s"] = metrics["generated_tokens"] / max(metrics["time/generate"], 1e-9)


def run_grpo(cfg: RunConfig) -> dict:
    """Train; returns per-step metrics and evaluations (rank 0 also writes TensorBoard + metrics.jsonl)."""
    run = TrainingRun(cfg, "rl")
    r, src = cfg.rl, run.sources
    train_pixels = PixelSource(cfg, load_prompts(src.train, src.root, cfg.data.strict), src.tokenizer)
    val_pixels = PixelSource(cfg, load_prompts(src.val, src.root, cfg.data.strict), src.tokenizer) if src.val else None
    ref_chunks = run.initial_model(frozen=True) if r.kl_coef else None
    sampler = PromptSampler(len(train_pixels.samples), cfg.seed, difficulty=difficulties(train_pixels.samples)
                            if cfg.rl.curriculum == "easy_to_hard" else None)
    buffer = (SelectiveSampleBuffer(r.ssb_capacity, r.ssb_zero_variance_threshold, r.ssb_max_replay_fraction,
                                    max_age=r.ssb_max_age, seed=cfg.seed) if r.ssb else None)
    # rank 0 decides the episodes, so its sampler and buffer are the ones that matter (others stay empty)
    step = run.resume(sampler=sampler, ssb=buffer)
    run.log.text(f"[rl] {r.prompts_per_step} prompts x {r.samples_per_prompt} samples per step")
    if train_pixels.skipped:  # each one named in the log by rl.prompts.fit_prompts
        run.log.text(f"[rl] {len(train_pixels.skipped)} of {len(train_pixels.skipped) + len(train_pixels.samples)}"
                     f" training prompts skipped (over rl.max_prompt_tokens={prompt_token_budget(cfg)} or unreadable)")
    if connector_frozen(cfg.train.trainable):
        run.log.text("[rl] WARNING: the connector (mlp1) is frozen; the R1V3 report saw RL collapse into"
                     " repetitive text when the connector does not train")
    spmd = r.rollout_tp > 0  # SPMD engines on every rank (rollout/engine_group.py), else one engine on rank 0
    worker = start_engines(cfg, src.tokenizer_dir, src.tokenizer, run.out / "vllm_model", run.chunks)
    if spmd:
        run.log.text(f"[rl] {worker.layout.engines} vLLM engine(s) x TP{r.rollout_tp} up in "
                     f"{worker.engine.start_seconds:.1f}s (dummy weights until the first refit)")
    elif worker is not None:
        run.log.text(f"[rl] vLLM engine up in {worker.engine.start_seconds:.1f}s (in-process on rank 0)")

    def push():
        return refit_engines(worker, run.chunks, cfg)

    push()
    history = {"train": [], "eval": []}

    def evaluate(at: int) -> None:
        if val_pixels is not None:
            set_phase(f"evaluate step {at}")
            ev = evaluate_heldout(run.chunks, cfg, worker, val_pixels, run.state, at, run.out / "evals")
            history["eval"].append({"step": at, **ev})
            run.log.scalars(at, ev, group="heldout")

    if step == 0:
        evaluate(0)
    for step in run.steps():
        timer, t_step = StepTimer(), time.perf_counter()
        with timer("rollout"):
            episode = partial(collect_episode, cfg, worker, train_pixels, sampler, buffer, step)
            if spmd:  # every rank in lockstep (same sampler, buffer and gathered samples), then the engines sleep
                rows, roll_metrics = episode()
                worker.sleep()
            else:  # rank 0 runs it
                rows, roll_metrics = compute_on_rank(episode, f"rollout step {step}", cfg.parallel.timeout_s)
        with timer("train"):
            metrics = train_on(rows, run, ref_chunks, train_pixels, step)
            run.scheduler.step(increment=1)
        with timer("refit"):
            stats = push()
        metrics.update(roll_metrics)
        metrics["prompts/skipped_train"] = float(len(train_pixels.skipped))
        metrics.update({"refit/seconds": stats.total_seconds, "refit/gb_per_s": stats.gb_per_s,
                        "refit/buckets": float(stats.buckets), "refit/bytes": float(stats.bytes),
                        "refit/skipped_bytes": float(stats.skipped_bytes),
                        "refit/received_bytes": float(stats.received_bytes or stats.bytes)})
        step_timing(metrics, timer, time.perf_counter() - t_step, stats.total_seconds, cfg)
        if metrics["rollout/prob_error"] > PROB_ERROR_ALARM:
            run.log.text(f"[rl] WARNING step {step}: train-vs-rollout probability error "
                         f"{metrics['rollout/prob_error']:.4f} > {PROB_ERROR_ALARM} (stale or wrongly pushed weights?)")
        history["train"].append({"step": step, **metrics})
        run.log.advance(reward=metrics["reward/mean"])
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            run.log.scalars(step, metrics, echo=CONSOLE)
        if r.eval_every and step % r.eval_every == 0 and step < cfg.train.steps:
            evaluate(step)
    run.finish()
    evaluated_last = history["eval"] and history["eval"][-1]["step"] == run.step
    if not run.preempted and not evaluated_last:
        evaluate(run.step)
    if worker is not None:
        worker.close()
    run.close()
    return {"step": run.step, "history": history, "preempted": run.preempted, "checkpoint": str(run.ckpt_root),
            "chunks": run.chunks}
