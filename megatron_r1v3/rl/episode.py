"""One GRPO episode's data, decided on rank 0: draw prompts, sample G responses each, score them, group advantages,
DAPO dynamic sampling (optional), selective sample buffer replay (optional). Returns the rows to train on and what
to log about them."""

from __future__ import annotations

import torch

from megatron_r1v3.config import RunConfig
from megatron_r1v3.rl.advantages import group_advantages
from megatron_r1v3.rl.batch import Rollout
from megatron_r1v3.rl.buffer import SelectiveSampleBuffer
from megatron_r1v3.rl.prompts import PromptSampler
from megatron_r1v3.rl.rollouts import PixelSource, RolloutWorker, max_response_tokens, sampling_seeds


def _advantages(cfg: RunConfig, groups: list[list[Rollout]]):
    rewards = torch.tensor([[x.reward for x in g] for g in groups], dtype=torch.float32)
    adv, stats = group_advantages(rewards, normalize_std=cfg.rl.normalize_std, unbiased=cfg.rl.std_unbiased)
    for g, a in zip(groups, adv.tolist()):
        for x, value in zip(g, a):
            x.advantage = value
    return stats


def collect_episode(cfg: RunConfig, worker: RolloutWorker, pixels: PixelSource, sampler: PromptSampler,
                    buffer: SelectiveSampleBuffer | None, step: int) -> tuple[list[Rollout], dict[str, float]]:
    """Rank 0: the episode's training rows (fresh, then replayed) and rollout/advantage/buffer metrics."""
    r = cfg.rl
    worker.seconds.clear()
    max_tokens = max_response_tokens(cfg, step)
    groups: list[list[Rollout]] = []
    kept: list[list[Rollout]] = []
    rounds, first_stats = 0, None
    while True:
        indices = sampler.take(r.prompts_per_step if rounds == 0 else r.prompts_per_step - len(kept))
        seeds = sampling_seeds(cfg.seed, step, rounds, range(len(indices)), r.samples_per_prompt)
        new = worker.sample([pixels.prompt(i) for i in indices], r.samples_per_prompt, max_tokens, r.temperature,
                            seeds, step)
        stats = _advantages(cfg, new)
        first_stats = first_stats or stats
        groups += new
        if not r.dynamic_sampling:
            kept = new
            break
        kept += [g for g in new if len({x.reward for x in g}) > 1]  # DAPO: informative groups only
        rounds += 1
        if len(kept) >= r.prompts_per_step or rounds > r.dynamic_sampling_rounds:
            break
    fresh = [x for g in kept for x in g]
    seen = [x for g in groups for x in g]
    n = max(len(seen), 1)
    metrics = {
        "reward/mean": sum(x.reward for x in seen) / n,
        "reward/accuracy": sum(x.accuracy for x in seen) / n,
        "reward/format": sum(x.format for x in seen) / n,
        "response/length_mean": sum(len(x.response_ids) for x in seen) / n,
        "response/length_max": float(max((len(x.response_ids) for x in seen), default=0)),
        "response/truncated": sum(x.finish_reason == "length" for x in seen) / n,
        "response/max_tokens": float(max_tokens),
        "generated_tokens": float(sum(len(x.response_ids) for x in seen)),
        "dapo/rounds": float(rounds if r.dynamic_sampling else 0),
        "dapo/kept_groups": float(len(kept)),
        **first_stats.as_dict(),
        "time/generate": worker.seconds["generate"],
        "time/reward": worker.seconds["reward"],
    }
    # why responses scored what they did: hostile / timed-out ones are 0 and counted here (rl/scoring.py)
    metrics.update({f"reward/items_{why}": float(k) for why, k in worker.scorer.take_counts().items()})
    if worker.verifier is not None:
        metrics["reward/verifier_calls_total"] = float(worker.verifier.calls)
    metrics["adv/zero_advantage_fraction"] = sum(x.advantage == 0 for x in fresh) / max(len(fresh), 1)
    replayed: list[Rollout] = []
    if buffer is not None:
        buffer.evict_stale(step)
        informative = [x for x in fresh if x.advantage != 0]
        replayed = buffer.replay(len(fresh), len(informative), first_stats.zero_variance_fraction, step)
        buffer.add(informative, [x.advantage for x in informative], step)
        metrics.update(buffer.stats(step))
        metrics["ssb/replayed"] = float(len(replayed))
    return fresh + replayed, metrics
