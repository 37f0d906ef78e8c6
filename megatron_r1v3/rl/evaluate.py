"""Held-out evaluation inside an RL run: avg@k accuracy of vLLM samples (the R1V3 protocol at toy scale) and the
critical-token entropy of those samples, teacher-forced through the Megatron model (spec §4).

Seeds and the token budget (the longest of `rl.length_schedule`; `r1v3 eval --max-new-tokens` sets it) do not
depend on the step, so two checkpoints are compared on the same prompts with the same sampling noise and budget.
The prompts are the records at positions below `rl.eval_prompts` (<= 0: all); those over `rl.max_prompt_tokens`
among them are skipped (never sampled), counted in the results and named in `step_N.skipped.jsonl`.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from megatron_r1v3.config import RunConfig
from megatron_r1v3.parallel.phase import set_phase
from megatron_r1v3.parallel.wait import compute_on_rank
from megatron_r1v3.rl.batch import Rollout, episode_microbatches
from megatron_r1v3.rl.policy_loss import policy_loss, reduce_metrics
from megatron_r1v3.rl.rollouts import PixelSource, longest_response, sampling_seeds
from megatron_r1v3.training.step import run_schedule

EVAL_SEED_STEP = -1  # sampling_seeds(step=-1): fixed across evaluations


def teacher_forced_metrics(chunks, cfg: RunConfig, rows, pixels: PixelSource, state, step: int) -> dict[str, float]:
    """Token entropy and critical-token entropy of `rows` under the Megatron model (forward only)."""
    mbs = episode_microbatches(rows, state, cfg.train.micro_batch_size, cfg.model, pixels, step)
    outputs = run_schedule(chunks, mbs, partial(policy_loss, cfg.rl, 0.0), forward_only=True)
    return reduce_metrics(outputs)


def in_scope(cfg: RunConfig, position: int) -> bool:
    """Whether the record at `position` is among the first `rl.eval_prompts` (all when <= 0)."""
    return cfg.rl.eval_prompts <= 0 or position < cfg.rl.eval_prompts


def skipped_path(out_dir: Path, step: int) -> Path:
    """Where `sample_heldout` names the skipped prompts of one evaluation (JSONL, one object per prompt)."""
    return out_dir / f"step_{step:06d}.skipped.jsonl"


def sample_heldout(cfg: RunConfig, worker, pixels: PixelSource, step: int,
                   out_dir: Path | None) -> list[list[Rollout]]:
    """Rank 0 (every rank with SPMD engines): `rl.eval_samples` scored responses for each usable held-out prompt
    in scope (`in_scope`); writes per-item JSONL and the skipped prompts under `out_dir`."""
    r = cfg.rl
    n = sum(in_scope(cfg, pos) for pos in pixels.positions)  # positions ascend: the kept prompts 0..n-1
    prompts = [pixels.prompt(i) for i in range(n)]
    seeds = sampling_seeds(cfg.seed, EVAL_SEED_STEP, 0, range(n), r.eval_samples)
    groups = worker.sample(prompts, r.eval_samples, longest_response(cfg), r.eval_temperature, seeds, step) \
        if prompts else []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"step_{step:06d}.jsonl", "w") as f:
            for p, g in zip(prompts, groups):
                f.write(json.dumps({"id": p.id, "question": p.question, "answer": p.answer,
                                    "responses": [x.text for x in g], "correct": [x.accuracy for x in g],
                                    "well_formed": [x.format for x in g], "prompt_tokens": len(g[0].prompt_ids),
                                    "response_tokens": [len(x.response_ids) for x in g],
                                    "finish_reasons": [x.finish_reason for x in g]}) + "\n")
        skipped = [s.as_dict() for s in pixels.skipped if in_scope(cfg, s.position)]
        if skipped:
            skipped_path(out_dir, step).write_text("".join(json.dumps(s) + "\n" for s in skipped))
    return groups


def evaluate_heldout(chunks, cfg: RunConfig, worker, pixels: PixelSource, state, step: int,
                     out_dir: Path | None = None) -> dict[str, float]:
    """Collective. With the rank-0 engine (`rl.rollout_tp=0`) rank 0 samples (`sample_heldout`; the other ranks wait
    as long as it is alive, `parallel.wait`); with SPMD engines every rank samples with its engine (the engines
    split the prompts and gather the groups) and rank 0 writes the items. Every rank joins the teacher-forced
    entropy pass."""
    if cfg.rl.rollout_tp > 0:
        groups = sample_heldout(cfg, worker, pixels, step, out_dir if state.rank == 0 else None)
    else:
        groups = compute_on_rank(partial(sample_heldout, cfg, worker, pixels, step, out_dir),
                                 f"held-out sampling (step {step})", cfg.parallel.timeout_s)
    rows = [x for g in groups for x in g]
    set_phase(f"held-out teacher-forced pass (step {step})")
    nan = float("nan")  # nothing in scope fits the prompt budget: no samples, nothing to teacher-force
    tf = teacher_forced_metrics(chunks, cfg, rows, pixels, state, step) if rows else dict.fromkeys(
        ("actor/entropy", "rollout/critical_entropy", "rollout/critical_entropy_next", "rollout/critical_tokens"), nan)
    n = max(len(rows), 1)
    return {
        "prompts": float(len(groups)),
        "skipped_prompts": float(sum(in_scope(cfg, s.position) for s in pixels.skipped)),
        "max_new_tokens": float(longest_response(cfg)),
        "truncated": sum(x.finish_reason == "length" for x in rows) / n,
        "accuracy": sum(x.accuracy for x in rows) / n,  # avg@k
        "format": sum(x.format for x in rows) / n,
        "pass_at_k": sum(any(x.accuracy for x in g) for g in groups) / max(len(groups), 1),
        "response_length": sum(len(x.response_ids) for x in rows) / n,
        "entropy": tf["actor/entropy"],
        "critical_entropy": tf["rollout/critical_entropy"],
        "critical_entropy_next": tf["rollout/critical_entropy_next"],
        "critical_tokens_per_response": tf["rollout/critical_tokens"] / n,
    }
