"""Held-out evaluation inside an RL run: avg@k accuracy of vLLM samples (the R1V3 protocol at toy scale) and the
critical-token entropy of those samples, teacher-forced through the Megatron model (spec §4).

Seeds and the token budget (the longest of `rl.length_schedule`) do not depend on the step, so two checkpoints are
compared on the same prompts with the same sampling noise and budget.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch.distributed as dist

from megatron_r1v3.config import RunConfig
from megatron_r1v3.rl.batch import episode_microbatches
from megatron_r1v3.rl.policy_loss import policy_loss, reduce_metrics
from megatron_r1v3.rl.rollouts import PixelSource, RolloutWorker, longest_response, sampling_seeds
from megatron_r1v3.training.step import run_schedule

EVAL_SEED_STEP = -1  # sampling_seeds(step=-1): fixed across evaluations


def broadcast_object(obj, src: int = 0):
    """`obj` from global rank `src` on every rank (pickled)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def teacher_forced_metrics(chunks, cfg: RunConfig, rows, pixels: PixelSource, state, step: int) -> dict[str, float]:
    """Token entropy and critical-token entropy of `rows` under the Megatron model (forward only)."""
    mbs = episode_microbatches(rows, state, cfg.train.micro_batch_size, cfg.model.pad_token_id, pixels, step)
    outputs = run_schedule(chunks, mbs, partial(policy_loss, cfg.rl, 0.0), forward_only=True)
    return reduce_metrics(outputs)


def evaluate_heldout(chunks, cfg: RunConfig, worker: RolloutWorker | None, pixels: PixelSource, state, step: int,
                     out_dir: Path | None = None) -> dict[str, float]:
    """Collective. Rank 0 samples `rl.eval_samples` responses for the first `rl.eval_prompts` held-out prompts;
    every rank joins the teacher-forced entropy pass. Writes per-item JSONL under `out_dir` (rank 0)."""
    r = cfg.rl
    groups = None
    if worker is not None:
        n = min(r.eval_prompts, len(pixels.samples))
        prompts = [pixels.prompt(i) for i in range(n)]
        seeds = sampling_seeds(cfg.seed, EVAL_SEED_STEP, 0, range(n), r.eval_samples)
        groups = worker.sample(prompts, r.eval_samples, longest_response(cfg), r.eval_temperature, seeds, step)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(out_dir / f"step_{step:06d}.jsonl", "w") as f:
                for p, g in zip(prompts, groups):
                    f.write(json.dumps({"id": p.id, "question": p.question, "answer": p.answer,
                                        "responses": [x.text for x in g], "correct": [x.accuracy for x in g],
                                        "well_formed": [x.format for x in g]}) + "\n")
    groups = broadcast_object(groups)
    rows = [x for g in groups for x in g]
    tf = teacher_forced_metrics(chunks, cfg, rows, pixels, state, step)
    n = max(len(rows), 1)
    return {
        "accuracy": sum(x.accuracy for x in rows) / n,  # avg@k
        "format": sum(x.format for x in rows) / n,
        "pass_at_k": sum(any(x.accuracy for x in g) for g in groups) / max(len(groups), 1),
        "response_length": sum(len(x.response_ids) for x in rows) / n,
        "entropy": tf["actor/entropy"],
        "critical_entropy": tf["rollout/critical_entropy"],
        "critical_entropy_next": tf["rollout/critical_entropy_next"],
        "critical_tokens_per_response": tf["rollout/critical_tokens"] / n,
    }
