"""Rank 0's side of GRPO: the colocated vLLM engine, prompts, sampling and rewards; and every rank's pixel source.

The engine serves our model through the native InternVL layout (`rollout.hf_export`); it starts with throw-away
weights and receives the trainer's by `refit` before the first rollout. Sampling seeds are a function of (run seed,
step, prompt), so an episode is reproducible after a restart.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_r1v3.config import RunConfig
from megatron_r1v3.data.records import Sample
from megatron_r1v3.metrics.entropy import critical_mask
from megatron_r1v3.rl.batch import Rollout
from megatron_r1v3.rl.prompts import Prompt, make_prompt
from megatron_r1v3.rl.rewards import score_batch
from megatron_r1v3.rollout.refit import RefitStats, refit


def max_response_tokens(cfg: RunConfig, step: int) -> int:
    """The response budget at `step` (rl.length_schedule: the last entry whose step has been reached)."""
    tokens = cfg.rl.max_response_tokens
    for at, value in sorted((int(a), int(v)) for a, v in cfg.rl.length_schedule):
        if step >= at:
            tokens = value
    return tokens


def longest_response(cfg: RunConfig) -> int:
    return max([cfg.rl.max_response_tokens] + [int(v) for _, v in cfg.rl.length_schedule])


def sampling_seeds(seed: int, step: int, round_: int, indices: Sequence[int], stride: int) -> list[int]:
    """One seed per prompt; vLLM adds 0..n-1 for the samples, so prompts are `stride` (>= n) apart."""
    base = (seed * 1_000_003 + step * 1_009 + round_) * 65_537
    return [(base + i * stride) % 2**31 for i in indices]


class PixelSource:
    """Tiles of a prompt's images with the rollout engine's own image processor (every rank; cached)."""

    def __init__(self, cfg: RunConfig, samples: Sequence[Sample], tokenizer):
        from megatron_r1v3.rollout.hf_export import make_image_processor

        self.processor = make_image_processor(cfg.model, cfg.data.max_tiles)
        self.samples, self.tokenizer = samples, tokenizer
        self._cache: dict[int, torch.Tensor | None] = {}

    def prompt(self, index: int) -> Prompt:
        return make_prompt(self.samples[index], index, self.tokenizer)

    def __call__(self, index: int) -> torch.Tensor | None:
        if index not in self._cache:
            images = self.prompt(index).images
            self._cache[index] = (self.processor(images=images, return_tensors="pt")["pixel_values"].float()
                                  if images else None)
        return self._cache[index]


class RolloutWorker:
    """The engine and reward computation (rank 0 only)."""

    def __init__(self, cfg: RunConfig, model_dir: Path, tokenizer):
        from megatron_r1v3.rollout.engine import RolloutEngine

        r = cfg.rl
        self.cfg, self.tokenizer = cfg, tokenizer
        self.seconds: dict[str, float] = defaultdict(float)  # engine time vs reward time, reset by the caller
        self.verifier = None
        if r.verifier_model:
            from megatron_r1v3.rl.verifier import EngineVerifier

            self.verifier = EngineVerifier(r.verifier_model, seed=cfg.seed, kv_cache_mb=r.kv_cache_mb,
                                           gpu_memory_utilization=r.gpu_memory_utilization / 2)
        self.engine = RolloutEngine(
            model_dir, max_model_len=r.max_prompt_tokens + longest_response(cfg), seed=cfg.seed,
            kv_cache_bytes=r.kv_cache_mb * 2**20, gpu_memory_utilization=r.gpu_memory_utilization,
            max_images_per_prompt=8, max_num_seqs=max(64, r.samples_per_prompt),
        )

    def sample(self, prompts: Sequence[Prompt], n: int, max_tokens: int, temperature: float, seeds: Sequence[int],
               step: int) -> list[list[Rollout]]:
        """`n` scored rollouts per prompt."""
        r, m = self.cfg.rl, self.cfg.model
        t0 = time.perf_counter()
        # an image placeholder inside a response would be taken for an image slot by the trainer: never sample one
        banned = [m.image_context_token_id, m.image_start_token_id, m.image_end_token_id]
        outs = self.engine.generate([(p.prompt_ids, p.images) for p in prompts], n=n, temperature=temperature,
                                    top_p=r.top_p, max_tokens=max_tokens, seed=list(seeds),
                                    stop_token_ids=[m.eos_token_id], banned_token_ids=banned)
        t1 = time.perf_counter()
        groups = []
        for p, samples in zip(prompts, outs):
            scores = score_batch([s.text for s in samples], [p.answer] * len(samples), [p.question] * len(samples),
                                 [p.options] * len(samples), r.w_acc, r.w_fmt, self.verifier)
            groups.append([
                Rollout(p.index, s.prompt_token_ids, s.token_ids, s.logprobs, sc.total, sc.accuracy, sc.format,
                        s.finish_reason, step, critical=critical_mask(self.tokenizer, s.token_ids, r.critical_tokens),
                        text=s.text)
                for s, sc in zip(samples, scores)
            ])
        self.seconds["generate"] += t1 - t0
        self.seconds["reward"] += time.perf_counter() - t1
        return groups

    def close(self) -> None:
        self.engine.close()
        if self.verifier is not None:
            self.verifier.close()


def start_rollouts(cfg: RunConfig, tokenizer_dir: Path, tokenizer, model_dir: Path, rank: int) -> RolloutWorker | None:
    """Rank 0: write the engine's model directory (throw-away weights: the first refit replaces them) and start
    the engine; None on the other ranks."""
    if rank != 0:
        return None
    from megatron_r1v3.rollout.hf_export import write_vllm_model_dir

    write_vllm_model_dir(model_dir, cfg.model, tokenizer_dir, torch.float32, max_tiles=cfg.data.max_tiles,
                         seed=cfg.seed)
    return RolloutWorker(cfg, model_dir, tokenizer)


def refit_worker(worker: RolloutWorker | None, chunks, cfg: RunConfig) -> RefitStats:
    """Collective: every rank feeds the weight stream, rank 0's engine loads it."""
    return refit(worker.engine if worker else None, chunks, cfg.model, cfg.rl.refit_bucket_mb)
