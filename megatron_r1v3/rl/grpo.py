"""GRPO on megatron-core with a colocated vLLM engine (R1V3 recipe, spec §3). The loop reads like a one-GPU loop:

    rollout (rank 0: sample G responses per prompt with vLLM) -> reward -> advantage (episode.py)
    -> loss + optimizer step (every rank: megatron pipeline schedule, policy_loss.py)
    -> refit (stream the new weights from the TP/PP shards into vLLM, rollout/refit.py)

Everything parallel lives below: `bridge.export` (TP gather, PP broadcast), megatron-core (schedules, DDP,
distributed optimizer). Rank 0 hosts the engine and decides the episode; the rows reach the other ranks as token
ids (`broadcast_object`), and every rank tiles the images itself with the engine's processor. Checkpoints hold the
model, optimizer, scheduler, RNG, the prompt sampler position and the selective sample buffer.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_r1v3.bridge.convert import write_training_meta
from megatron_r1v3.bridge.export import iter_hf_tensors
from megatron_r1v3.bridge.mapping import expected_hf_names
from megatron_r1v3.config import RunConfig, to_yaml
from megatron_r1v3.models.build import build_model
from megatron_r1v3.parallel import init_parallel
from megatron_r1v3.parallel.phase import set_phase
from megatron_r1v3.rl.batch import check_image_tokens, microbatch, sequence_length, shard_rows
from megatron_r1v3.rl.buffer import SelectiveSampleBuffer
from megatron_r1v3.rl.episode import collect_episode
from megatron_r1v3.rl.evaluate import broadcast_object, evaluate_heldout
from megatron_r1v3.rl.loss import PROB_ERROR_ALARM
from megatron_r1v3.rl.policy_loss import count_units, loss_function, reduce_metrics, write_logprobs
from megatron_r1v3.rl.prompts import PromptSampler, load_prompts
from megatron_r1v3.rl.rollouts import PixelSource, RolloutWorker
from megatron_r1v3.rollout.refit import push_weights
from megatron_r1v3.sft.data import prepare_data
from megatron_r1v3.sft.trainer import load_initial_weights
from megatron_r1v3.training.freeze import apply_trainable, trainable_patterns
from megatron_r1v3.training.logger import RunLogger
from megatron_r1v3.training.optimizer import build_optimizer, wrap_ddp
from megatron_r1v3.training.preemption import PreemptionWatch, clear_marker, mark_preempted
from megatron_r1v3.training.resume import load_checkpoint, save_checkpoint
from megatron_r1v3.training.scheduler import build_scheduler
from megatron_r1v3.training.step import train_step

CONNECTOR_PARAM = "mlp1.linear_fc1.weight"
CONSOLE = ("reward/mean", "reward/accuracy", "reward/format", "response/length_mean", "actor/entropy",
           "rollout/critical_entropy", "rollout/prob_error", "adv/zero_advantage_fraction", "actor/grad_norm",
           "refit/seconds", "rollout/gen_tokens_per_s", "time/step", "time/overhead_fraction")


class StepTimer:
    """Seconds per named phase of one step."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        set_phase(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0


def connector_frozen(spec: str) -> bool:
    return not any(re.search(p, CONNECTOR_PARAM) for p in trainable_patterns(spec))


def refit(worker: RolloutWorker | None, chunks, cfg: RunConfig, names: list[str]):
    """Collective: every rank feeds the stream, rank 0's engine loads it."""
    return push_weights(worker.engine if worker else None, iter_hf_tensors(chunks, cfg.model, "native"), names,
                        bucket_bytes=cfg.rl.refit_bucket_mb * 2**20)


def train_on(rows, ddp, optimizer, ref_chunks, pixels: PixelSource, cfg: RunConfig, state, step: int) -> dict:
    """Loss and one optimizer step on the episode's rows (each DP rank its share, in whole microbatches)."""
    mbs_size = cfg.train.micro_batch_size
    mine, n_micro = shard_rows(rows, state.dp_rank, state.dp, mbs_size)
    for r in mine:
        if r is not None:
            check_image_tokens(r, pixels(r.prompt_index), cfg.model.image_context_token_id, cfg.model.tokens_per_tile)
    seq = sequence_length(rows)
    mbs = [microbatch(mine[i * mbs_size:(i + 1) * mbs_size], seq, cfg.model.pad_token_id, pixels, step)
           for i in range(n_micro)]
    t0 = time.perf_counter()
    if cfg.rl.old_logprobs == "recompute":
        write_logprobs(ddp, mbs, "old_logp")
    if ref_chunks is not None:
        write_logprobs(ref_chunks, mbs, "ref_logp")
    logprob_pass = time.perf_counter() - t0
    total = count_units(mbs, cfg.rl.agg)
    t0 = time.perf_counter()
    result = train_step(ddp, optimizer, mbs, loss_function(cfg.rl, total, n_micro))
    fwd_bwd = time.perf_counter() - t0
    metrics = reduce_metrics(result["outputs"])
    metrics["actor/loss"] = result["loss"]
    metrics["time/forward_backward_step"] = fwd_bwd
    metrics["time/logprob_pass"] = logprob_pass
    metrics.update({"actor/grad_norm": result["grad_norm"], "actor/lr": optimizer.param_groups[0]["lr"],
                    "actor/seq_length": float(seq), "actor/rows": float(len(rows))})
    return metrics


def run_grpo(cfg: RunConfig) -> dict:
    """Train; returns per-step metrics and evaluations (rank 0 also writes TensorBoard + metrics.jsonl)."""
    state = init_parallel(cfg)
    r = cfg.rl
    out = Path(cfg.output_dir)
    ckpt_root = Path(cfg.checkpoint.dir or out / "checkpoints")
    rank0 = state.rank == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
    sources = prepare_data(cfg, state)
    train_pixels = PixelSource(cfg, load_prompts(sources.train, sources.root, cfg.data.strict), sources.tokenizer)
    val_pixels = (PixelSource(cfg, load_prompts(sources.val, sources.root, cfg.data.strict), sources.tokenizer)
                  if sources.val else None)

    chunks = build_model(cfg, init=cfg.checkpoint.load is None)
    if cfg.checkpoint.load:
        load_initial_weights(chunks, cfg.checkpoint.load)
    ref_chunks = None
    if r.kl_coef:
        ref_chunks = build_model(cfg, init=cfg.checkpoint.load is None)
        if cfg.checkpoint.load:
            load_initial_weights(ref_chunks, cfg.checkpoint.load)
        for p in (p for c in ref_chunks for p in c.parameters()):
            p.requires_grad_(False)
    trainable = apply_trainable(chunks, cfg.train.trainable)
    ddp = wrap_ddp(chunks, cfg)
    optimizer = build_optimizer(ddp, cfg)
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.train.steps)
    sampler = PromptSampler(len(train_pixels.samples), cfg.seed)
    buffer = (SelectiveSampleBuffer(r.ssb_capacity, r.ssb_zero_variance_threshold, r.ssb_max_replay_fraction,
                                    max_age=r.ssb_max_age, seed=cfg.seed) if r.ssb else None)
    describe = partial(write_training_meta, cfg, sources.tokenizer_dir)
    step, history = 0, {"train": [], "eval": []}
    if cfg.checkpoint.resume:
        resumed = load_checkpoint(ckpt_root, chunks, optimizer, scheduler)
        if resumed is not None:
            step, extra = resumed
            sampler.load_state_dict(extra["sampler"])
            if buffer is not None and extra.get("ssb") is not None:
                buffer.load_state_dict(extra["ssb"])

    log = RunLogger(out, cfg.logging.tensorboard, prefix="rl", progress_total=cfg.train.steps if
                    cfg.logging.progress else None, progress_start=step)
    log.text(f"[rl] {cfg.train.trainable}: {trainable['trainable']:,} trainable / {trainable['frozen']:,} frozen"
             f" parameters on rank 0; TP{state.tp}·PP{state.pp}·DP{state.dp}; {r.prompts_per_step} prompts x"
             f" {r.samples_per_prompt} samples per step; starting at step {step}")
    if connector_frozen(cfg.train.trainable):
        log.text("[rl] WARNING: the connector (mlp1) is frozen; the R1V3 report saw RL collapse into repetitive"
                 " text when the connector does not train")

    set_phase("start rollout engine")
    worker = None
    if rank0:
        from megatron_r1v3.rollout.hf_export import write_vllm_model_dir

        model_dir = write_vllm_model_dir(out / "vllm_model", cfg.model, sources.tokenizer_dir, torch.float32,
                                         max_tiles=cfg.data.max_tiles, seed=cfg.seed)
        worker = RolloutWorker(cfg, model_dir, sources.tokenizer)
        log.text(f"[rl] vLLM engine up in {worker.engine.start_seconds:.1f}s (in-process on rank 0)")
    names = list(expected_hf_names(cfg.model, "native"))
    refit(worker, chunks, cfg, names)

    def evaluate(at: int) -> None:
        if val_pixels is None:
            return
        set_phase(f"evaluate step {at}")
        ev = evaluate_heldout(chunks, cfg, worker, val_pixels, state, at, out / "evals")
        history["eval"].append({"step": at, **ev})
        log.scalars(at, ev, group="heldout")

    if step == 0:
        evaluate(0)
    clear_marker(out)
    watch, preempted = PreemptionWatch(), False
    while step < cfg.train.steps:
        step += 1
        timer = StepTimer()
        t_step = time.perf_counter()
        with timer("rollout"):
            episode = collect_episode(cfg, worker, train_pixels, sampler, buffer, step) if rank0 else None
            rows, roll_metrics = broadcast_object(episode)
        with timer("train"):
            metrics = train_on(rows, ddp, optimizer, ref_chunks, train_pixels, cfg, state, step)
            scheduler.step(increment=1)
        with timer("refit"):
            stats = refit(worker, chunks, cfg, names)
        metrics.update(roll_metrics)
        metrics.update({"refit/seconds": stats.total_seconds, "refit/gb_per_s": stats.gb_per_s,
                        "refit/buckets": float(stats.buckets)})
        total = time.perf_counter() - t_step
        metrics.update({f"time/{k}": v for k, v in timer.seconds.items()})
        metrics["time/step"] = total
        # everything but generation, the trainer's forward/backward/optimizer step (incl. logprob recompute) and
        # the refit: rewards, advantages, broadcast, batching, metrics (tools/bench_refit.py: target <= 5%)
        core = metrics["time/generate"] + metrics["time/forward_backward_step"] + stats.total_seconds
        if cfg.rl.old_logprobs == "recompute" or r.kl_coef:
            core += metrics["time/logprob_pass"]
        metrics["time/overhead_fraction"] = max(0.0, total - core) / total
        metrics["rollout/gen_tokens_per_s"] = roll_metrics["generated_tokens"] / max(metrics["time/generate"], 1e-9)
        if metrics["rollout/prob_error"] > PROB_ERROR_ALARM:
            log.text(f"[rl] WARNING step {step}: train-vs-rollout probability error "
                     f"{metrics['rollout/prob_error']:.4f} > {PROB_ERROR_ALARM} (stale or wrongly pushed weights?)")
        history["train"].append({"step": step, **metrics})
        log.advance(reward=metrics["reward/mean"])
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            log.scalars(step, metrics, echo=CONSOLE)
        if r.eval_every and step % r.eval_every == 0 and step < cfg.train.steps:
            evaluate(step)
        if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0 and step < cfg.train.steps:
            save_checkpoint(ckpt_root, step, chunks, optimizer, scheduler, _extra(sampler, buffer),
                            cfg.checkpoint.keep_last, describe)
        if watch.requested():
            log.text(f"[rl] preemption signal: checkpointing step {step} and exiting for requeue")
            preempted = True
            break
    save_checkpoint(ckpt_root, step, chunks, optimizer, scheduler, _extra(sampler, buffer),
                    cfg.checkpoint.keep_last, describe)
    watch.restore()
    if preempted:
        mark_preempted(out, step)
    elif not (r.eval_every and step % r.eval_every == 0 and history["eval"] and history["eval"][-1]["step"] == step):
        evaluate(step)
    log.close()
    if worker is not None:
        worker.close()
    dist.barrier()
    return {"step": step, "history": history, "preempted": preempted, "checkpoint": str(ckpt_root),
            "chunks": chunks}


def _extra(sampler: PromptSampler, buffer: SelectiveSampleBuffer | None) -> dict:
    """Rank 0 decides the episodes, so its sampler and buffer are the ones that matter (others stay empty)."""
    return {"sampler": sampler.state_dict(), "ssb": buffer.state_dict() if buffer is not None else None}
